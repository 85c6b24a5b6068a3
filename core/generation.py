"""Generation with `model.generate()`: chat templates, batches, streaming with cancel, and metrics.

Named steps in the gpt-fast manner: `build_inputs` (template, tokenize, move to the model's input
device), `check_length` (the input cap), `generation_kwargs` (sampling controls), `generate` (a
batch, blocking), `stream_to` (one prompt, new text handed to a callback as it comes, on the calling
thread: the model worker's) and `stream` (the same as an iterator, for scripts). Metrics come from a
streamer that timestamps the first new token: time to first token is prefill, the rest is decode.

Encoder-decoder models (core.families) go through the same steps: the message is the encoder's
input, and generate() returns the decoder's sequence, which starts with one start token instead of
the prompt. Time to first token is then the encoder's pass plus the first decoder step; tokens/s
counts the decoder's steps after it, as for a causal model.
"""

from __future__ import annotations

import queue
import resource
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer
from transformers.generation.streamers import BaseStreamer

from core import fastpath
from core.errors import InputTooLongError, OutOfMemoryError, SpecError
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


class StopText:
    """Text as it may be shown while stop strings are in play: the answer ends before the first stop string, and a
    piece that could be the start of one is held back until the next piece tells."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            shown, self.pending, self.stopped = self.pending[:min(found)], "", True
            return shown
        hold = max((len(s) - 1 for s in self.stops), default=0)
        cut = len(self.pending) - hold
        shown, self.pending = self.pending[:max(cut, 0)], self.pending[max(cut, 0):]
        return shown

    def finish(self) -> str:
        rest, self.pending = ("" if self.stopped else self.pending), ""
        return rest


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
    if spec.seed is not None and not 0 <= spec.seed <= MAX_SEED:
        raise SpecError("seed", spec.seed, f"use -1 (random) or a whole number from 0 to {MAX_SEED}")
    if len(spec.stop) > 4 or any(not s or len(s) > 100 for s in spec.stop):
        raise SpecError("stop", list(spec.stop), "give up to 4 stop strings of 1 to 100 characters")


MAX_SEED = 2**32 - 1  # what numpy's generator, seeded by transformers' set_seed, accepts


def context_window(loaded: LoadedModel) -> int | None:
    """The longest sequence the model was trained for, when its config says (T5's relative positions set none)."""
    return getattr(loaded.model.config, "max_position_embeddings", None)


def check_length(loaded: LoadedModel, input_ids, spec: GenerationSpec, max_input_tokens: int | None) -> None:
    """Refuses a prompt longer than the cap: `max_input_tokens`, and what the context window leaves for the input
    (a causal model's window minus max_new_tokens; an encoder-decoder's whole input window)."""
    length = int(input_ids.shape[1])
    limits = []
    if max_input_tokens:
        limits.append((max_input_tokens, f"the app's limit (APP_MAX_INPUT_TOKENS={max_input_tokens})"))
    window = context_window(loaded)
    if window:
        limits.append(loaded.family.input_room(window, spec.max_new_tokens))
    for limit, why in sorted(limits):
        if length > limit:
            raise InputTooLongError(f"The input is {length:,} tokens; at most {max(limit, 0):,} fit: {why}. Shorten "
                                    "the message, clear or undo part of the chat, or lower max new tokens.")


CONSERVATIVE = GenerationSpec(greedy=True, temperature=0.7, top_p=0.9, top_k=50)
"""For models whose generation config sets no sampling: greedy, as transformers itself defaults to, with sampling
values ready for when greedy is turned off. Measured on the embedded SmolLM2-135M: its first answer token is nearly
a tie ("The" 15.2%, "L" 14.0%), so sampling answered the France question wrongly in 4 to 5 of 20 seeded runs at
every temperature from 0.7 down to 0.2 (0.1 still leaves "L" at 30%); greedy answers "Paris" every time."""


def defaults_from(loaded: LoadedModel) -> tuple[GenerationSpec, str]:
    """The sampling defaults for a loaded model, and a note saying where they came from."""
    config = loaded.model.generation_config
    own = config.to_diff_dict()  # only what the model's generation_config.json sets
    if not any(key in own for key in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")):
        return CONSERVATIVE, ("Sampling defaults: the model's generation config sets none, so greedy (transformers' "
                              "own default: the most likely answer). Turn Greedy off to sample with the values below.")
    spec = GenerationSpec(greedy=not config.do_sample, temperature=float(config.temperature or 1.0),
                          top_p=float(config.top_p or 1.0), top_k=int(config.top_k or 0),
                          repetition_penalty=float(config.repetition_penalty or 1.0))
    shown = ", ".join(f"{k} {own[k]}" for k in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
                      if k in own)
    return spec, f"Sampling defaults from the model's generation config ({shown})."


def has_chat_template(loaded: LoadedModel) -> bool:
    return bool(getattr(loaded.tokenizer, "chat_template", None))


def _as_text(loaded: LoadedModel, prompt: Prompt, spec: GenerationSpec) -> str:
    """The text the model reads. With a chat template (and `use_chat_template`): the conversation through it, for
    either kind of model. Without one, a causal model continues the conversation as plain text, the last message
    last; an encoder-decoder is text-to-text: its input is the last user message alone (earlier turns and the system
    prompt are left out, since such a model answers one input and was never trained on a transcript)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if spec.system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": spec.system_prompt})
    if spec.use_chat_template and has_chat_template(loaded):
        return loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if loaded.family.is_encoder_decoder:
        return next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
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
    if spec.stop:
        kwargs.update(stop_strings=list(spec.stop), tokenizer=loaded.tokenizer)
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


class _CallbackStreamer(TextStreamer):
    """Decodes new tokens as they come (whole words and characters only) and hands the text to `on_text`."""

    def __init__(self, tokenizer, clock: _FirstTokenClock, on_text: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.clock = clock
        self.on_text = on_text

    def put(self, value) -> None:
        self.clock.put(value)
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


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
    new = output[:, loaded.family.prompt_positions(prompt_len):]
    ids = tuple(tuple(_strip_padding(row.tolist(), loaded.tokenizer.pad_token_id)) for row in new)
    texts = tuple(loaded.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids)
    metrics = _metrics(loaded, clock, ended, prompt_len, new.shape[1], new.shape[0])
    loaded.facts["last_metrics"] = metrics
    return GenerationResult(texts=texts, token_ids=ids, metrics=metrics)


def _strip_padding(row: list[int], pad: int | None) -> list[int]:
    while row and row[-1] == pad:
        row.pop()
    return row


def stream_to(loaded: LoadedModel, prompt: Prompt, spec: GenerationSpec, on_text: Callable[[str], None],
              cancel: threading.Event | None = None, max_input_tokens: int | None = None) -> StreamUpdate:
    """Generates one answer on this thread, handing each new piece of text to `on_text`; setting `cancel` stops it
    after the current token. Returns the whole answer with its metrics."""
    validate_generation(spec)
    cancel = cancel or threading.Event()
    inputs = build_inputs(loaded, [prompt], spec)
    check_length(loaded, inputs["input_ids"], spec, max_input_tokens)
    clock = _FirstTokenClock()
    pieces: list[str] = []

    def collect(text: str) -> None:
        pieces.append(text)
        on_text(text)

    kwargs = generation_kwargs(loaded, spec)
    kwargs.update(fastpath.generate_kwargs(loaded, inputs["input_ids"], spec.max_new_tokens))
    _seed(spec)
    _reset_peak(loaded)
    try:
        with torch.inference_mode():
            output = loaded.model.generate(**inputs, **kwargs, streamer=_CallbackStreamer(loaded.tokenizer, clock,
                                                                                          collect),
                                           stopping_criteria=StoppingCriteriaList([_CancelCriteria(cancel)]))
    except torch.OutOfMemoryError as error:
        raise _oom(error) from error
    ended = time.perf_counter()
    prompt_len = inputs["input_ids"].shape[1]
    new_tokens = output.shape[1] - loaded.family.prompt_positions(prompt_len)
    metrics = _metrics(loaded, clock, ended, prompt_len, new_tokens, 1)
    loaded.facts["last_metrics"] = metrics
    return StreamUpdate(text="".join(pieces).strip(), done=True, metrics=metrics, cancelled=cancel.is_set())


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    stop = StopText(stops)
    return stop.feed(text) + stop.finish()


def stream(loaded: LoadedModel, prompt: Prompt, spec: GenerationSpec = GenerationSpec(),
           cancel: threading.Event | None = None) -> Iterator[StreamUpdate]:
    """`stream_to` as an iterator (generation runs on a helper thread): growing text, then the final update."""
    pieces: queue.Queue = queue.Queue()
    outcome: list = []

    def work() -> None:
        try:
            outcome.append(stream_to(loaded, prompt, spec, pieces.put, cancel))
        except BaseException as error:  # re-raised in the caller's thread below
            outcome.append(error)
        finally:
            pieces.put(None)

    threading.Thread(target=work, name="generate", daemon=True).start()
    text = ""
    for piece in iter(pieces.get, None):
        text += piece
        yield StreamUpdate(text=text, done=False)
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    yield outcome[0]
