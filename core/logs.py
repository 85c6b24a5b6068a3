"""Logging for the app and the command line: one format, and each library warning said once, with what it means.

Libraries warn about the same thing again and again: bitsandbytes logs "MatMul8bitLt: inputs will be cast…" at
every int8 matmul of a model that is not float16 (thousands of lines after a few chats), and "Failed to load CPU
gemm_4bit_forward … No module named 'kernels'" at every start on a CPU with AVX512-BF16. `configure` installs one
filter on the handlers it sets up: a warning from a library passes the first time (with our own line saying what
it means, where we know) and never again in this process; the app's own records always pass.

The `kernels` package is not installed on purpose: bitsandbytes would use it to download a compiled CPU kernel
from the Hugging Face Hub when it is imported, which is a network call at every start (this app starts offline)
and code fetched at run time. Without it, 4-bit layers on the CPU run through bitsandbytes' own built-in kernel,
which is what every measurement in this project used; so its warning becomes one line of information.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
OURS = ("app", "core", "server", "ui", "space", "benchmarks", "__main__")


@dataclass(frozen=True)
class Known:
    """A library message we recognise: what it means here, and whether it still is a warning."""

    logger: str  # the library logger's name (a prefix)
    starts: str  # how the message starts
    meaning: str
    warning: bool = True


KNOWN = (
    Known("bitsandbytes", "MatMul8bitLt: inputs will be cast",
          "LLM.int8() quantizes each layer's input from float16, so the activations of a model loaded in another "
          "dtype are cast at every int8 layer. That is how bitsandbytes computes int8, not a fault; said once."),
    Known("bitsandbytes", "Failed to load CPU gemm_4bit_forward",
          "4-bit layers on the CPU use bitsandbytes' built-in kernel. Its optional faster one would come from the "
          "`kernels` package, which downloads compiled code from the Hugging Face Hub at start; this app does not "
          "install it (core/logs.py says why).", warning=False),
)


def known(record: logging.LogRecord) -> Known | None:
    message = record.getMessage()
    return next((k for k in KNOWN if record.name.startswith(k.logger) and message.startswith(k.starts)), None)


class LibraryWarningsOnce(logging.Filter):
    """Passes each library warning the first time it is seen (by logger and message template), with our meaning."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or record.name.split(".")[0] in OURS:
            return True
        key = (record.name, str(record.msg))
        if key in self.seen:
            return False
        self.seen.add(key)
        meaning = known(record)
        if meaning is not None:
            if not meaning.warning:
                record.levelno, record.levelname = logging.INFO, "INFO"
                record.msg, record.args = meaning.meaning, ()
            else:
                record.msg, record.args = f"{record.getMessage()} [{meaning.meaning}]", ()
        return True


def configure(level: int = logging.INFO) -> None:
    """One handler on the root logger, with the filter; Python warnings go through it too. Idempotent."""
    root = logging.getLogger()
    if not any(isinstance(f, LibraryWarningsOnce) for h in root.handlers for f in h.filters):
        logging.basicConfig(level=level, format=FORMAT)
        once = LibraryWarningsOnce()
        for handler in root.handlers:
            handler.addFilter(once)
    root.setLevel(level)
    logging.captureWarnings(True)
