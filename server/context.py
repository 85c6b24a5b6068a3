"""What every handler needs, in the UI and the API alike: the launch settings, the model worker, the visitor rate
limiter; and who is calling, from a request (a `gr.Request` or a Starlette request: both carry the same fields)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.worker import Worker
from server.access import Action, Caller, identify, require
from server.limits import RateLimiter
from server.metrics import Metrics
from server.settings import Settings


@dataclass(frozen=True)
class AppContext:
    settings: Settings
    worker: Worker
    rate: RateLimiter
    metrics: Metrics | None = None  # the /metrics registry, beside the API (server.metrics)

    @classmethod
    def create(cls, settings: Settings, worker: Worker | None = None) -> AppContext:
        hint = f", APP_QUEUE_SIZE={settings.limits.queue_size}"
        worker = worker or Worker(max_pending=settings.limits.queue_size, limit_hint=hint,
                                  context=settings.limits.max_input_tokens + settings.limits.max_new_tokens)
        return cls(settings=settings, worker=worker, rate=RateLimiter(settings.limits.visitor_requests_per_minute),
                   metrics=Metrics(worker) if settings.api and settings.metrics else None)

    def caller(self, request: Any, profile: dict | None = None) -> Caller:
        login = getattr(request, "username", None) if request is not None else None
        return identify(self.settings, login, profile if self.settings.on_space else None, self.address(request))

    def admit(self, request: Any, profile: dict | None, action: Action) -> Caller:
        """The caller, once allowed to do `action` and, for a visitor, within the request rate."""
        caller = self.caller(request, profile)
        require(caller, action)
        if not caller.is_owner:
            self.rate.check(caller.key)
        return caller

    def address(self, request: Any) -> str:
        """Where a request comes from, as uvicorn reports it: behind a trusted proxy (APP_TRUST_PROXY; app.py hands
        the list to uvicorn), the rightmost X-Forwarded-For entry that is not a trusted proxy; otherwise the peer.
        The leftmost entries are whatever the client wrote, so they never count."""
        client = getattr(request, "client", None) if request is not None else None
        return getattr(client, "host", None) or "unknown"


def session_of(request: Any) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None
