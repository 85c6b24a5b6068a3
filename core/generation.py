"""Generation with `model.generate()`: chat templates, batches, streaming with cancel, and metrics.

Named steps in the gpt-fast manner: `build_inputs` (template, tokenize, move to the model's input
device), `generation_kwargs` (sampling controls), `generate` (a batch, blocking) and `stream`
(one prompt, token by token). Metrics come from a streamer that timestamps the first new token:
time to first token is prefill, the rest is decode.
"""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from core import fastpath
from core.errors import OutOfMemoryError, SpecError
from core.loading import LoadedModel
from core.spec import GenerationSpec

Message = Mapping[str, str]
Prompt = str | Sequence[Message]


@dataclass(frozen=True)
class GenerationMetrics:
    prompt_tokens: int
    new_tokens: int  # per sequence, the longest
    batch_size: int
    ttft_s: float  # time to first new token (prefill)
    decode_tokens_per_s: float  # new tokens after the first, all sequences, per second
    total_s: float
    peak_memory_bytes: int
    peak_memory_kind: str  # "GPU allocated" or "process RSS"

    def summary(self) -> str:
        return (f"TTFT {self.ttft_s * 1000:.0f} ms · {self.decode_tokens_per_s:.1f} tok/s · "
                f"{self.new_tokens} new tokens · "
                f"peak {self.peak_memory_kind} {self.peak_memory_bytes / 2**20:.0f} MiB")


@dataclass(frozen=True)
class GenerationResult:
    texts: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]
    metrics: GenerationMetrics


@dataclass(frozen=True)
class StreamUpdate:
    text: str  # everything generated so far
    done: bool
    metrics: GenerationMetrics | None = None
    cancelled: bool = False


def validate_generation(spec: GenerationSpec) -> None:
    if not 1 <= spec.max_new_tokens <= 8192:
        raise SpecError("max_new_tokens", spec.max_new_tokens, "use a number from 1 to 8192")
    if not spec.greedy and not 0.0 < spec.temperature <= 5.0:
        raise SpecError("temperature", spec.temperature, "use a value in (0, 5], or greedy decoding")
    if not 0.0 < spec.top_p <= 1.0:
        raise SpecError("top_p", spec.top_p, "use a value in (0, 1]")
    if spec.top_k < 0:
        raise SpecError("top_k", spec.top_k, "use 0 (off) or a positive number")
    if not 0.5 <= spec.repetition_penalty <= 3.0:
        raise SpecError("repetition_penalty", spec.repetition_penalty, "use 1.0 (off) or a value in [0.5, 3]")


def has_chat_template(loaded: LoadedModel) -> bool:
    return bool(getattr(loaded.tokenizer, "chat_template", None))


def _as_text(loaded: LoadedModel, prompt: Prompt, spec: GenerationSpec) -> str:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if spec.system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": spec.system_prompt})
    if spec.use_chat_template and has_chat_template(loaded):
        return loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # Raw completion: the conversation as plain text, the last message as the text to continue.
    return "\n".join(m["content"] for m in messages)


def build_inputs(loaded: LoadedModel, prompts: Sequence[Prompt], spec: GenerationSpec):
    texts = [_as_text(loaded, p, spec) for p in prompts]
    templated = spec.use_chat_template and has_chat_template(loaded)
    # A chat template already writes the BOS token where the model wants it.
    encoded = loaded.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not templated)
    return encoded.to(loaded.input_device)


def generation_kwargs(loaded: LoadedModel, spec: GenerationSpec) -> dict:
    kwargs: dict = dict(max_new_tokens=spec.max_new_tokens, repetition_penalty=spec.repetition_penalty,
                        pad_token_id=loaded.tokenizer.pad_token_id)
    if spec.greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k or None)
    return kwargs


