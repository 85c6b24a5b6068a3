"""What strangers' input may cost: input and output caps, the queue's length, and each visitor's request rate.

Every refusal names the limit, its value and the variable that changes it. The caps apply to
everyone (they protect the one GPU); the rate applies to visitors only. The checks here run in the
handlers before a request joins the model's queue, on every text field a request carries, so an
oversized or malformed input is refused at once and never tokenized.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from core.errors import EngineError
from core.spec import check_text


class LimitError(EngineError):
    """An input over one of the caps. `field` names the request field it concerns, for interfaces that point at it
    (the OpenAI API's `param`)."""

    title = "Limit reached"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class RateLimitError(LimitError):
    """A visitor over the request rate: nothing is wrong with the request itself; it may be sent again later."""

    title = "Too many requests"


def _int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise SystemExit(f"{name}={text!r} is not a whole number") from None
    if value < 0:
        raise SystemExit(f"{name}={text!r} must not be negative")
    return value


@dataclass(frozen=True)
class Limits:
    max_input_tokens: int = 2048  # APP_MAX_INPUT_TOKENS: the prompt with its chat history
    max_new_tokens: int = 512  # APP_MAX_NEW_TOKENS
    max_message_chars: int = 16_000  # APP_MAX_MESSAGE_CHARS: each text (message, system prompt, history entry)
    max_history_messages: int = 200  # APP_MAX_HISTORY_MESSAGES: messages in one conversation, the new one included
    max_conversation_chars: int = 64_000  # APP_MAX_CONVERSATION_CHARS: all of a conversation's texts together
    queue_size: int = 32  # APP_QUEUE_SIZE: requests waiting for the model
    visitor_requests_per_minute: int = 20  # APP_RATE_LIMIT (0: off)

    @classmethod
    def from_env(cls) -> Limits:
        return cls(max_input_tokens=_int("APP_MAX_INPUT_TOKENS", cls.max_input_tokens),
                   max_new_tokens=max(1, _int("APP_MAX_NEW_TOKENS", cls.max_new_tokens)),
                   max_message_chars=_int("APP_MAX_MESSAGE_CHARS", cls.max_message_chars),
                   max_history_messages=_int("APP_MAX_HISTORY_MESSAGES", cls.max_history_messages),
                   max_conversation_chars=_int("APP_MAX_CONVERSATION_CHARS", cls.max_conversation_chars),
                   queue_size=max(1, _int("APP_QUEUE_SIZE", cls.queue_size)),
                   visitor_requests_per_minute=_int("APP_RATE_LIMIT", cls.visitor_requests_per_minute))

    def check_message(self, text: str, field: str = "message", name: str | None = None) -> None:
        """One text of a request: valid Unicode, and at most APP_MAX_MESSAGE_CHARS long. `name` is how the message
        calls it when that differs from the field ("message 3 of the history")."""
        check_text(field, text)
        if self.max_message_chars and len(text) > self.max_message_chars:
            limit = self.max_message_chars
            raise LimitError(f"The {name or field} is {len(text):,} characters; the limit is {limit:,} "
                             f"(APP_MAX_MESSAGE_CHARS={limit}). Shorten it.", field)

    def check_conversation(self, messages: Sequence[Mapping[str, str]], system_prompt: str | None = None,
                           field: str = "history") -> None:
        """A conversation (`{"role", "content": text}` messages) and its system prompt: the number of messages, each
        text, and their total size."""
        if self.max_history_messages and len(messages) > self.max_history_messages:
            raise LimitError(f"The conversation has {len(messages):,} messages; the limit is "
                             f"{self.max_history_messages:,} (APP_MAX_HISTORY_MESSAGES={self.max_history_messages}). "
                             "Start a new chat, or send fewer earlier messages.", field)
        for number, message in enumerate(messages, 1):
            self.check_message(message["content"], field, f"message {number} of the conversation")
        if system_prompt:
            self.check_message(system_prompt, "system_prompt", "system prompt")
        total = sum(len(m["content"]) for m in messages) + len(system_prompt or "")
        if self.max_conversation_chars and total > self.max_conversation_chars:
            raise LimitError(f"The conversation is {total:,} characters in all; the limit is "
                             f"{self.max_conversation_chars:,} (APP_MAX_CONVERSATION_CHARS="
                             f"{self.max_conversation_chars}). Start a new chat, or send fewer earlier messages.",
                             field)

    def check_new_tokens(self, value: int, field: str = "max_new_tokens") -> None:
        if value > self.max_new_tokens:
            raise LimitError(f"{field}={value} is over the limit of {self.max_new_tokens} "
                             f"(APP_MAX_NEW_TOKENS={self.max_new_tokens}).", field)


class RateLimiter:
    """A token bucket per visitor: `per_minute` requests a minute, in bursts of up to a third of that."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.burst = max(1, per_minute // 3)
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)
        self._lock = threading.Lock()  # held for a few arithmetic operations only, never across a yield

    def check(self, key: str) -> None:
        if self.per_minute <= 0:
            return
        now = time.monotonic()
        rate = self.per_minute / 60.0
        with self._lock:
            tokens, then = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                wait = (1.0 - tokens) / rate
                raise RateLimitError(f"Too many requests: visitors may send {self.per_minute} a minute "
                                 f"(APP_RATE_LIMIT={self.per_minute}). Try again in {wait:.0f} s.")
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > 10_000:  # forget idle visitors
                cutoff = now - 600
                self._buckets = {k: v for k, v in self._buckets.items() if v[1] > cutoff}
