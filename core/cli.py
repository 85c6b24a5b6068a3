"""A thin command line over core: plan, generate (load and generate), save. Used by scripts and benchmarks.

    python -m core plan --model org/name --quant nf4 --max-memory "0=600MB,1=1GiB,cpu=8GB"
    python -m core generate --quant nf4 --greedy "What is the capital of France?"
    python -m core save --quant nf4 --out ./smollm2-nf4
"""

from __future__ import annotations

import argparse
import json
import sys

from core.errors import EngineError
from core.spec import (COMPUTE_DTYPES, DTYPES, QUANT_STORAGES, QUANTIZATIONS, GenerationSpec, LoadSpec, QuantSpec,
                       parse_device_map, parse_max_memory, parse_model)


def _add_load_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="", help="Hub id or local folder of a causal LM or an encoder-decoder "
                                                    "(T5, BART); empty: the embedded SmolLM2-135M")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--dtype", default="auto", choices=DTYPES)
    parser.add_argument("--quant", default="none", choices=QUANTIZATIONS)
    parser.add_argument("--compute-dtype", default="auto", choices=COMPUTE_DTYPES)
    parser.add_argument("--double-quant", action="store_true")
    parser.add_argument("--quant-storage", default="uint8", choices=QUANT_STORAGES)
    parser.add_argument("--int8-threshold", type=float, default=6.0)
    parser.add_argument("--skip-modules", default="", help="comma-separated module names left unquantized")
    parser.add_argument("--fp32-cpu-offload", action="store_true")
    parser.add_argument("--device-map", default="auto")
    parser.add_argument("--max-memory", default="", help="like '0=600MB,1=1GiB,cpu=8GB'")
    parser.add_argument("--fast-path", action="store_true")
    parser.add_argument("--fast-path-compile", action="store_true", help="GPU: also compile the graphed decode step")
    parser.add_argument("--trust-remote-code", action="store_true")


def load_spec_from(args: argparse.Namespace) -> LoadSpec:
    quant = QuantSpec(mode=args.quant, compute_dtype=args.compute_dtype, double_quant=args.double_quant,
                      quant_storage=args.quant_storage, int8_threshold=args.int8_threshold,
                      skip_modules=tuple(s.strip() for s in args.skip_modules.split(",") if s.strip()),
                      fp32_cpu_offload=args.fp32_cpu_offload)
    return LoadSpec(model=parse_model(args.model), revision=args.revision or None, dtype=args.dtype, quant=quant,
                    device_map=parse_device_map(args.device_map), max_memory=parse_max_memory(args.max_memory),
                    fast_path=args.fast_path, fast_path_compile=args.fast_path_compile,
                    trust_remote_code=args.trust_remote_code)


def _plan(args: argparse.Namespace) -> int:
    from core.placement import plan

    result = plan(load_spec_from(args))
    print(f"kind     {result.kind}")
    for device, modules, size in result.table():
        print(f"{device:8} {size / 2**20:10.1f} MiB  {modules}")
    print(f"total    {result.total_bytes / 2**20:10.1f} MiB")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from core import generation
    from core.engine import Engine

    loaded = Engine().load(load_spec_from(args), progress=lambda f, m: print(f"[{f:4.0%}] {m}", file=sys.stderr))
    spec = GenerationSpec(max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                          seed=args.seed)
    result = generation.generate(loaded, args.prompt, spec)
    for text in result.texts:
        print(text)
    print(json.dumps({"footprint_bytes": loaded.report.footprint_bytes, **result.metrics.__dict__}), file=sys.stderr)
    return 0


def _save(args: argparse.Namespace) -> int:
    from core import hub
    from core.engine import Engine

    loaded = Engine().load(load_spec_from(args))
    result = hub.save(loaded, args.out)
    print(f"saved to {result.folder}: {', '.join(result.files)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("plan", help="where each module would go, without loading weights")
    _add_load_options(plan)
    plan.set_defaults(run=_plan)
    gen = commands.add_parser("generate", help="load a model and generate")
    _add_load_options(gen)
    gen.add_argument("prompt", nargs="+")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--greedy", action="store_true")
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(run=_generate)
    save = commands.add_parser("save", help="load, reverse the fast path and save a checkpoint")
    _add_load_options(save)
    save.add_argument("--out", required=True)
    save.set_defaults(run=_save)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except EngineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
