"""The one thread that owns the model: chats answered together, exclusive jobs alone, in arrival order.

Two kinds of work arrive, through one waiting line:
- **chats** (`submit_chat`): each joins the running batch at the next step, streams its own tokens, and
  leaves when it ends, is stopped, or its client is gone (core.serving);
- **exclusive jobs** (`submit`: load, save, push, compare, quality, the fast-path toggle): once one
  reaches the head of the line, no chat behind it joins, the batch drains, and the job runs alone.
core.serving.scheduler decides who goes next; this module carries it out.

After every exclusive job the worker publishes a `Snapshot` of the loaded model (core.snapshot), which is
all that handlers on other threads may read of it. Callers never hold a lock while they wait: they follow
a job's events from a queue (`Job.follow`), which wakes at least every `poll` seconds, so a Gradio
generator step never blocks for long and may be closed from any thread. Setting a job's cancel event
stops it: a waiting job is skipped, a running chat leaves the batch at the next step, and nobody else
waits for it. A job that raises hands the error to its follower; the worker itself never stops.
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

from core import fastpath
from core import snapshot as snapshots
from core.engine import Engine
from core.errors import EngineError, ModelNotFoundError, QueueFullError
from core.serving import Serving, answer_alone, serving_of
from core.serving import scheduler
from core.serving.batch import Batch
from core.serving.static_rows import StaticRows
from core.serving.requests import ChatRequest, ChatResult, Piece, RequestState, Status, eos_ids, prompt_ids
from core.snapshot import Snapshot

log = logging.getLogger(__name__)
_ids = itertools.count(1)
_END = object()


@dataclass(frozen=True)
class Queued:
    """The job waits: `ahead` requests run or wait before it."""

    ahead: int


@dataclass(frozen=True)
class Progress:
    fraction: float
    message: str


@dataclass(frozen=True)
class Chunk:
    """One piece of a streamed result: for a chat, new text (`value`) and its tokens' log-probabilities."""

    value: Any
    logprobs: tuple = ()


Event = Queued | Progress | Chunk | None  # None: nothing new within one poll


