"""Generation with `model.generate()`: chat templates, batches, streaming with cancel, and metrics.

Named steps in the gpt-fast manner: `build_inputs` (template, tokenize, move to the model's input
device), `check_length` (the input cap), `generation_kwargs` (sampling controls), and `generate`, the
one body that composes them around `model.generate()`: a batch, or one prompt whose new text goes to a
callback as it comes (on the calling thread: the model worker's), stopped by a cancel event. Metrics
come from a streamer that timestamps the first new token: time to first token is prefill, the rest is
decode. Chats served together (core.serving) share these steps and the metrics, around their own
batched decode loop.

Encoder-decoder models (core.families) go through the same steps: the message is the encoder's
input, and generate() returns the decoder's sequence, which starts with one start token instead of
the prompt. Time to first token is then the encoder's pass plus the first decoder step; tokens/s
counts the decoder's steps after it, as for a causal model.
"""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer
from transformers.generation.streamers import BaseStreamer

from core import fastpath, tools
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
    cancelled: bool = False  # stopped by its cancel event before it ended by itself


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
    if spec.logprobs is not None and not 0 <= spec.logprobs <= MAX_TOP_LOGPROBS:
        raise SpecError("top_logprobs", spec.logprobs, f"use a whole number from 0 to {MAX_TOP_LOGPROBS}")


MAX_SEED = 2**32 - 1  # what numpy's generator, seeded by transformers' set_seed, accepts
MAX_TOP_LOGPROBS = 20  # OpenAI's bound


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
    templated = spec.use_chat_template and has_chat_template(loaded)
    extra: dict = {}
    if spec.tools or tools.has_tool_turns(messages):
        if loaded.family.is_encoder_decoder and not templated:
            raise SpecError("tools", len(spec.tools), "this text-to-text model reads only the last user message, so "
                                                      "it cannot be shown tools or their results; leave them out")
        messages, extra = tools.for_template(loaded.tokenizer if templated else None, messages, spec.tools)
    if templated:
        return loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
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


class FirstTokenClock(BaseStreamer):
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


class TextCallbackStreamer(TextStreamer):
    """Decodes new tokens as they come (whole words and characters only) and hands the text to `on_text`."""

    def __init__(self, tokenizer, clock: FirstTokenClock, on_text: Callable[[str], None]) -> None:
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


def _reset_peak() -> None:
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)


def peak_memory(device) -> tuple[int, str]:
    """The peak since the last reset: GPU memory allocated (all GPUs) when `device` is a GPU, else the process RSS."""
    if device.type == "cuda":
        return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())), "GPU allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process RSS"


def metrics_of(device, started: float, first_token_at: float | None, ended: float, prompt_tokens: int,
               new_tokens: int, batch: int) -> GenerationMetrics:
    first = first_token_at or ended
    decode_s = ended - first
    peak, kind = peak_memory(device)
    rate = batch * (new_tokens - 1) / decode_s if new_tokens > 1 and decode_s > 0 else 0.0
    return GenerationMetrics(prompt_tokens=prompt_tokens, new_tokens=new_tokens, batch_size=batch,
                             ttft_s=first - started, decode_tokens_per_s=rate, total_s=ended - started,
                             peak_memory_bytes=peak, peak_memory_kind=kind)


def seed_everything(spec: GenerationSpec) -> None:
    if spec.seed is not None:
        from transformers import set_seed

        set_seed(spec.seed)


def out_of_memory() -> OutOfMemoryError:
    return OutOfMemoryError("Out of memory while generating. Lower max_new_tokens or the batch size, turn the fast "
                            "path off (its static cache reserves the full length), or quantize to 4-bit.")


def generate(loaded: LoadedModel, prompts: Sequence[Prompt], spec: GenerationSpec = GenerationSpec(),
             min_new_tokens: int | None = None, on_text: Callable[[str], None] | None = None,
             cancel: threading.Event | None = None, max_input_tokens: int | None = None) -> GenerationResult:
    """Generates for a batch of prompts with `model.generate()`; returns texts, token ids and metrics.

    `on_text` (one prompt only) receives each new piece of text as it is decoded, on this thread; setting `cancel`
    stops generation after the current token. Every prompt is checked against the input cap
    (`max_input_tokens`, and what the context window leaves)."""
    validate_generation(spec)
    if not prompts:
        raise SpecError("prompts", prompts, "give at least one prompt")
    if on_text is not None and len(prompts) != 1:
        raise SpecError("prompts", len(prompts), "stream one prompt at a time")
    inputs = build_inputs(loaded, prompts, spec)
    check_length(loaded, inputs["input_ids"], spec, max_input_tokens)
    kwargs = generation_kwargs(loaded, spec)
    kwargs.update(fastpath.generate_kwargs(loaded, inputs["input_ids"], spec.max_new_tokens))
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    cancel = cancel or threading.Event()
    clock = FirstTokenClock()
    streamer = clock if on_text is None else TextCallbackStreamer(loaded.tokenizer, clock, on_text)
    seed_everything(spec)
    _reset_peak()
    try:
        with torch.inference_mode():
            output = loaded.model.generate(**inputs, **kwargs, streamer=streamer,
                                           stopping_criteria=StoppingCriteriaList([_CancelCriteria(cancel)]))
    except torch.OutOfMemoryError as error:
        raise out_of_memory() from error
    ended = time.perf_counter()
    prompt_len = inputs["input_ids"].shape[1]
    new = output[:, loaded.family.prompt_positions(prompt_len):]
    ids = tuple(tuple(_strip_padding(row.tolist(), loaded.tokenizer.pad_token_id)) for row in new)
    texts = tuple(loaded.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids)
    metrics = metrics_of(loaded.input_device, clock.started, clock.first_token_at, ended, prompt_len, new.shape[1],
                         new.shape[0])
    loaded.facts = replace(loaded.facts, last_metrics=metrics)
    return GenerationResult(texts=texts, token_ids=ids, metrics=metrics, cancelled=cancel.is_set())


def _strip_padding(row: list[int], pad: int | None) -> list[int]:
    while row and row[-1] == pad:
        row.pop()
    return row


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    stop = StopText(stops)
    return stop.feed(text) + stop.finish()
