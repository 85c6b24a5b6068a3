"""The model worker: one thread runs every job in order; cancel, errors and closed followers never wedge it."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import QUESTION
from core.engine import Engine
from core.errors import QueueFullError
from core.serving.requests import ChatRequest
from core.spec import GenerationSpec, LoadSpec
from core.worker import Chunk, Queued, Worker

LONG = GenerationSpec(greedy=True, max_new_tokens=400)
SHORT = GenerationSpec(greedy=True, max_new_tokens=12)


@pytest.fixture(scope="module")
def worker(checkpoint) -> Worker:
    worker = Worker(Engine(), max_pending=4)
    worker.run(lambda engine, job: engine.load(LoadSpec()), "load")
    return worker


def _chat(worker: Worker, spec: GenerationSpec, prompt: str = QUESTION, session: str | None = None):
    return worker.submit_chat(ChatRequest(prompt, spec), "chat", session)


def test_jobs_run_in_order_and_waiting_ones_see_their_place(worker):
    release = threading.Event()
    order: list[str] = []
    blocker = worker.submit(lambda engine, job: release.wait(10), "block")
    first = worker.submit(lambda engine, job: order.append("first"), "first")
    second = worker.submit(lambda engine, job: order.append("second"), "second")
    seen = next(e for e in second.follow(poll=0.05) if e is not None)
    assert seen == Queued(ahead=2)  # the running blocker and `first`
    release.set()
    for job in (blocker, first, second):
        job.wait()
    assert order == ["first", "second"]


def test_stop_mid_answer_frees_the_worker_for_the_next_job_at_once(worker):
    job = _chat(worker, LONG, "Write a long story about a lighthouse keeper.", session="a")
    text, stopped = "", None
    for event in job.follow(poll=0.05):
        if isinstance(event, Chunk):
            text += event.value
            if len(text) > 20 and stopped is None:  # chunks already emitted still arrive after the Stop
                stopped = worker.cancel("a", "chat")
    assert stopped == 1
    assert job.result.cancelled and job.result.metrics.new_tokens < 60 and job.result.text
    started = time.perf_counter()
    answer = _chat(worker, SHORT, session="b").wait()
    assert "Paris" in answer.text and not answer.cancelled
    assert time.perf_counter() - started < 15


def test_a_follower_closed_from_another_thread_cancels_its_generation(worker):
    job = _chat(worker, LONG, "Write a long story about a lighthouse keeper.", session="c")
    follower = job.follow(poll=0.05)

    def follow_then_close() -> None:
        try:
            for event in follower:
                if isinstance(event, Chunk):
                    break  # what a web server does when the client goes away: stop reading and close the generator
        finally:
            job.cancel.set()

    reader = threading.Thread(target=follow_then_close)
    reader.start()
    reader.join(30)
    follower.close()  # from this thread, not the reader's: nothing here is owned by a thread
    job.wait()
    assert job.result.cancelled and job.result.metrics.new_tokens < 60
    assert "Paris" in _chat(worker, SHORT).wait().text


def test_an_exception_inside_a_job_reaches_its_caller_and_the_worker_goes_on(worker):
    def broken(engine, job):
        raise RuntimeError("simulated failure inside a job")

    with pytest.raises(RuntimeError, match="simulated failure"):
        worker.run(broken, "broken")
    assert "Paris" in _chat(worker, SHORT).wait().text


def test_a_cancelled_queued_job_never_runs_and_a_full_queue_refuses(worker):
    release = threading.Event()
    ran: list[str] = []
    running = threading.Event()
    blocker = worker.submit(lambda engine, job: (running.set(), release.wait(10)), "block")
    assert running.wait(10)
    queued = [worker.submit(lambda engine, job: ran.append("x"), "chat", session="d") for _ in range(4)]
    with pytest.raises(QueueFullError, match="limit 4"):
        worker.submit(lambda engine, job: None, "chat")
    assert worker.cancel("d") == 4
    release.set()
    blocker.wait()
    for job in queued:
        job.wait()
    assert ran == [] and all(job.cancelled for job in queued)