class _FirstTokenClock(BaseStreamer):
    """Records when the first new token arrives (generate() first puts the prompt, then each step)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self._puts = 0

    def put(self, value) -> None:
        self._puts += 1
        if self._puts == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


class _TimedTextStreamer(TextIteratorStreamer):
    def __init__(self, tokenizer, clock: _FirstTokenClock, **kwargs) -> None:
        super().__init__(tokenizer, **kwargs)
        self.clock = clock

    def put(self, value) -> None:
        self.clock.put(value)
        super().put(value)


class _CancelCriteria(StoppingCriteria):
    def __init__(self, cancel: threading.Event) -> None:
        self.cancel = cancel

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.cancel.is_set(), dtype=torch.bool, device=input_ids.device)


def _reset_peak(loaded: LoadedModel) -> None:
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)


def _peak(loaded: LoadedModel) -> tuple[int, str]:
    if loaded.input_device.type == "cuda":
        return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())), "GPU allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process RSS"


def _metrics(loaded: LoadedModel, clock: _FirstTokenClock, ended: float, prompt_tokens: int,
             new_tokens: int, batch: int) -> GenerationMetrics:
    first = clock.first_token_at or ended
    decode_s = ended - first
    peak, kind = _peak(loaded)
    rate = batch * (new_tokens - 1) / decode_s if new_tokens > 1 and decode_s > 0 else 0.0
    return GenerationMetrics(prompt_tokens=prompt_tokens, new_tokens=new_tokens, batch_size=batch,
                             ttft_s=first - clock.started, decode_tokens_per_s=rate, total_s=ended - clock.started,
                             peak_memory_bytes=peak, peak_memory_kind=kind)


def _seed(spec: GenerationSpec) -> None:
    if spec.seed is not None:
        from transformers import set_seed

        set_seed(spec.seed)


def _oom(error: Exception) -> OutOfMemoryError:
    return OutOfMemoryError("Out of memory while generating. Lower max_new_tokens or the batch size, turn the fast "
                            "path off (its static cache reserves the full length), or quantize to 4-bit.")


def generate(loaded: LoadedModel, prompts: Sequence[Prompt], spec: GenerationSpec = GenerationSpec(),
             min_new_tokens: int | None = None) -> GenerationResult:
    """Generates for a batch of prompts; returns texts, token ids and metrics."""
    validate_generation(spec)
    if not prompts:
        raise SpecError("prompts", prompts, "give at least one prompt")
    inputs = build_inputs(loaded, prompts, spec)
    kwargs = generation_kwargs(loaded, spec)
    kwargs.update(fastpath.generate_kwargs(loaded, inputs["input_ids"], spec.max_new_tokens))
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    _seed(spec)
    _reset_peak(loaded)
    clock = _FirstTokenClock()
    try:
        with torch.inference_mode():
            output = loaded.model.generate(**inputs, **kwargs, streamer=clock)
    except torch.OutOfMemoryError as error:
        raise _oom(error) from error
    ended = time.perf_counter()
    prompt_len = inputs["input_ids"].shape[1]
    new = output[:, prompt_len:]
    ids = tuple(tuple(_strip_padding(row.tolist(), loaded.tokenizer.pad_token_id)) for row in new)
    texts = tuple(loaded.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids)
    metrics = _metrics(loaded, clock, ended, prompt_len, new.shape[1], new.shape[0])
    loaded.facts["last_metrics"] = metrics
    return GenerationResult(texts=texts, token_ids=ids, metrics=metrics)


def _strip_padding(row: list[int], pad: int | None) -> list[int]:
    while row and row[-1] == pad:
        row.pop()
    return row


def stream(loaded: LoadedModel, prompt: Prompt, spec: GenerationSpec = GenerationSpec(),
           cancel: threading.Event | None = None) -> Iterator[StreamUpdate]:
    """Streams one answer as it is generated; setting `cancel` stops it after the current token."""
    validate_generation(spec)
    cancel = cancel or threading.Event()
    inputs = build_inputs(loaded, [prompt], spec)
    clock = _FirstTokenClock()
    streamer = _TimedTextStreamer(loaded.tokenizer, clock, skip_prompt=True, skip_special_tokens=True, timeout=600)
    kwargs = generation_kwargs(loaded, spec)
    kwargs.update(fastpath.generate_kwargs(loaded, inputs["input_ids"], spec.max_new_tokens))
    failure: list[BaseException] = []
    output: list = []

    def work() -> None:
        try:
            with torch.inference_mode():
                output.append(loaded.model.generate(**inputs, **kwargs, streamer=streamer,
                                                    stopping_criteria=StoppingCriteriaList([_CancelCriteria(cancel)])))
        except BaseException as error:  # re-raised in the caller's thread below
            failure.append(error)
            streamer.end()

    _seed(spec)
    _reset_peak(loaded)
    thread = threading.Thread(target=work, name="generate", daemon=True)
    thread.start()
    text = ""
    for piece in streamer:
        text += piece
        yield StreamUpdate(text=text, done=False)
    thread.join()
    ended = time.perf_counter()
    if failure:
        if isinstance(failure[0], torch.OutOfMemoryError):
            raise _oom(failure[0]) from failure[0]
        raise failure[0]
    prompt_len = inputs["input_ids"].shape[1]
    new_tokens = output[0].shape[1] - prompt_len if output else 0
    metrics = _metrics(loaded, clock, ended, prompt_len, new_tokens, 1)
    loaded.facts["last_metrics"] = metrics
    yield StreamUpdate(text=text.strip(), done=True, metrics=metrics, cancelled=cancel.is_set())
