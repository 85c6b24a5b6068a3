"""One visitor's chat request, its life in the running batch, and what it returns.

`ChatRequest` is what a handler submits (frozen): the conversation, the sampling spec, the caps. The
worker turns it into a `RequestState`, which lives on the worker thread only: its prompt ids, its own
sampler (its own random generator, so a seed gives the same answer whoever else is chatting), its text
streamer, its stop strings, its constraint, and its state. A request's life, top to bottom:

    WAITING  -> PREFILL (its prompt alone, batch of one) -> first token
             -> DECODING (one token a step, in the running batch) -> FINISHED (EOS, a stop string, the length
                cap, or the constraint's end) or CANCELLED (Stop, a closed tab, a client that hung up)

Every token goes through `RequestState.choose` (the sampling controls, the constraint, the
log-probabilities) and `RequestState.accept` (the text it adds, stop strings, the end), whether the
request decodes alone or with fifteen others, so the answer is the one the visitor would get alone.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from core import generation
from core.fastpath import FastPathState
from core.generation import GenerationMetrics, Prompt
from core.spec import GenerationSpec


class Matcher(Protocol):
    """A constraint's state for one answer (core.constrain builds it from a grammar)."""

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """The scores of one row ([vocab]) with every token the constraint forbids now set to -inf."""

    def accept(self, token_id: int) -> None:
        """Advances past the chosen token."""

    def is_terminated(self) -> bool:
        """The answer is complete: the constraint allows nothing more."""


class Constraint(Protocol):
    def matcher(self, tokenizer) -> Matcher:
        """A fresh state for one answer, for the tokenizer of the model that answers it (a request queued behind a
        load is answered by the new model)."""


@dataclass(frozen=True)
class ChatRequest:
    """What a handler asks of the model: one answer to `prompt`, streamed."""

    prompt: Prompt
    spec: GenerationSpec
    visitor: str | None = None  # whose request it is (the per-visitor cap counts by it); None: the owner, no cap
    max_input_tokens: int | None = None  # the app's input cap (core.generation.check_length)
    model: str | None = None  # the model the client asked for (/v1); None: whichever is loaded

    def __post_init__(self):
        generation.validate_generation(self.spec)  # up front: a bad field is refused before it is queued


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()  # the most likely tokens at this step, most likely first


