"""Serving benchmark: N visitors at once through the model worker (or a running app), batched and one at a time.

For each model and quantization it loads the model once into a real core.worker.Worker (the fast path on
a GPU), then for each number of streams sends N chats, all together or arriving as a Poisson process,
first with the running batch and then with the worker held to one request at a time (APP_MAX_BATCH=1),
in the same run. Per row: aggregate tokens/s (all new tokens over the wall time from the first arrival
to the last answer), per-stream decode tokens/s (mean over requests), time to first token p50 and p95
(from each request's arrival), and peak memory.

    python benchmarks/serve.py --model embedded --streams 1,4,8 --new 32            # the CPU
    python benchmarks/serve.py --model llama8b --quant none,int8,nf4 --streams 1,4,8,16,32 --new 128 \\
        --prompt-len 128 --tokenizer .whl/tokenizer                               # a GPU (random 8B weights)
    python benchmarks/serve.py --model embedded --streams 1 --new 48 --turns 5      # a later turn's first token
    python benchmarks/serve.py --model embedded --streams 1,8 --new 48 --transformers  # beside generate_batch
    python benchmarks/serve.py --app http://127.0.0.1:7860/ --key $APP_API_KEY --streams 1,8   # a running app

Random-weight models say nothing of answers; their speed is the point. A table is printed; --results appends
it to a Markdown file and --json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import timeline  # noqa: E402
from core.serving.batch import StepTimes  # noqa: E402
from core.serving.requests import ChatRequest, prompt_ids  # noqa: E402
from core.spec import GenerationSpec, LoadSpec, QuantSpec, parse_device_map  # noqa: E402
from core.worker import Chunk, Worker  # noqa: E402

TOPICS = ["a lighthouse keeper", "a dragon", "the sea", "a city at night", "a robot", "a garden", "the moon",
          "a train journey"]


@dataclass
class Row:
    model: str
    quant: str
    serving: str  # "batched" or "one at a time"
    arrivals: str  # "together" or "poisson R/s"
    streams: int
    aggregate_tok_s: float
    per_stream_tok_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    peak_mib: float


@dataclass
class Timing:
    arrived: float
    first: float | None = None
    ended: float | None = None
    tokens: int = 0


def arrivals(streams: int, poisson_rate: float | None, seed: int = 0) -> list[float]:
    if poisson_rate is None:
        return [0.0] * streams
    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(streams):
        times.append(now)
        now += rng.expovariate(poisson_rate)
    return times


def drive(count: int, offsets: list[float], follow) -> list[Timing]:
    """Starts `follow(timing, i)` for each request at its arrival offset, on its own thread; returns the timings."""
    timings = [Timing(0.0) for _ in range(count)]
    start = time.perf_counter()

    def arrive(i: int) -> None:
        delay = start + offsets[i] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        timing = timings[i]
        timing.arrived = time.perf_counter()
        follow(timing, i)
        timing.ended = time.perf_counter()
        timing.first = timing.first or timing.ended

    threads = [threading.Thread(target=arrive, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return timings


def through_worker(worker: Worker, prompts: list, spec: GenerationSpec, offsets: list[float]) -> list[Timing]:
    def follow(timing: Timing, i: int) -> None:
        job = worker.submit_chat(ChatRequest(prompts[i], spec))
        job.wait(poll=0.05)
        # The first token, not the first text (a streamer holds text back to a word's end, and random weights may not
        # write one for many tokens): the answer's own clock says how long before its end the first token came.
        metrics, timing.ended = job.result.metrics, time.perf_counter()
        timing.first, timing.tokens = timing.ended - (metrics.total_s - metrics.ttft_s), metrics.new_tokens

    return drive(len(prompts), offsets, follow)


def through_app(url: str, key: str | None, prompts: list, spec: GenerationSpec, offsets: list[float]) -> list[Timing]:
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    model = httpx.get(f"{url}v1/models", headers=headers, timeout=30).json()["data"][0]["id"]

    def follow(timing: Timing, i: int) -> None:
        body = {"model": model, "messages": prompts[i], "max_tokens": spec.max_new_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{url}v1/chat/completions", json=body, headers=headers, timeout=600) as reply:
            for line in reply.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and timing.first is None:
                    timing.first = time.perf_counter()
                if chunk.get("usage"):
                    timing.tokens = chunk["usage"]["completion_tokens"]

    return drive(len(prompts), offsets, follow)


QUESTIONS = ["Tell me about lighthouses.", "Who keeps them?", "What do they eat?", "How do they spend winter?",
             "Write them a short poem."]


def through_generate(worker: Worker, prompt: list, spec: GenerationSpec) -> Timing:
    """One prompt through transformers' generate() on the loaded model (its fast path), as the app ran before the
    running batch: the lone visitor's yardstick."""
    from core import generation

    result = worker.run(lambda engine, job: generation.generate(engine.current, [prompt], spec), "generate()")
    metrics = result.metrics
    return Timing(0.0, metrics.ttft_s, metrics.total_s, metrics.new_tokens)


