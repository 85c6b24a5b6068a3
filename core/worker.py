"""The one thread that owns the model: jobs in, progress and stream chunks out, cancel events.

One GPU serves one request at a time. Every operation on the loaded model (load, generate, save,
push, compare, quality, the fast-path toggle) is a job that this thread runs, in the order jobs were
submitted. Callers never hold a lock while they wait: they follow a job's events from a queue
(`Job.follow`), which wakes at least every `poll` seconds, so a Gradio generator step never blocks
for long and may be closed from any thread. Setting a job's cancel event stops it: a queued job is
skipped, a running generation stops after its current token, and the worker takes the next job at
once. A job that raises hands the error to its follower; the worker itself never stops.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from core.engine import Engine
from core.errors import EngineError, QueueFullError

log = logging.getLogger(__name__)
_ids = itertools.count(1)
_END = object()


@dataclass(frozen=True)
class Queued:
    """The job waits: `ahead` jobs run or wait before it."""

    ahead: int


@dataclass(frozen=True)
class Progress:
    fraction: float
    message: str


@dataclass(frozen=True)
class Chunk:
    """One piece of a streamed result (for generation: new text)."""

    value: Any


Event = Queued | Progress | Chunk | None  # None: nothing new within one poll


class Job:
    """One unit of model work. The worker calls `fn(engine, job)`; `fn` reports through `progress` and `emit`."""

    def __init__(self, worker: Worker, fn: Callable[[Engine, Job], Any], label: str, session: str | None) -> None:
        self.id = next(_ids)
        self.label = label
        self.session = session
        self.cancel = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self._worker = worker
        self._fn = fn
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()

    # ------------------------------------------------------------------ the worker's side

    def progress(self, fraction: float, message: str) -> None:
        self._events.put(Progress(fraction, message))

    def emit(self, value: Any) -> None:
        self._events.put(Chunk(value))

    def _run(self, engine: Engine) -> None:
        try:
            if not self.cancel.is_set():
                self.result = self._fn(engine, self)
        except BaseException as error:  # the follower gets it; the worker goes on
            self.error = error
            if not isinstance(error, EngineError):
                log.exception("job %s (%s) failed", self.id, self.label)
        finally:
            self._done.set()
            self._events.put(_END)

    # ------------------------------------------------------------------ the follower's side

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set()

    def follow(self, poll: float = 0.25) -> Iterator[Event]:
        """Yields the job's events until it ends, at least one every `poll` seconds; then raises its error, if any."""
        while True:
            try:
                event = self._events.get(timeout=poll)
            except queue.Empty:
                ahead = self._worker.ahead(self)
                yield Queued(ahead) if ahead is not None else None
                continue
            if event is _END:
                break
            yield event
        if self.error is not None:
            raise self.error

    def wait(self, on_event: Callable[[Event], None] | None = None, poll: float = 0.25) -> Any:
        """Blocks until the job ends; returns its result or raises its error."""
        for event in self.follow(poll):
            if on_event is not None:
                on_event(event)
        return self.result


class Worker:
    """Runs jobs on one thread, in submission order; at most `max_pending` jobs may wait."""

    def __init__(self, engine: Engine | None = None, max_pending: int = 32, limit_hint: str = "") -> None:
        self.engine = engine or Engine()
        self.max_pending = max_pending
        self.limit_hint = limit_hint
        self._pending: deque[Job] = deque()
        self._running: Job | None = None
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="model-worker", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[Engine, Job], Any], label: str, session: str | None = None) -> Job:
        job = Job(self, fn, label, session)
        with self._ready:
            if len(self._pending) >= self.max_pending:
                raise QueueFullError(f"The queue is full: {len(self._pending)} requests are waiting for the model "
                                     f"(limit {self.max_pending}{self.limit_hint}). Try again in a minute.")
            self._pending.append(job)
            self._ready.notify()
        return job

    def run(self, fn: Callable[[Engine, Job], Any], label: str, session: str | None = None) -> Any:
        """Submits and waits: for callers with nothing to show meanwhile (start-up, scripts, tests)."""
        return self.submit(fn, label, session).wait()

    def ahead(self, job: Job) -> int | None:
        """How many jobs run or wait before `job`; None once it runs or has ended."""
        with self._ready:
            try:
                index = self._pending.index(job)
            except ValueError:
                return None
            return index + (self._running is not None)

    def cancel(self, session: str, label: str | None = None) -> int:
        """Cancels the session's queued and running jobs (only those with `label`, if given); returns how many."""
        with self._ready:
            jobs = [j for j in [self._running, *self._pending]
                    if j is not None and j.session == session and (label is None or j.label == label)]
        for job in jobs:
            job.cancel.set()
        return len(jobs)

    @property
    def waiting(self) -> int:
        with self._ready:
            return len(self._pending)

    def _loop(self) -> None:
        while True:
            with self._ready:
                while not self._pending:
                    self._ready.wait()
                job = self._running = self._pending.popleft()
            try:
                job._run(self.engine)
            finally:
                with self._ready:
                    self._running = None