class Job:
    """One unit of model work: an exclusive `fn(engine, job)`, or a chat `request`, with its events and result."""

    def __init__(self, worker: Worker, label: str, session: str | None,
                 fn: Callable[[Engine, Job], Any] | None = None, request: ChatRequest | None = None) -> None:
        self.id = next(_ids)
        self.label = label
        self.session = session
        self.fn = fn
        self.request = request
        self.cancel = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self._worker = worker
        self._events: queue.Queue = queue.Queue()

    @property
    def exclusive(self) -> bool:
        return self.request is None

    # ------------------------------------------------------------------ the worker's side

    def progress(self, fraction: float, message: str) -> None:
        self._events.put(Progress(fraction, message))

    def emit(self, value: Any) -> None:
        if isinstance(value, Piece):
            self._events.put(Chunk(value.text, value.logprobs))
        else:
            self._events.put(Chunk(value))

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        if error is not None and not isinstance(error, EngineError):
            log.error("job %s (%s) failed", self.id, self.label, exc_info=error)
        self._events.put(_END)

    # ------------------------------------------------------------------ the follower's side

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
    """Runs the model's work on one thread; at most `max_pending` requests may wait."""

    def __init__(self, engine: Engine | None = None, max_pending: int = 32, limit_hint: str = "",
                 max_batch: int | None = None, max_per_visitor: int | None = None, context: int = 2560) -> None:
        self.engine = engine or Engine()
        self.max_pending = max_pending
        self.limit_hint = limit_hint
        on_gpu = _has_gpu()
        batch_default, visitor_default = Serving.limits_from_env(on_gpu)
        self.max_batch = max_batch or batch_default
        self.max_per_visitor = max_per_visitor or visitor_default
        self.context = context  # the longest chat the app allows: how much KV cache one row may need
        self.snapshot: Snapshot | None = None  # replaced whole after each exclusive job; read it from any thread
        self.serving = Serving(1, False, "")
        self._pending: deque[Job] = deque()
        self._exclusive: Job | None = None
        self._running: dict[int, tuple[Job, RequestState]] = {}  # job id -> (job, state), in the batch
        self._batch: Batch | None = None
        self._batch_key: tuple | None = None
        self._ready = threading.Condition()
        self.engine.before_unload.append(self._close_batch)  # the batch's caches hold the model: freed with it
        self._thread = threading.Thread(target=self._loop, name="model-worker", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ submitting

    def submit(self, fn: Callable[[Engine, Job], Any], label: str, session: str | None = None) -> Job:
        """An exclusive job: it runs alone, after the requests before it."""
        return self._enqueue(Job(self, label, session, fn=fn))

    def submit_chat(self, request: ChatRequest, label: str = "chat", session: str | None = None) -> Job:
        """A chat: it joins the running batch; its events are `Chunk`s of new text, its result a ChatResult."""
        return self._enqueue(Job(self, label, session, request=request))

    def _enqueue(self, job: Job) -> Job:
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

    # ------------------------------------------------------------------ reading and cancelling, from any thread

    def ahead(self, job: Job) -> int | None:
        """How many requests run or wait before `job`; None once it runs or has ended."""
        with self._ready:
            try:
                index = self._pending.index(job)
            except ValueError:
                return None
            return scheduler.ahead([], index, len(self._running), self._rows(), self._exclusive is not None)

    def cancel(self, session: str, label: str | None = None) -> int:
        """Cancels the session's waiting and running jobs (only those with `label`, if given); returns how many."""
        with self._ready:
            jobs = [j for j in [self._exclusive, *self._pending, *(job for job, _ in self._running.values())]
                    if j is not None and j.session == session and (label is None or j.label == label)]
            for job in jobs:
                job.cancel.set()
            self._ready.notify()
        return len(jobs)

    @property
    def together(self) -> int:
        """Chats in the running batch now."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Requests waiting for the model now (chats and exclusive jobs not yet started)."""
        with self._ready:
            return len(self._pending)

    # ------------------------------------------------------------------ the worker thread

    def _rows(self) -> int:
        return self.serving.rows if self.serving.batched else 1

    def _loop(self) -> None:
        while True:
            with self._ready:
                while not self._pending and not self._running:
                    self._ready.wait()
                self._drop_cancelled_waiting()
                line = [scheduler.Waiting(j.exclusive, j.request.visitor if j.request else None)
                        for j in self._pending]
                running = [job.request.visitor for job, _ in self._running.values()]
                decision = scheduler.decide(line, running, self._rows(), self.max_per_visitor)
                chosen = [self._pending[i] for i in decision.admit]
                exclusive = self._pending[decision.exclusive] if decision.exclusive is not None else None
                for job in [*chosen, *([exclusive] if exclusive else [])]:
                    self._pending.remove(job)
                self._exclusive = exclusive
            if exclusive is not None:
                self._run_exclusive(exclusive)
                continue
            if chosen:
                self._start_chats(chosen)
            if self._running:
                self._step()

    def _drop_cancelled_waiting(self) -> None:
        for job in [j for j in self._pending if j.cancel.is_set()]:
            self._pending.remove(job)
            job.finish(error=None)

    def _run_exclusive(self, job: Job) -> None:
        result, failure = None, None
        try:
            result = job.fn(self.engine, job) if not job.cancel.is_set() else None
        except BaseException as error:  # the follower gets it; the worker goes on
            failure = error
        try:
            self._publish()  # before the follower wakes: what it reads next is the model as this job left it
        except BaseException as error:
            log.exception("publishing the model's snapshot failed")
            failure = failure or error
        with self._ready:
            self._exclusive = None
        job.finish(result, failure)

    def _publish(self) -> None:
        """After an exclusive job: how chats are served on the model now, and the snapshot handlers read. The running
        batch (its cache, graphs and kept conversations) stays while the model, its fast path and the cap do."""
        if not self.engine.loaded:
            self._close_batch()
            self.snapshot, self.serving = None, Serving(1, False, "")
            return
        loaded = self.engine.current
        held = self._batch.rows.held_bytes() if self._batch is not None else 0  # a batch of this model (see unload)
        self.serving = serving_of(loaded, self.max_batch, self.context, held)
        if not self.serving.batched:
            self._close_batch()
        elif self._batch is None or self._batch_key != _batch_key(loaded, self.serving):
            self._new_batch(loaded)
        self.snapshot = snapshots.of(loaded, self.serving.note)

    def _new_batch(self, loaded) -> None:
        self._close_batch()
        self._batch, self._batch_key = _batch_for(loaded, self.serving.rows), _batch_key(loaded, self.serving)

    def _close_batch(self) -> None:
        if self._batch is not None:
            self._batch.close()
        self._batch, self._batch_key = None, None

    def _start_chats(self, jobs: list[Job]) -> None:
        """Admits chats: checks each against the loaded model, then prefills them (or answers them alone)."""
        admitted: list[tuple[Job, RequestState]] = []
        for job in jobs:
            try:
                if job.cancel.is_set():
                    job.finish()
                    continue
                loaded = self.engine.current
                snap = self.snapshot
                if job.request.model is not None and job.request.model != snap.model:
                    raise ModelNotFoundError(f"The model {job.request.model!r} is not loaded here; the loaded model "
                                             f"is {snap.model!r}.")
                if self._batch is None:
                    self._answer_alone(job, loaded, snap)
                    continue
                admitted.append((job, RequestState(
                    job.request, prompt_ids(loaded, job.request.prompt, job.request.spec,
                                            job.request.max_input_tokens),
                    eos_ids(loaded.model), loaded.tokenizer, job.emit, loaded.input_device)))
            except BaseException as error:
                job.finish(error=error)
        if not admitted:
            return
        try:
            self._batch.add([state for _, state in admitted])
        except BaseException as error:  # out of memory, say: these chats get the error; those running go on
            self._batch.cancel([state for _, state in admitted if state.status is Status.DECODING])
            for job, _ in admitted:
                job.finish(error=_as_engine_error(error))
            return
        for job, state in admitted:
            if state.status is Status.FINISHED:
                job.finish(self._result(state))
            else:
                self._running[job.id] = (job, state)

    def _answer_alone(self, job: Job, loaded, snap: Snapshot) -> None:
        text, ids, finish, metrics = answer_alone(loaded, job.request, job.emit, job.cancel)
        job.finish(ChatResult(text=text, token_ids=ids, finish=finish, metrics=metrics, model=snap.model,
                              precision=snap.precision, fast_path=snap.fast_path, together=1))

    def _step(self) -> None:
        cancelled = [state for job, state in self._running.values() if job.cancel.is_set()]
        try:
            ended = self._batch.cancel(cancelled) if cancelled else []
            if len(self._batch):
                ended += self._batch.step()
        except BaseException as error:  # out of memory, say: every running chat gets the error, the batch restarts
            for job, _ in self._running.values():
                job.finish(error=_as_engine_error(error))
            self._running.clear()
            self._new_batch(self.engine.current)
            return
        by_state = {id(state): job for job, state in self._running.values()}
        for state in ended:
            job = by_state[id(state)]
            del self._running[job.id]
            job.finish(self._result(state))

    def _result(self, state: RequestState) -> ChatResult:
        snap = self.snapshot
        return state.result(snap.model, snap.precision, snap.fast_path)


def _batch_for(loaded, rows: int) -> Batch:
    """The running batch for `loaded`: on graphed static rows when the fast path graphs decode (a GPU), else on a
    dynamic cache; on a GPU, prompts arriving together are prefilled together and steps overlap the host's work."""
    graph = fastpath.graph_of(loaded)
    on_gpu = loaded.input_device.type == "cuda"
    return Batch(loaded.model, StaticRows(loaded.model, graph, rows) if graph is not None else None, overlap=on_gpu,
                 prefill_together=on_gpu)


def _batch_key(loaded, serving: Serving) -> tuple:
    """What the running batch was built for: the model, its graphed step, and the rows it may hold."""
    return id(loaded.model), id(fastpath.graph_of(loaded)), serving.rows


def _as_engine_error(error: BaseException) -> BaseException:
    import torch

    from core import generation

    return generation.out_of_memory() if isinstance(error, torch.OutOfMemoryError) else error


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