def through_transformers(worker: Worker, prompts: list, spec: GenerationSpec) -> list[Timing]:
    """The same prompts through transformers' own continuous batching (`generate_batch`, its defaults), all at once,
    as an exclusive job on the worker's model: the library's answer to many visitors, beside the running batch."""
    from transformers import GenerationConfig

    def run(engine, job) -> list[Timing]:
        loaded = engine.current
        ids = [prompt_ids(loaded, p, spec, None) for p in prompts]
        config = GenerationConfig(max_new_tokens=spec.max_new_tokens, do_sample=False,
                                  eos_token_id=loaded.model.generation_config.eos_token_id,
                                  pad_token_id=loaded.tokenizer.pad_token_id or 0)
        started = time.perf_counter()
        outputs = loaded.model.generate_batch(inputs=ids, generation_config=config, record_timestamps=True)
        ended = time.perf_counter()
        return [Timing(started, (out.timestamps or [ended])[0], (out.timestamps or [ended])[-1],
                       len(out.generated_tokens)) for out in outputs.values()]

    return worker.run(run, "transformers generate_batch")


def ask(worker: Worker, conversation: list, spec: GenerationSpec) -> tuple[str, float]:
    """One chat turn through the worker: its answer and its time to first token."""
    started, first = time.perf_counter(), None
    job = worker.submit_chat(ChatRequest(list(conversation), spec))
    for event in job.follow(poll=0.002):
        if isinstance(event, Chunk) and first is None:
            first = time.perf_counter()
    return job.result.text, (first or time.perf_counter()) - started


def later_turn(worker: Worker, spec: GenerationSpec, turns: int, repeats: int = 3) -> tuple[float, float, int]:
    """Time to first token of a chat's turn `turns`: with its earlier turns' keys and values kept by the running
    batch (the normal path), and re-prefilled whole (after an exclusive job, which starts the batch afresh).
    Medians over `repeats`; also the last turn's prompt length in tokens."""
    kept, fresh = [], []
    for _ in range(repeats):
        set_rows(worker, worker.max_batch)  # an exclusive job: nothing kept
        conversation: list = []
        for question in QUESTIONS[:turns - 1]:
            conversation.append({"role": "user", "content": question})
            answer, _ = ask(worker, conversation, spec)
            conversation.append({"role": "assistant", "content": answer})
        conversation.append({"role": "user", "content": QUESTIONS[turns - 1]})
        kept.append(ask(worker, conversation, spec)[1])
        set_rows(worker, worker.max_batch)
        fresh.append(ask(worker, conversation, spec)[1])
    length = worker.run(lambda engine, job: len(prompt_ids(engine.current, conversation, spec, None)), "count")
    return statistics.median(kept), statistics.median(fresh), length


def summarize(timings: list[Timing]) -> tuple[float, float, float, float]:
    wall = max(t.ended for t in timings) - min(t.arrived for t in timings)
    aggregate = sum(t.tokens for t in timings) / wall
    per_stream = statistics.mean((t.tokens - 1) / (t.ended - t.first) for t in timings
                                 if t.tokens > 1 and t.ended > t.first)
    ttfts = sorted(t.first - t.arrived for t in timings)
    p95 = ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]
    return aggregate, per_stream, statistics.median(ttfts), p95


