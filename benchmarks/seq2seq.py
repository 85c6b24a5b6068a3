"""Encoder-decoder benchmark (T5): footprint, peak memory, decode speed, and the fit estimate against the peak.

    python benchmarks/seq2seq.py --shapes t5-11b --tokenizer .whl/tokenizer --results t5.md --json t5.json  # GPU
    python benchmarks/seq2seq.py --shapes tiny --tokenizer <a folder with tokenizer.json>                  # CPU

Shapes: `t5-11b` (t5-11b's published config: d_model 1024, d_ff 65536, d_kv 128, 24 encoder + 24
decoder layers, 128 heads, vocab 32128) or `tiny` (a two-layer T5, seconds on a CPU). The weights are
random, made by transformers' own T5 initializer directly on the GPU in bf16 (no fp32 copy anywhere),
saved once with `save_pretrained(max_shard_size="5GB")` under --work (22.6 GB for t5-11b), and every
mode then loads through core from that folder, so quantization happens during `from_pretrained` as
it would for the real checkpoint. Random weights say nothing about quality; speed and memory depend
on shapes and bytes only. No T5 tokenizer can be downloaded where this runs, so the tokenizer given
stands in (its chat template dropped: T5 is text-to-text); for t5-11b the prompt is made only of
tokens below the model's vocabulary size.

For each mode (16-bit, int8, nf4): the fit estimate from the config before loading, the load,
footprint and memory allocated after it, then one greedy generation (prompt 128 tokens, 64 new,
`min_new_tokens` so nothing stops early, after a warm-up) per decode path in --paths:
- plain: transformers as loaded (fast path off);
- static cache: transformers' static cache for encoder-decoders (an EncoderDecoderCache of two
  StaticCaches), forced, without a CUDA graph;
- own kernels: the fast path's own Triton kernels (core.kernels: W8A16 for int8, the 4-bit GEMV,
  16-bit GEMVs) on the layers, forced, without a CUDA graph (int8 then computes as W8A16, not as
  LLM.int8(), so its tokens may differ); skipped where the kernels cannot run;
- fast path: core's automatic choice (`fastpath.choose`): on a GPU, the decoder step as a CUDA graph
  with the encoder's output and a cross-attention cache sized to the input, and the kernels where
  measured faster. Its warm-up decodes the measured length from the same input, so the graph is
  captured before the timed run (a new input length costs one capture at its first decode step).
The last table compares the fast path with the issue's targets (3x the plain rates of the earlier run).
Peak memory is the GPU's `max_memory_allocated` over the generation, less what was allocated before
the load; on the CPU it is the process RSS, and the estimate is not compared with it. Progress lines
go to stdout as each step ends; the tables to --results (Markdown, appended) and --json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core import fastpath, fit, generation, kernels, loading  # noqa: E402
from core.spec import GenerationSpec, LoadSpec, QuantSpec, parse_device_map  # noqa: E402

SHAPES = {
    "t5-11b": dict(d_model=1024, d_ff=65536, d_kv=128, num_layers=24, num_decoder_layers=24, num_heads=128,
                   vocab_size=32128, feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0,
                   eos_token_id=1, architectures=["T5WithLMHeadModel"]),  # as the original config lists it
    "tiny": dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=49152,
                 feed_forward_proj="gated-gelu", decoder_start_token_id=378, pad_token_id=2, eos_token_id=2,
                 architectures=["T5ForConditionalGeneration"]),
}
EARLIER = {"bf16": 10.7, "nf4": 34.3, "int8": 24.0}  # tok/s before the graph (RESULTS.md, 2026-11-25): targets' base
SEED_FP32_GB = 42  # the seed's claim for t5-11b in fp32; 8-bit "about a quarter" of it
GiB = 2**30
_started = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - _started:6.0f} s] {message}", flush=True)


@dataclass
class MemoryRow:
    mode: str
    load_s: float
    footprint: int  # bytes, get_memory_footprint()
    kept: str
    allocated: int  # GPU memory the load added (0 on the CPU)
    est_weights: int
    est_total: int  # weights + KV cache + activations, for prompt + new tokens
    peak: int  # the plain path's peak, less what was allocated before the load (GPU), or process RSS (CPU)


@dataclass
class DecodeRow:
    mode: str
    path: str
    ttft_ms: float
    tok_s: float
    peak: int
    same_greedy: str
    detail: str


def size(value: float) -> str:
    return f"{value / GiB:.2f} GiB" if value >= GiB else f"{value / 2**20:.1f} MiB"


def build_checkpoint(name: str, root: Path, tokenizer_dir: Path) -> Path:
    """The random checkpoint for `name`, built once (staged, then renamed, so a killed build is never reused)."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    target = root / name
    if (target / "config.json").is_file():
        say(f"reusing {target}")
        return target
    staging = root / f".staging-{name}"
    shutil.rmtree(staging, ignore_errors=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.device(device):  # parameters are created on the GPU in bf16: no fp32 copy, nothing on the CPU
        model = T5ForConditionalGeneration._from_config(T5Config(**SHAPES[name]), dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    seconds = time.perf_counter() - started
    say(f"built {name} on {device} in {dtype}: {params / 1e9:.2f} B parameters in {seconds:.0f} s")
    started = time.perf_counter()
    model.save_pretrained(staging, max_shard_size="5GB")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = None  # text-to-text, as T5 is
    tokenizer.save_pretrained(staging)
    (staging / "chat_template.jinja").unlink(missing_ok=True)
    size = sum(p.stat().st_size for p in staging.iterdir())
    say(f"saved {size / 1e9:.1f} GB in {time.perf_counter() - started:.0f} s")
    del model
    _free()
    staging.rename(target)
    return target


def _free() -> None:
    gc.collect()  # a model is freed only once its reference cycles are collected
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def prompt_text(tokenizer, vocab_size: int, length: int) -> str:
    """About `length` tokens of prose, every one of them below the model's vocabulary size."""
    text = ("The history of the city begins long before the first written records, when people settled by the "
            "river and traded with the towns along the coast. ") * 40
    ids = [i for i in tokenizer(text, add_special_tokens=False).input_ids if i < vocab_size][:length]
    return tokenizer.decode(ids)


def decode_paths(loaded, paths: list[str]) -> list[tuple[str, fastpath.FastPathChoice | None, str]]:
    """(path, choice to enable or None for plain, why skipped or "") for each path asked for."""
    attn = loaded.model.config._attn_implementation
    int8 = loaded.spec.quant.mode == "int8"
    missing = kernels.unavailable(loaded.input_device.type)
    every = {
        "plain": (None, ""),
        "static cache": (fastpath.FastPathChoice(attn, "static", "benchmark: transformers' static cache, no graph"),
                         ""),
        "own kernels": (fastpath.FastPathChoice(attn, None, "benchmark: the fast path's own kernels, no graph",
                                                kernels=True, quiet_int8_log=int8),
                        f"skipped: {missing}" if missing else ""),
        "fast path": (fastpath.choose(loaded), ""),
    }
    return [(name, *every[name]) for name in paths]


def measure(loaded, prompt: str, new: int) -> generation.GenerationResult:
    spec = GenerationSpec(greedy=True, max_new_tokens=new, use_chat_template=False)
    warm = new if fastpath.state(loaded).cuda_graph else 8  # a graph is captured per cache length: warm at this one
    generation.generate(loaded, [prompt], GenerationSpec(greedy=True, max_new_tokens=warm, use_chat_template=False),
                        min_new_tokens=warm)  # warm-up: cuBLAS, bitsandbytes, the static cache and its graph
    return generation.generate(loaded, [prompt], spec, min_new_tokens=new)


def run_mode(path: Path, quant: str, args, device: str) -> tuple[MemoryRow, list[DecodeRow]]:
    dtype = "bfloat16" if device == "cuda" else "float32"
    mode = {"bfloat16": "bf16", "float32": "fp32"}[dtype] if quant == "none" else quant
    spec = LoadSpec(model=str(path), dtype=dtype, quant=QuantSpec(mode=quant),
                    device_map=parse_device_map("cuda:0" if device == "cuda" else "cpu"))
    estimate = fit.estimate(spec, context_length=args.prompt_len + args.new).devices[0]
    _free()
    base = _allocated()
    started = time.perf_counter()
    loaded = loading.load(spec)
    load_s = time.perf_counter() - started
    allocated = _allocated() - base
    say(f"{mode}: loaded in {load_s:.0f} s, footprint {size(loaded.report.footprint_bytes)}, estimated weights "
        f"{size(estimate.weights)}")
    prompt = prompt_text(loaded.tokenizer, loaded.model.config.vocab_size, args.prompt_len)
    rows, plain_ids, plain_peak = [], None, 0
    for name, choice, skipped in decode_paths(loaded, args.paths.split(",")):
        fastpath.reverse(loaded)
        if skipped:
            rows.append(DecodeRow(mode, name, 0, 0, 0, "-", skipped))
            say(f"{mode} / {name}: {skipped}")
            continue
        try:
            if choice is not None:
                fastpath.enable(loaded, choice)
            state = fastpath.state(loaded)
            detail = (f"{state.attn_implementation}+{state.cache_implementation}"
                      + ("+graph" if state.cuda_graph else "") + ("+kernels" if state.kernels else ""))
            result = measure(loaded, prompt, args.new)
        except Exception as error:  # a failing path is a row, not the end of the run
            rows.append(DecodeRow(mode, name, 0, 0, 0, "-", f"{type(error).__name__}: {str(error)[:120]}"))
            say(f"{mode} / {name}: failed: {rows[-1].detail}")
            continue
        m = result.metrics
        peak = m.peak_memory_bytes - base if device == "cuda" else m.peak_memory_bytes
        if name == "plain":
            plain_ids, plain_peak = result.token_ids, peak
        same = "" if name == "plain" else ("yes" if result.token_ids == plain_ids else "no")
        rows.append(DecodeRow(mode, name, m.ttft_s * 1000, m.decode_tokens_per_s, peak, same, detail))
        say(f"{mode} / {name}: prompt {m.prompt_tokens} tokens, TTFT {m.ttft_s * 1000:.0f} ms, "
            f"{m.decode_tokens_per_s:.1f} tok/s, peak {size(peak)} ({detail})")
    fastpath.reverse(loaded)
    memory = MemoryRow(mode, load_s, loaded.report.footprint_bytes, loaded.report.kept_in_higher_precision,
                       allocated, estimate.weights, estimate.total, plain_peak)
    del loaded
    _free()
    return memory, rows


def seed_claim(path: Path, memory: list[MemoryRow]) -> list[str]:
    """The seed's claim beside the estimate from the config (fp32) and the measured footprints."""
    fp32 = fit.estimate(LoadSpec(model=str(path), dtype="float32", device_map=parse_device_map("cpu")),
                        context_length=1, with_fixes=False).devices[0].weights
    lines = ["| t5-11b | size | share of fp32 |", "|---|---|---|",
             f"| seed's claim, fp32 | {SEED_FP32_GB} GB | 100% |",
             f"| seed's claim, 8-bit (\"about a quarter\") | {SEED_FP32_GB / 4:.1f} GB | 25% |",
             f"| fp32, estimated from the config | {size(fp32)} | 100% |"]
    lines += [f"| {row.mode}, measured footprint | {size(row.footprint)} | {row.footprint / fp32:.0%} |"
              for row in memory]
    return lines


def tables(memory: list[MemoryRow], decode: list[DecodeRow], device: str) -> list[str]:
    gpu = device == "cuda"
    lines = ["| mode | load s | footprint | kept in higher precision | allocated after load | est. weights "
             "| est. weights / allocated | est. total | peak | est. total / peak |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in memory:
        weights = f"{r.est_weights / r.allocated:.3f}" if gpu and r.allocated else "n/a (CPU)"
        total = f"{r.est_total / r.peak:.3f}" if gpu and r.peak else "n/a (CPU: RSS)"
        lines.append(f"| {r.mode} | {r.load_s:.0f} | {size(r.footprint)} | {r.kept or '-'} | {size(r.allocated)} "
                     f"| {size(r.est_weights)} | {weights} | {size(r.est_total)} | {size(r.peak)} | {total} |")
    plain = {r.mode: r.tok_s for r in decode if r.path == "plain"}
    lines += ["", "| mode | decode path | TTFT ms | tok/s | vs plain | peak | greedy = plain | detail |",
              "|---|---|---|---|---|---|---|---|"]
    for r in decode:
        speedup = f"{r.tok_s / plain[r.mode]:.2f}x" if r.tok_s and plain.get(r.mode) else "-"
        lines.append(f"| {r.mode} | {r.path} | {r.ttft_ms:.0f} | {r.tok_s:.1f} | {speedup} | {size(r.peak)} | "
                     f"{r.same_greedy} | {r.detail} |")
    fast = [r for r in decode if r.path == "fast path" and r.tok_s and r.mode in EARLIER]
    if fast:
        lines += ["", "| mode | fast path tok/s | target (3x the earlier run's) | reached | greedy = plain |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r.mode} | {r.tok_s:.1f} | {3 * EARLIER[r.mode]:.1f} (3 x {EARLIER[r.mode]}) | "
                  f"{'yes' if r.tok_s >= 3 * EARLIER[r.mode] else 'no'} ({r.tok_s / EARLIER[r.mode]:.1f}x) | "
                  f"{r.same_greedy} |" for r in fast]
    return lines


def conditions(device: str, args) -> str:
    """One line: the machine, the library versions and the run's settings."""
    import bitsandbytes
    import transformers

    card = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return (f"{card}; torch {torch.__version__}, transformers {transformers.__version__}, bitsandbytes "
            f"{bitsandbytes.__version__}; {args.shapes} shapes, random weights; prompt {args.prompt_len} tokens, "
            f"{args.new} new, batch 1, greedy, one run after a warm-up (8 tokens; with a graph, the measured length)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="t5-11b", choices=list(SHAPES))
    parser.add_argument("--modes", default="none,nf4,int8",
                        help="none (bf16 on a GPU, fp32 on the CPU), nf4, int8 (the slowest, last)")
    parser.add_argument("--tokenizer", required=True, help="a folder with tokenizer files (the embedded model's)")
    parser.add_argument("--paths", default="plain,fast path",
                        help="decode paths: plain, static cache, own kernels, fast path (comma-separated)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--work", default="/tmp/llm-bench", help="where the random checkpoint is written once")
    parser.add_argument("--results", default=None, help="append the tables to this Markdown file")
    parser.add_argument("--json", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    say(conditions(device, args))
    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    path = build_checkpoint(args.shapes, root, Path(args.tokenizer))
    memory, decode = [], []
    for mode in args.modes.split(","):
        row, rows = run_mode(path, mode, args, device)
        memory.append(row)
        decode += rows
        write_json(args, device, memory, decode, partial=True)  # what a run cut short by a time limit still keeps
    claim = seed_claim(path, memory) if args.shapes == "t5-11b" else []
    text = "\n".join([f"\n### {time.strftime('%Y-%m-%d')}: T5 ({args.shapes}), encoder-decoder\n",
                      f"Conditions: {conditions(device, args)}\n", *tables(memory, decode, device), "", *claim, ""])
    print(text, flush=True)
    if args.results:
        with open(args.results, "a") as handle:
            handle.write(text)
    write_json(args, device, memory, decode, partial=False)


def write_json(args, device: str, memory: list[MemoryRow], decode: list[DecodeRow], partial: bool) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps({"conditions": conditions(device, args), "partial": partial,
                                               "memory": [asdict(r) for r in memory],
                                               "decode": [asdict(r) for r in decode]}, indent=1))


if __name__ == "__main__":
    main()
