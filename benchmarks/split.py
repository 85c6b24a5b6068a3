"""Split placement on real GPUs: device_map="auto" with a per-device max_memory budget.

For each quantization it plans (core.placement), loads through core under a budget that forces a
split, and checks: the placement equals the plan, each GPU stays within its budget, and greedy
output equals the run on one device with no budget. With two or more GPUs the budget splits the
model across GPU 0 and GPU 1; with one GPU it splits it across GPU 0 and the CPU (CPU offload).
Decode speed is reported against the unsplit run.

    python benchmarks/split.py --model llama8b --quant int8,fp4,nf4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.decode import random_checkpoint  # noqa: E402
from core import generation, loading, placement  # noqa: E402
from core.spec import EMBEDDED_MODEL, GenerationSpec, LoadSpec, QuantSpec, parse_device_map  # noqa: E402

GREEDY = GenerationSpec(greedy=True, max_new_tokens=32, use_chat_template=False)
PROMPT = "The capital of France is"


def budget_for(total_bytes: int, gpus: int) -> dict:
    """About 70% of the weights on GPU 0 and the rest on GPU 1 (or the CPU, with one GPU).

    70% because GPU 0 also holds the embeddings, which bitsandbytes leaves in 16-bit: on a small
    4-bit model they alone are half of the footprint.
    """
    first = int(total_bytes * 0.7)
    if gpus >= 2:
        return {0: first, 1: int(total_bytes * 1.5)}
    return {0: first, "cpu": int(total_bytes * 3)}


def gpu_bytes_by_device(model) -> dict[int, int]:
    sizes: dict[int, int] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.device.type == "cuda":
            sizes[tensor.device.index] = sizes.get(tensor.device.index, 0) + tensor.numel() * tensor.element_size()
    return sizes


def run_one(model: str, quant: str, gpus: int) -> str:
    single = loading.load(LoadSpec(model=model, dtype="bfloat16", quant=QuantSpec(mode=quant),
                                   device_map=parse_device_map("cuda:0")))
    reference = generation.generate(single, [PROMPT], GREEDY, min_new_tokens=32)
    total = single.report.footprint_bytes
    del single
    torch.cuda.empty_cache()

    budget = budget_for(total, gpus)
    spec = LoadSpec(model=model, dtype="bfloat16", max_memory=tuple(budget.items()),
                    quant=QuantSpec(mode=quant, fp32_cpu_offload=gpus < 2 and quant != "none"))
    planned = placement.plan(spec)
    split = loading.load(spec)
    actual = split.report.device_map
    same_place = actual == planned.device_map
    on_gpu = gpu_bytes_by_device(split.model)
    within = all(on_gpu.get(d, 0) <= b for d, b in budget.items() if isinstance(d, int))
    result = generation.generate(split, [PROMPT], GREEDY, min_new_tokens=32)
    same = result.token_ids == reference.token_ids
    devices = ", ".join(f"{placement.device_label(d)} {b / 2**20:.0f} MiB"
                        for d, b in sorted(planned.bytes_per_device.items(), key=lambda kv: str(kv[0])))
    row = (f"| {Path(model).name} | {quant} | {devices} | {'yes' if same_place else 'NO'} | "
           f"{'yes' if within else 'NO'} ({', '.join(f'cuda:{d} {b / 2**20:.0f} MiB' for d, b in on_gpu.items())}) | "
           f"{'yes' if same else 'NO'} | {reference.metrics.decode_tokens_per_s:.1f} | "
           f"{result.metrics.decode_tokens_per_s:.1f} |")
    del split
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smol", help="embedded, smol or llama8b")
    parser.add_argument("--quant", default="int8,fp4,nf4")
    parser.add_argument("--work", default="/tmp/llm-bench")
    parser.add_argument("--tokenizer", default=None)
    args = parser.parse_args()
    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise SystemExit("needs at least one GPU")
    model = EMBEDDED_MODEL if args.model == "embedded" else str(
        random_checkpoint(args.model, Path(args.work), Path(args.tokenizer) if args.tokenizer else None))
    print(f"\n{gpus} GPU(s): {torch.cuda.get_device_name(0)}; split across "
          f"{'GPU 0 and GPU 1' if gpus >= 2 else 'GPU 0 and the CPU (one GPU)'}\n")
    print("| model | quant | planned bytes per device | placement = plan | GPUs within budget | greedy = one device "
          "| tok/s one device | tok/s split |")
    print("|---|---|---|---|---|---|---|---|")
    for quant in args.quant.split(","):
        try:
            print(run_one(model, quant, gpus), flush=True)
        except Exception as error:  # one failing mode is a row, not the end of the run
            import traceback

            where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}"
                                for f in reversed(traceback.extract_tb(error.__traceback__)[-6:]))
            print(f"| {args.model} | {quant} | failed: {type(error).__name__}: {str(error)[:120]} ({where}) "
                  "| | | | | |")


if __name__ == "__main__":
    main()