def prompts_for(count: int, length: int, tokenizer=None, run: str = "") -> list:
    """`count` distinct requests of about `length` tokens; `run` makes them differ from every other run's from their
    first token, so that none continues a conversation the batch has kept (each is a new visitor)."""
    prompts = []
    for i in range(count):
        text = f"{run}Visitor {i}: write a long story about {TOPICS[i % len(TOPICS)]}."
        if length and tokenizer is not None:  # pad the request to about `length` tokens
            filler = " ".join(["Once upon a time there was a story."] * (length // 8 + 1))
            text = tokenizer.decode(tokenizer(text + " " + filler)["input_ids"][:length])
        prompts.append([{"role": "user", "content": text}])
    return prompts


def ignore_end_token(model) -> None:
    """Random weights choose the end token by chance, ending some streams after a few tokens; a throughput measurement
    runs every stream its full length (vLLM's benchmarks: ignore_eos)."""
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None


def set_rows(worker: Worker, max_batch: int) -> None:
    """Serve with at most `max_batch` requests together (the worker re-reads its limit after any exclusive job)."""
    worker.max_batch = max_batch
    worker.run(lambda engine, job: None, "re-read the batch limit")


def peak_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_model(args, model: str, quant: str) -> list[Row]:
    device = args.device
    path = model
    if model in ("llama8b", "smol"):
        from benchmarks.decode import random_checkpoint

        path = str(random_checkpoint(model, Path(args.work), Path(args.tokenizer) if args.tokenizer else None))
    elif model == "embedded":
        path = LoadSpec().model
    spec = LoadSpec(model=path, dtype="bfloat16" if device == "cuda" else "float32", quant=QuantSpec(mode=quant),
                    device_map=parse_device_map("cuda:0" if device == "cuda" else "cpu"),
                    fast_path=device == "cuda", fast_path_compile=args.compile)
    worker = Worker(max_pending=256, max_batch=max(args.streams))
    worker.run(lambda engine, job: engine.load(spec), "load")
    if model in ("llama8b", "smol"):
        worker.run(lambda engine, job: ignore_end_token(engine.current.model), "ignore the end token")
    print(f"# {model} {quant}: {worker.snapshot.fast_path.summary()}\n# {worker.serving.note}", flush=True)
    tokenizer = worker.run(lambda engine, job: engine.current.tokenizer, "tokenizer")
    generation = GenerationSpec(greedy=True, max_new_tokens=args.new, use_chat_template=model == "embedded")
    rows = []
    warm = prompts_for(max(args.streams), args.prompt_len, tokenizer, "Warm-up. ")
    for _ in range(2):  # the first run captures generate()'s own graph (its first length resets every graph)
        alone = through_generate(worker, warm[0], generation)
    rows.append(Row(model, quant, "generate()", "alone", 1, *summarize([alone]), peak_mib(device)))
    print(table(rows[-1:], header=len(rows) == 1), flush=True)
    for n in sorted({1, *args.streams}):  # warm-up: captures the graph of every batch bucket at the measured length
        through_worker(worker, warm[:n], generation, [0.0] * n)
    if args.timeline and device == "cuda":
        step = replace(generation, max_new_tokens=32)
        print(f"# generate() alone: {timeline(lambda: through_generate(worker, warm[0], step))}", flush=True)
        for n in sorted({1, max(args.streams)}):
            text = timeline(lambda: through_worker(worker, warm[:n], step, [0.0] * n))
            print(f"# running batch, {n} together: {text}", flush=True)
    servings = (("batched", max(args.streams)), ("one at a time", 1))
    for serving, limit in [s for s in servings if s[0].split()[0] in args.servings.split(",")]:
        set_rows(worker, limit)
        if limit == 1:  # a new batch of one row: its graph captured before it is timed
            through_worker(worker, warm[:1], generation, [0.0])
        for streams in args.streams:
            for rate in [None, *([args.rate] if args.rate else [])]:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                arriving = "together" if rate is None else f"poisson {rate:g}/s"
                prompts = prompts_for(streams, args.prompt_len, tokenizer, f"{serving}, {streams} {arriving}. ")
                if worker._batch is not None:
                    worker._batch.times = StepTimes()
                timings = through_worker(worker, prompts, generation, arrivals(streams, rate))
                rows.append(Row(model, quant, serving, arriving, streams, *summarize(timings), peak_mib(device)))
                print(table(rows[-1:], header=len(rows) == 1), flush=True)
                if worker._batch is not None:
                    print(f"# {worker._batch.times.summary()}", flush=True)
    if args.transformers:  # last: the library sets its own attention implementation while it runs
        for streams in args.streams:
            prompts = prompts_for(streams, args.prompt_len, tokenizer, f"transformers, {streams}. ")
            through_transformers(worker, prompts[:1], generation)  # its first call captures its graphs
            rows.append(Row(model, quant, "transformers generate_batch", "together", streams,
                            *summarize(through_transformers(worker, prompts, generation)), peak_mib(device)))
            print(table(rows[-1:], header=len(rows) == 1), flush=True)
    if args.turns:
        set_rows(worker, max(args.streams))
        kept, fresh, length = later_turn(worker, generation, args.turns)
        print(f"# turn {args.turns} of one chat ({length} prompt tokens): time to first token {kept * 1000:.1f} ms "
              f"with its earlier turns kept, {fresh * 1000:.1f} ms re-prefilled ({fresh / kept:.2f}x)", flush=True)
    worker.run(lambda engine, job: engine.unload(), "unload")
    return rows


def table(rows: list[Row], header: bool = True) -> str:
    lines = (["| model | quant | serving | arrivals | streams | aggregate tok/s | per-stream tok/s | TTFT p50 s | "
              "TTFT p95 s | peak MiB |", "|---|---|---|---|---|---|---|---|---|---|"] if header else [])
    for r in rows:
        lines.append(f"| {r.model} | {r.quant} | {r.serving} | {r.arrivals} | {r.streams} | {r.aggregate_tok_s:.1f} | "
                     f"{r.per_stream_tok_s:.1f} | {r.ttft_p50_s:.3f} | {r.ttft_p95_s:.3f} | {r.peak_mib:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded", help="embedded, smol, llama8b or a path (comma-separated)")
    parser.add_argument("--quant", default="none")
    parser.add_argument("--streams", default="1,4,8")
    parser.add_argument("--rate", type=float, default=0.0, help="also Poisson arrivals at this rate (requests/s)")
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--turns", type=int, default=0, help="also a chat's turn N (up to 5): time to first token "
                        "with its earlier turns kept, and re-prefilled")
    parser.add_argument("--transformers", action="store_true", help="also transformers' continuous batching "
                        "(generate_batch) on the same prompts, in the same run")
    parser.add_argument("--compile", action="store_true", help="the fast path's graphed steps of a compiled forward "
                        "(fast_path_compile: a compile per batch bucket)")
    parser.add_argument("--servings", default="batched,one", help="batched, one (at a time), or both")
    parser.add_argument("--timeline", action="store_true", help="also trace 32 tokens of generate() alone and of the "
                        "running batch at 1 and the most streams: where a step's time goes")
    parser.add_argument("--prompt-len", type=int, default=0, help="pad prompts to about this many tokens")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", default="/tmp/llm-bench")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--app", default=None, help="a running app's URL: measure through its /v1 instead")
    parser.add_argument("--key", default=None)
    parser.add_argument("--results", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.streams = [int(s) for s in args.streams.split(",")]
    rows: list[Row] = []
    if args.app:
        spec = GenerationSpec(greedy=True, max_new_tokens=args.new)
        for streams in args.streams:
            for rate in [None, *([args.rate] if args.rate else [])]:
                timings = through_app(args.app, args.key, prompts_for(streams, 0, run=f"{streams} {rate}. "), spec,
                                      arrivals(streams, rate))
                rows.append(Row("app", "as loaded", "batched", "together" if rate is None else f"poisson {rate:g}/s",
                                streams, *summarize(timings), float("nan")))
                print(table(rows[-1:], header=len(rows) == 1), flush=True)
    else:
        for model in args.model.split(","):
            for quant in args.quant.split(","):
                rows += run_model(args, model, quant)
                if args.json:
                    Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    text = table(rows)
    print("\n" + text)
    if args.results:
        with open(args.results, "a") as out:
            out.write(text + "\n")


if __name__ == "__main__":
    main()
