"""The fit estimate (core.fit) against what a GPU really allocates: weights after load, peak during generate.

    python benchmarks/fit_check.py --model llama8b --quant none,nf4,int8 --context 2048

For each quantization: the estimate is computed before loading (from the config alone), then the
model loads on cuda:0 and generates a prompt of `context - new` tokens plus `new` tokens; the
weights are `torch.cuda.memory_allocated()` after the load and the peak is
`torch.cuda.max_memory_allocated()` over the generation.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.decode import random_checkpoint  # noqa: E402
from core import fit, generation, loading  # noqa: E402
from core.spec import EMBEDDED_MODEL, GenerationSpec, LoadSpec, QuantSpec, parse_device_map  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama8b")
    parser.add_argument("--quant", default="none,nf4,int8")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--work", default="/tmp/llm-bench")
    parser.add_argument("--tokenizer", default=None)
    args = parser.parse_args()
    model = EMBEDDED_MODEL if args.model == "embedded" else str(
        random_checkpoint(args.model, Path(args.work), Path(args.tokenizer) if args.tokenizer else None))
    print(f"\n{torch.cuda.get_device_name(0)}; {args.model}, context {args.context} ({args.new} new), batch 1\n")
    print("| quant | est. weights MiB | allocated after load MiB | ratio | est. total MiB | peak MiB | ratio |")
    print("|---|---|---|---|---|---|---|")
    for quant in args.quant.split(","):
        spec = LoadSpec(model=model, dtype="bfloat16", quant=QuantSpec(mode=quant),
                        device_map=parse_device_map("cuda:0"))
        estimate = fit.estimate(spec, context_length=args.context).devices[0]
        gc.collect()  # the previous model is only freed once its reference cycles are collected
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        loaded = loading.load(spec)
        weights = torch.cuda.memory_allocated() - before
        ids = loaded.tokenizer("The history of the city begins long before the first written records. " * 400,
                               add_special_tokens=False).input_ids[: args.context - args.new]
        prompt = loaded.tokenizer.decode(ids)
        torch.cuda.reset_peak_memory_stats()
        generation.generate(loaded, [prompt], GenerationSpec(greedy=True, max_new_tokens=args.new,
                                                             use_chat_template=False), min_new_tokens=args.new)
        peak = torch.cuda.max_memory_allocated() - before
        mib = 2**20
        print(f"| {quant} | {estimate.weights / mib:.0f} | {weights / mib:.0f} | {estimate.weights / weights:.3f} | "
              f"{estimate.total / mib:.0f} | {peak / mib:.0f} | {estimate.total / peak:.3f} |", flush=True)
        del loaded
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
