"""Running model work from a handler: submit a job to the worker, show its place in the queue and its progress."""

from __future__ import annotations

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
