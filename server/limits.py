"""What strangers' input may cost: input and output caps, the queue's length, and each visitor's request rate.

Every refusal names the limit, its value and the variable that changes it. The caps apply to
everyone (they protect the one GPU); the rate applies to visitors only.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from core.errors import EngineError


class LimitError(EngineError):
    title = "Limit reached"


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
    max_message_chars: int = 16_000  # APP_MAX_MESSAGE_CHARS: checked before a request joins the queue
    queue_size: int = 32  # APP_QUEUE_SIZE: requests waiting for the model
    visitor_requests_per_minute: int = 20  # APP_RATE_LIMIT (0: off)
    max_file_size: str = "1mb"  # APP_MAX_FILE_SIZE: Gradio's upload route (the app itself takes no files)

    @classmethod
    def from_env(cls) -> Limits:
        return cls(max_input_tokens=_int("APP_MAX_INPUT_TOKENS", cls.max_input_tokens),
                   max_new_tokens=max(1, _int("APP_MAX_NEW_TOKENS", cls.max_new_tokens)),
                   max_message_chars=_int("APP_MAX_MESSAGE_CHARS", cls.max_message_chars),
                   queue_size=max(1, _int("APP_QUEUE_SIZE", cls.queue_size)),
                   visitor_requests_per_minute=_int("APP_RATE_LIMIT", cls.visitor_requests_per_minute),
                   max_file_size=os.environ.get("APP_MAX_FILE_SIZE", cls.max_file_size))

    def check_message(self, text: str) -> None:
        if self.max_message_chars and len(text) > self.max_message_chars:
            raise LimitError(f"The message is {len(text):,} characters; the limit is {self.max_message_chars:,} "
                             f"(APP_MAX_MESSAGE_CHARS={self.max_message_chars}). Shorten it.")

    def check_new_tokens(self, value: int) -> None:
        if value > self.max_new_tokens:
            raise LimitError(f"max_new_tokens={value} is over the limit of {self.max_new_tokens} "
                             f"(APP_MAX_NEW_TOKENS={self.max_new_tokens}).")


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
                raise LimitError(f"Too many requests: visitors may send {self.per_minute} a minute "
                                 f"(APP_RATE_LIMIT={self.per_minute}). Try again in {wait:.0f} s.")
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > 10_000:  # forget idle visitors
                cutoff = now - 600
                self._buckets = {k: v for k, v in self._buckets.items() if v[1] > cutoff}