@dataclass(frozen=True)
class Piece:
    """New text of one answer, with the log-probabilities of the tokens it came from (when asked for)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


class Finish(enum.Enum):
    STOP = "stop"  # the model's end token, a stop string, or the constraint's end
    LENGTH = "length"  # max_new_tokens reached
    CANCELLED = "cancelled"  # Stop, or the client left


@dataclass(frozen=True)
class ChatResult:
    text: str  # the whole answer, ending before a stop string
    token_ids: tuple[int, ...]  # the answer's tokens, without the model's end token
    finish: Finish
    metrics: GenerationMetrics
    model: str  # the model that answered, and its quantization (or dtype): an answer keeps its author
    precision: str
    fast_path: FastPathState
    together: int  # the most requests answered in the same batch while this one ran (1: alone)
    logprobs: tuple[TokenLogprob, ...] = ()

    @property
    def cancelled(self) -> bool:
        return self.finish is Finish.CANCELLED


class Status(enum.Enum):
    WAITING = "waiting"
    DECODING = "decoding"
    FINISHED = "finished"


def sampling_processors(spec: GenerationSpec) -> LogitsProcessorList:
    """The processors generate() would use for these settings, in its order: penalty, then the warpers."""
    processors = LogitsProcessorList()
    if spec.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(spec.repetition_penalty))
    if not spec.greedy:
        if spec.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(spec.temperature))
        if spec.top_k:
            processors.append(TopKLogitsWarper(spec.top_k))
        if spec.top_p < 1.0:
            processors.append(TopPLogitsWarper(spec.top_p))
    return processors


@dataclass
class RequestState:
    """A request on the worker thread. `emit` hands new text to its follower (the job's event queue)."""

    request: ChatRequest
    prompt_ids: list[int]
    eos: frozenset[int]
    tokenizer: object
    emit: Callable[[Piece], None]
    device: torch.device
    status: Status = Status.WAITING
    generated: list[int] = field(default_factory=list)
    finish: Finish | None = None
    together: int = 1
    started: float = field(default_factory=time.perf_counter)
    ended: float | None = None
    _logprobs: list[TokenLogprob] = field(default_factory=list)
    _unsent: list[TokenLogprob] = field(default_factory=list)
    _text: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        spec = self.request.spec
        self.processors = sampling_processors(spec)
        self.generator = None
        if not spec.greedy:
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(spec.seed if spec.seed is not None else torch.seed() % generation.MAX_SEED)
        self.matcher = spec.constraint.matcher(self.tokenizer) if spec.constraint is not None else None
        self.stop = generation.StopText(spec.stop)
        self.clock = generation.FirstTokenClock()
        self.clock.started = self.started
        self.streamer = generation.TextCallbackStreamer(self.tokenizer, self.clock, self._shown)
        self.streamer.put(torch.tensor(self.prompt_ids))  # the streamer skips its first put: the prompt

    @property
    def spec(self) -> GenerationSpec:
        return self.request.spec

    @property
    def needs_row(self) -> bool:
        """Chooses with its own processors, constraint or log-probabilities, rather than the batch's argmax."""
        return bool(self.processors) or self.generator is not None or self.matcher is not None \
            or self.spec.logprobs is not None

    @property
    def needs_host(self) -> bool:
        """Its choice reads what the host knows of the answer so far (the constraint's state, the tokens a repetition
        penalty counts) or records on the host (log-probabilities): the batch then waits for each step's tokens before
        it chooses the next."""
        return self.matcher is not None or self.spec.logprobs is not None or self.spec.repetition_penalty != 1.0

    def pick(self, scores: torch.Tensor) -> torch.Tensor:
        """The next token from this request's row of logits ([vocab]), as a tensor on their device: without
        `needs_host`, the host never waits for it."""
        row = scores.float()[None]
        if self.matcher is not None:  # before top-k/top-p: they could otherwise keep only tokens the grammar forbids
            row = self.matcher.mask(row[0])[None]
        if self.processors:
            ids = (torch.tensor([self.prompt_ids + self.generated], device=row.device)
                   if self.spec.repetition_penalty != 1.0 else None)  # the warpers read only the scores
            row = self.processors(ids, row)
        if self.generator is None:
            return row.argmax(-1)[0]
        probs = row.softmax(-1)  # torch.multinomial's one-sample draw, the same numbers, without its check on the host
        return (probs / torch.empty_like(probs).exponential_(1, generator=self.generator)).argmax(-1)[0]

    def choose(self, scores: torch.Tensor) -> int:
        """The next token, on the host, with its log-probabilities recorded when the request asks for them."""
        token = int(self.pick(scores))
        if self.spec.logprobs is not None:
            self._record_logprob(scores.float(), token)
        return token

    def _record_logprob(self, raw: torch.Tensor, token: int) -> None:
        """Log-probabilities of the model's own distribution (before sampling controls), as OpenAI reports them."""
        logprobs = raw.log_softmax(-1)
        top: tuple[tuple[str, float], ...] = ()
        if self.spec.logprobs:
            values, ids = logprobs.topk(self.spec.logprobs)
            top = tuple((self._token_text(i), float(v)) for i, v in zip(ids.tolist(), values.tolist()))
        entry = TokenLogprob(self._token_text(token), float(logprobs[token]), top)
        self._logprobs.append(entry)
        self._unsent.append(entry)

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def accept(self, token: int) -> bool:
        """Takes the chosen token; True when the answer has ended (it then needs no more steps)."""
        self.generated.append(token)
        if self.matcher is not None:
            self.matcher.accept(token)
        if token in self.eos:
            self.clock.put(None)  # the end token counts as a step for the clock, but shows no text
            return self.end(Finish.STOP)
        self.streamer.put(torch.tensor([token]))
        if self.stop.stopped or (self.matcher is not None and self.matcher.is_terminated()):
            return self.end(Finish.STOP)
        if len(self.generated) >= self.spec.max_new_tokens:
            return self.end(Finish.LENGTH)
        return False

    def _shown(self, text: str) -> None:
        """Text the streamer released: through the stop strings, then to the follower."""
        shown = self.stop.feed(text)
        self._send(shown)

    def _send(self, text: str) -> None:
        if text or self._unsent:
            self._text.append(text)
            self.emit(Piece(text, tuple(self._unsent)))
            self._unsent.clear()

    def end(self, finish: Finish) -> bool:
        if self.status is Status.FINISHED:
            return True
        self.streamer.end()  # flushes text held back for a whole word
        self._send(self.stop.finish())
        self.status, self.finish, self.ended = Status.FINISHED, finish, time.perf_counter()
        return True

    def result(self, model: str, precision: str, fast_path: FastPathState) -> ChatResult:
        metrics = generation.metrics_of(self.device, self.started, self.clock.first_token_at,
                                        self.ended or time.perf_counter(), len(self.prompt_ids),
                                        len(self.generated), 1)
        answer = self.generated[:-1] if self.generated and self.generated[-1] in self.eos else self.generated
        return ChatResult(text="".join(self._text).strip(), token_ids=tuple(answer),
                          finish=self.finish or Finish.CANCELLED, metrics=metrics, model=model, precision=precision,
                          fast_path=fast_path, together=self.together, logprobs=tuple(self._logprobs))


def eos_ids(model) -> frozenset[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def prompt_ids(loaded, prompt: Prompt, spec: GenerationSpec, max_input_tokens: int | None) -> list[int]:
    """The prompt's token ids, as generate() would build them, checked against the input cap."""
    inputs = generation.build_inputs(loaded, [prompt], spec)
    generation.check_length(loaded, inputs["input_ids"], spec, max_input_tokens)
    return inputs["input_ids"][0].tolist()


def most_together(states: Sequence[RequestState]) -> None:
    """Records, on each running request, the most requests that were answered together with it."""
    for state in states:
        state.together = max(state.together, len(states))
