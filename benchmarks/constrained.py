"""Constrained decoding's cost per token, in one process: the same chats through the model worker with and without a
JSON-schema constraint, and the grammar's own work (mask + accept) replayed on the constrained answer's tokens.

    python benchmarks/constrained.py                                   # CPU, the embedded SmolLM2-135M
    python benchmarks/constrained.py --model smol --device cuda:0 --tokenizer .whl/tokenizer   # GPU, random weights

Per case: decode ms/token without and with the constraint (1 / the answer's decode rate, the median of --repeats),
the grammar's ms/token replayed alone (on the model's device: the mask goes to the row there), the schema's compile
time and the matcher's start, and, once, the tokenizer index (core.constrain.tokenizer_index). `smol` is SmolLM2-135M's
shapes with random weights (benchmarks/decode.py): its answers mean nothing, and a constrained one may run to
--tokens, which is what a cost per token needs. A table is printed; --results appends it to a Markdown file.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core import constrain, tools  # noqa: E402
from core.serving.requests import ChatRequest  # noqa: E402
from core.spec import EMBEDDED_MODEL, GenerationSpec, LoadSpec, parse_device_map  # noqa: E402
from core.worker import Worker  # noqa: E402

CITY = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30},
    "population": {"type": "integer", "minimum": 0, "maximum": 100_000_000}},
    "required": ["city", "country", "population"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}}


def cases() -> list[tuple[str, str, object]]:
    """(name, prompt, constraint), each constraint compiled and timed here."""
    built = []
    for name, prompt, make in (
            ("json_schema (city)", "Describe Paris as JSON.", lambda: constrain.compile_schema(CITY, "schema")),
            ("json_object", "Describe a cat as JSON.", lambda: constrain.compile_schema(constrain.ANY_OBJECT, "x")),
            ("forced tool call", "What is the weather in Paris?",
             lambda: tools.parse_tools([WEATHER], "required").constraint)):
        started = time.perf_counter()
        constraint = make()
        built.append((name, prompt, constraint, time.perf_counter() - started))
    return built


def answer(worker: Worker, prompt: str, tokens: int, constraint) -> tuple[float, tuple[int, ...]]:
    """ms per decoded token (after the first) and the answer's token ids."""
    spec = GenerationSpec(greedy=True, max_new_tokens=tokens, constraint=constraint)
    result = worker.submit_chat(ChatRequest([{"role": "user", "content": prompt}], spec)).wait()
    rate = result.metrics.decode_tokens_per_s
    return (1000 / rate if rate else float("nan")), result.token_ids


def replay(constraint, tokenizer, ids: tuple[int, ...], vocab: int, device: torch.device) -> tuple[float, float]:
    """The matcher's start (ms) and its mask + accept per token (ms), on a row of the model's device."""
    started = time.perf_counter()
    matcher = constraint.matcher(tokenizer)
    start_ms = (time.perf_counter() - started) * 1000
    row = torch.zeros(vocab, device=device)
    times = []
    for token in ids:
        started = time.perf_counter()
        masked = matcher.mask(row)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        matcher.accept(token)
        times.append(time.perf_counter() - started)
        assert not torch.isinf(masked[token]), "the answer's own token was masked"
        if matcher.is_terminated():
            break
    return start_ms, statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="embedded, smol (random weights) or a folder")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder for --model smol")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    model = EMBEDDED_MODEL if args.model == "embedded" else args.model
    if args.model == "smol":
        from benchmarks.decode import random_checkpoint

        model = str(random_checkpoint("smol", Path("/tmp/llm-bench"), args.tokenizer))
    worker = Worker(max_batch=1)
    worker.run(lambda engine, job: engine.load(LoadSpec(model=model, device_map=parse_device_map(args.device))),
               "load")
    loaded = worker.engine.current
    device = loaded.input_device
    vocab = loaded.model.config.vocab_size
    started = time.perf_counter()
    constrain.tokenizer_index(loaded.tokenizer)
    index_s = time.perf_counter() - started
    rows = []
    for name, prompt, constraint, compile_s in cases():
        answer(worker, prompt, 4, constraint)  # warm-up
        plain = [answer(worker, prompt, args.tokens, None)[0] for _ in range(args.repeats)]
        held = [answer(worker, prompt, args.tokens, constraint) for _ in range(args.repeats)]
        start_ms, grammar_ms = replay(constraint, loaded.tokenizer, held[0][1], vocab, device)
        plain_ms, held_ms = statistics.median(plain), statistics.median(ms for ms, _ in held)
        rows.append(f"| {name} | {plain_ms:.2f} | {held_ms:.2f} | {held_ms - plain_ms:+.2f} "
                    f"({(held_ms / plain_ms - 1) * 100:+.0f}%) | {grammar_ms:.3f} | {len(held[0][1])} | "
                    f"{compile_s * 1000:.1f} | {start_ms:.1f} |")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    table = "\n".join([
        f"Constrained decoding, {args.model} on {where}, greedy, {args.tokens} tokens at most, median of "
        f"{args.repeats}; tokenizer index built once in {index_s:.2f} s.", "",
        "| constraint | decode ms/token, free | constrained | difference | grammar alone, ms/token | tokens | "
        "compile ms | matcher start ms |", "|---|---|---|---|---|---|---|---|", *rows])
    print(table, flush=True)
    if args.results:
        with args.results.open("a") as out:
            out.write(table + "\n\n")


if __name__ == "__main__":
    main()
