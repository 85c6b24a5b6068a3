"""A thin command line over core: plan, generate (load and generate), save. Used by scripts and benchmarks.

    python -m core plan --model org/name --quant nf4 --max-memory "0=600MB,1=1GiB,cpu=8GB"
    python -m core generate --quant nf4 --greedy "What is the capital of France?"
    python -m core save --quant nf4 --out ./smollm2-nf4
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from core import load_form, logs
from core.errors import EngineError
from core.spec import GenerationSpec, LoadSpec


def _add_load_options(parser: argparse.ArgumentParser) -> None:
    """The load form's fields (core.load_form) as options, plus the launch-only --trust-remote-code."""
    for f in load_form.FIELDS:
        if f.kind is bool:
            parser.add_argument(f.option, dest=f.name, action="store_true", help=f.help)
        else:
            choices = f.choices if f.choices and not f.open_choices else None
            parser.add_argument(f.option, dest=f.name, type=f.kind, default=f.default, choices=choices, help=f.help)
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model's own code from its repo")


def load_spec_from(args: argparse.Namespace) -> LoadSpec:
    return load_form.spec_from(vars(args), trust_remote_code=args.trust_remote_code)


class ProgressBar:
    """One bar on stderr for a load, moved by core's progress callback (one call per tensor while weights load)."""

    def __init__(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=100, file=sys.stderr, bar_format="{l_bar}{bar}| {elapsed}", leave=False)

    def __call__(self, fraction: float, message: str) -> None:
        self.bar.set_description_str(message.split(":", 1)[0], refresh=False)
        self.bar.update(max(0, round(fraction * 100) - self.bar.n))

    def close(self) -> None:
        self.bar.close()


def _load(args: argparse.Namespace):
    from core.engine import Engine

    bar = ProgressBar()
    try:
        return Engine().load(load_spec_from(args), progress=bar)
    finally:
        bar.close()


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

    loaded = _load(args)
    spec = GenerationSpec(max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                          seed=args.seed)
    result = generation.generate(loaded, args.prompt, spec)
    for text in result.texts:
        print(text)
    print(json.dumps({"footprint_bytes": loaded.report.footprint_bytes, **result.metrics.__dict__}), file=sys.stderr)
    return 0


def _save(args: argparse.Namespace) -> int:
    from core import card, hub

    loaded = _load(args)
    result = hub.save(loaded, args.out, card.measure(loaded))
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
    logs.configure(logging.WARNING)  # results on stdout, the progress bar and warnings (each once) on stderr
    try:
        return args.run(args)
    except EngineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
