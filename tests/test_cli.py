"""The command line (`python -m core`) as a script user runs it: options from the load form's table, one progress
bar for a load, each library warning once with what it means (core.logs)."""

from __future__ import annotations

import subprocess
import sys

from conftest import QUESTION, ROOT, run_cli, subprocess_env


def test_load_options_are_the_forms_fields():
    from core import load_form

    shown = run_cli("plan", "--help", timeout=120)
    assert shown.returncode == 0
    for f in load_form.FIELDS:
        assert f.option in shown.stdout, f.option
    assert "--trust-remote-code" in shown.stdout  # a launch option, which the form never offers
    refused = run_cli("plan", "--quant", "int4", timeout=120)
    assert refused.returncode == 2 and "invalid choice: 'int4'" in refused.stderr
    planned = run_cli("plan", "--quant", "nf4", "--max-memory", "0=100MB, 1=1GiB", timeout=300)
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert "cuda:0" in planned.stdout and "cuda:1" in planned.stdout


def test_generate_shows_one_progress_bar_and_says_each_library_warning_once():
    done = subprocess.run([sys.executable, "-m", "core", "generate", "--quant", "int8", "--greedy", "--max-new-tokens",
                           "8", QUESTION], cwd=ROOT, env=subprocess_env(), capture_output=True, timeout=600)
    stdout, stderr = done.stdout.decode(), done.stderr.decode()  # bytes: text mode would turn each \r into a line
    assert done.returncode == 0, stderr[-2000:]
    assert "Paris" in stdout
    lines = stderr.split("\n")  # the progress bar redraws its one line with carriage returns
    assert sum("Loading weights" in line for line in lines) == 1, stderr[-3000:]
    assert stderr.count("Loading weights") > 5  # ... many times: it moved
    assert "/272" not in stderr  # no counter per tensor (there were 272 lines of them)
    assert stderr.count("inputs will be cast") == 1  # bitsandbytes says it at every int8 matmul


_KERNELS = """
import logging, sys
sys.path.insert(0, sys.argv[1])
from core import logs
logs.configure()
ops = logging.getLogger("bitsandbytes.backends.cpu.ops")  # what bitsandbytes logs at import on AVX512-BF16 CPUs
for _ in range(3):
    ops.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
                "`pip install kernels` and the kernels >= 0.11.1", ModuleNotFoundError("No module named 'kernels'"))
logging.getLogger("some.library").warning("something odd: %s", 1)
logging.getLogger("some.library").warning("something odd: %s", 2)
logging.getLogger("core.worker").warning("ours, said each time")
logging.getLogger("core.worker").warning("ours, said each time")
"""


def test_the_missing_kernels_warning_becomes_one_line_of_information():
    done = subprocess.run([sys.executable, "-c", _KERNELS, str(ROOT)], env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().split("\n")
    assert "Failed to load" not in done.stderr and not any("WARNING bitsandbytes" in line for line in lines)
    assert sum("INFO bitsandbytes.backends.cpu.ops: 4-bit layers on the CPU use bitsandbytes' built-in kernel" in line
               for line in lines) == 1
    assert sum("something odd" in line for line in lines) == 1  # any library's warning: once, by its template
    assert sum("ours, said each time" in line for line in lines) == 2  # the app's own: never filtered
