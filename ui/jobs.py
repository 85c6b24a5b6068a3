"""Running model work from a handler: submit a job to the worker, show its place in the queue and its progress."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import gradio as gr

from core.engine import Engine
from core.worker import Event, Job, Progress, Queued
from server.context import AppContext, session_of


def waiting_text(ahead: int) -> str:
    return f"Waiting for the model: {ahead} request{'s' if ahead != 1 else ''} ahead"


def run(ctx: AppContext, fn: Callable[[Engine, Job], Any], label: str, request: gr.Request | None,
        progress: gr.Progress | None = None) -> Any:
    """Runs `fn` on the model worker and waits, showing the queue position and the job's progress."""
    job = ctx.worker.submit(fn, label, session_of(request))

    def show(event: Event) -> None:
        if progress is None:
            return
        if isinstance(event, Queued):
            progress(0.0, desc=waiting_text(event.ahead))
        elif isinstance(event, Progress):
            progress(event.fraction, desc=event.message)

    return job.wait(show)


class UnreadWatch:
    """Tells when nobody reads a call's results: the client posted to `/gradio_api/call/...` and never opened the
    stream, or stopped reading it. A reader (the page, gradio_client, curl on the stream) takes each message
    within milliseconds, so the session's message queue empties after every update; one that has not been empty
    for `grace` seconds has no reader, and its request is cancelled so that it holds nobody up. Gradio exposes no
    API for this: the queue is read through its internals, and a Gradio without them simply never reports a
    call as unread (closed tabs and dropped streams are still cancelled by Gradio itself)."""

    def __init__(self, request: gr.Request | None, grace: float = 5.0) -> None:
        self.grace = grace
        self._queue = _message_queue(request)
        self._last_empty = time.monotonic()

    def unread(self) -> bool:
        if self._queue is None:
            return False
        now = time.monotonic()
        if self._queue.qsize() == 0:
            self._last_empty = now
        return now - self._last_empty > self.grace


def _message_queue(request: gr.Request | None):
    try:
        app = request.request.app
        return app.get_blocks()._queue.pending_messages_per_session.get(request.session_hash)
    except Exception:  # not a queued call, or another Gradio: no watch
        return None
