"""Split placement on real GPUs, at fast-path speed: device_map="auto" with a per-device max_memory budget.

For each quantization, as the seed's multi-GPU example loads a model:
1. one GPU: load on GPU 0 alone, turn the fast path on (core's automatic choice) and time greedy decode;
2. split: plan (core.placement), load through core under a budget that puts about half of the weights on
   each of GPU 0 and GPU 1, and check that the placement equals the plan and each GPU stays within its
   budget; then time the fast path split (one CUDA graph over both GPUs, the kernels per GPU) and, with
   --plain, plain decode split, and compare greedy tokens with the one-GPU run's.
"kernel choices = one GPU" compares the kernels' per-shape winners (ours or the library's) of the two runs: an
lm_head placed as a device-map entry of its own keeps its library's kernel on a split model (its accelerate hook moves
its input from the other GPU), so it reads "no" wherever the one-GPU run chose ours for the lm_head.
With one GPU the budget splits the model across GPU 0 and the CPU (CPU offload): the fast path then
keeps the model as loaded, and says so. Decode is timed as benchmarks/decode.py times it (a warm-up at
the measured length, so graphs are captured before the timed run; the median of --repeats runs).
--report writes what the app shows for the first mode's split load (plan, fit check, load report, a chat's
metrics line), rendered by ui.render from core's results as the app renders them (no gradio needed).

    python benchmarks/split.py --model llama8b --quant none,int8,nf4 --tokenizer .whl/tokenizer --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.decode import measure, prompt_of, random_checkpoint  # noqa: E402
from core import fastpath, fit, generation, loading, placement  # noqa: E402
from core.spec import EMBEDDED_MODEL, LoadSpec, QuantSpec, parse_device_map  # noqa: E402


@dataclass
class Row:
    quant: str
    planned: str  # bytes per device, as planned
    same_place: bool
    within: bool
    on_gpu: str  # bytes per GPU after the load
    one_gpu_tok_s: float
    split_tok_s: float
    split_plain_tok_s: float
    same_greedy: bool
    same_choices: bool  # the kernels' per-shape choices (ours or the library's) equal the one-GPU run's
    same_greedy_plain: bool | None
    one_gpu_state: str
    split_state: str
    detail: str = ""

    @property
    def ratio(self) -> float:
        return self.split_tok_s / self.one_gpu_tok_s if self.one_gpu_tok_s else 0.0


def budget_for(total_bytes: int, gpus: int, first_bytes: int = 0) -> dict:
    """About half of the weights on each of GPU 0 and GPU 1; with one GPU, about 70% on it and the rest on the CPU.

    `first_bytes` must sit on GPU 0 whatever the split: the input embeddings, which bitsandbytes leaves in 16-bit
    (half of a small 4-bit model's footprint). GPU 0 gets them and half of the rest, over 0.9: transformers keeps a
    tenth of each GPU's budget in reserve for a quantized model.
    """
    if gpus >= 2:
        return {0: int((first_bytes + (total_bytes - first_bytes) / 2) / 0.9), 1: int(total_bytes * 1.5)}
    return {0: int(total_bytes * 0.7), "cpu": int(total_bytes * 3)}


def embedding_bytes(model) -> int:
    weight = model.get_input_embeddings().weight
    return weight.numel() * weight.element_size()


def gpu_bytes_by_device(model) -> dict[int, int]:
    sizes: dict[int, int] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.device.type == "cuda":
            sizes[tensor.device.index] = sizes.get(tensor.device.index, 0) + tensor.numel() * tensor.element_size()
    return sizes


def split_spec(model: str, quant: str, budget: dict, gpus: int) -> LoadSpec:
    return LoadSpec(model=model, dtype="bfloat16", max_memory=tuple(budget.items()),
                    quant=QuantSpec(mode=quant, fp32_cpu_offload=gpus < 2 and quant != "none"))


def kernel_choices(kernels: str) -> set[tuple[str, str]]:
    """(shape, winner) pairs from a fast-path state's kernel notes, without layer counts, GPUs and timings."""
    found = set()
    for part in re.split(r"[;.] ", kernels):
        match = re.match(r"(?:cuda:\d+: )?(?:\d+x )?(.+?): (ours|.+?') \(", part.strip())
        if match:
            found.add(match.groups())
    return found


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def timed(loaded, prompt: str, args) -> generation.GenerationResult:
    return measure(loaded, [prompt], args.new, args.repeats)


def run_one(model: str, quant: str, gpus: int, args, report: list[str] | None) -> Row:
    single = loading.load(LoadSpec(model=model, dtype="bfloat16", quant=QuantSpec(mode=quant),
                                   device_map=parse_device_map("cuda:0")))
    _free()
    prompt = prompt_of(single, args.prompt_len)
    total, first = single.report.footprint_bytes, embedding_bytes(single.model)
    one_state = fastpath.enable(single)
    one = timed(single, prompt, args)
    fastpath.reverse(single)
    del single
    _free()

    budget = budget_for(total, gpus, first)
    spec = split_spec(model, quant, budget, gpus)
    planned = placement.plan(spec)
    split = loading.load(spec)
    _free()
    on_gpu = gpu_bytes_by_device(split.model)
    plain = timed(split, prompt, args) if args.plain else None
    state = fastpath.enable(split)
    fast = timed(split, prompt, args)
    if report is not None:
        report += app_report(split, spec, planned, state, fast, gpus)
    fastpath.reverse(split)
    devices = ", ".join(f"{placement.device_label(d)} {b / 2**20:.0f} MiB"
                        for d, b in sorted(planned.bytes_per_device.items(), key=lambda kv: str(kv[0])))
    row = Row(quant=quant, planned=devices, same_place=split.report.device_map == planned.device_map,
              within=all(on_gpu.get(d, 0) <= b for d, b in budget.items() if isinstance(d, int)),
              on_gpu=", ".join(f"cuda:{d} {b / 2**20:.0f} MiB" for d, b in sorted(on_gpu.items())),
              one_gpu_tok_s=one.metrics.decode_tokens_per_s, split_tok_s=fast.metrics.decode_tokens_per_s,
              split_plain_tok_s=plain.metrics.decode_tokens_per_s if plain else 0.0,
              same_greedy=fast.token_ids == one.token_ids,
              same_choices=kernel_choices(state.kernels) == kernel_choices(one_state.kernels),
              same_greedy_plain=None if plain is None else plain.token_ids == one.token_ids,
              one_gpu_state=one_state.summary(), split_state=state.summary())
    del split
    _free()
    return row


def app_report(loaded, spec: LoadSpec, planned, state, result, gpus: int) -> list[str]:
    """What the app shows for this load, from core's results through ui.render (no gradio needed)."""
    from ui import render

    estimate = fit.estimate(spec, context_length=1024)
    by = render.answered_by(spec.model, loaded.report.quantization)
    return [f"#### {spec.quant.mode}: plan (Model tab)", "", render.plan(planned, gpus), "",
            "#### Will it fit?", "", render.fit_report(estimate, gpus), "",
            "#### Load report", "", render.load(loaded.report, state), "",
            "#### A chat's metrics line", "", render.metrics(result.metrics, state, by, stopped=False), ""]


def table(rows: list[Row], gpus: int) -> list[str]:
    lines = ["| quant | planned bytes per device | placement = plan | GPUs within budget | one GPU, fast path tok/s "
             "| split, fast path tok/s | split / one GPU | greedy = one GPU | kernel choices = one GPU "
             "| split, plain tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.detail:
            lines.append(f"| {r.quant} | failed: {r.detail} | | | | | | | | |")
            continue
        plain = f"{r.split_plain_tok_s:.1f}" + ("" if r.same_greedy_plain is None else
                                                f" (greedy = one GPU: {'yes' if r.same_greedy_plain else 'no'})")
        lines.append(f"| {r.quant} | {r.planned} | {'yes' if r.same_place else 'NO'} | "
                     f"{'yes' if r.within else 'NO'} ({r.on_gpu}) | {r.one_gpu_tok_s:.1f} | {r.split_tok_s:.1f} | "
                     f"{r.ratio:.2f} | {'yes' if r.same_greedy else 'no'} | {'yes' if r.same_choices else 'no'} | "
                     f"{plain if r.split_plain_tok_s else '-'} |")
    return lines


def conditions(args, gpus: int) -> str:
    import bitsandbytes
    import transformers

    return (f"{gpus} x {torch.cuda.get_device_name(0)}; torch {torch.__version__}, transformers "
            f"{transformers.__version__}, bitsandbytes {bitsandbytes.__version__}; {args.model} shapes, random bf16 "
            f"weights; prompt {args.prompt_len} tokens, {args.new} new, batch 1, greedy, median of {args.repeats} "
            "after a warm-up at the same length")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smol", help="embedded, smol or llama8b")
    parser.add_argument("--quant", default="none,int8,nf4")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--plain", action="store_true", help="also time plain decode on the split model")
    parser.add_argument("--work", default="/tmp/llm-bench")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--results", default=None, help="append the table (Markdown) here")
    parser.add_argument("--report", default=None, help="write the app's report text for the first mode here")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise SystemExit("needs at least one GPU")
    started = time.perf_counter()
    model = EMBEDDED_MODEL if args.model == "embedded" else str(
        random_checkpoint(args.model, Path(args.work), Path(args.tokenizer) if args.tokenizer else None))
    print(f"checkpoint ready in {time.perf_counter() - started:.0f} s; {conditions(args, gpus)}", flush=True)
    rows: list[Row] = []
    report: list[str] = []
    for quant in args.quant.split(","):
        try:
            rows.append(run_one(model, quant, gpus, args, report if not report else None))
        except Exception as error:  # one failing mode is a row, not the end of the run
            import traceback

            where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}"
                                for f in reversed(traceback.extract_tb(error.__traceback__)[-6:]))
            rows.append(Row(quant, "", False, False, "", 0, 0, 0, False, False, None, "", "",
                            detail=f"{type(error).__name__}: {str(error)[:160]} ({where})"))
            _free()
        print("\n".join(table(rows[-1:], gpus)[2:]), f"[{time.perf_counter() - started:.0f} s]", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"conditions": conditions(args, gpus),
                                                   "rows": [asdict(r) | {"ratio": r.ratio} for r in rows]}, indent=1))
    where = "GPU 0 and GPU 1" if gpus >= 2 else "GPU 0 and the CPU (one GPU)"
    states = [f"- {r.quant} split: {r.split_state}" for r in rows if r.split_state]
    text = "\n".join([f"\n### {time.strftime('%Y-%m-%d')}: split across {where}\n",
                      f"Conditions: {conditions(args, gpus)}", "", *table(rows, gpus), "", *states, ""])
    print(text, flush=True)
    if args.results:
        with open(args.results, "a") as handle:
            handle.write(text)
    if args.report and report:
        Path(args.report).write_text("\n".join(report))


if __name__ == "__main__":
    main()
