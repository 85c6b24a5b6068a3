"""Chats answered together (core.serving): who joins the batch, and each answer equal to the one given alone.

The scheduler is tested without a model. The batch is tested on the embedded model through a real worker,
in the order visitors act: eight arrive together, one of them presses Stop, a seeded sampler, stop strings,
a chat's next turn, and an LLM.int8() model, which is answered one at a time.
"""

from __future__ import annotations

import pytest

from conftest import QUESTION
from core import generation
from core.engine import Engine
from core.serving import scheduler
from core.serving.requests import ChatRequest, Finish
from core.serving.scheduler import Waiting
from core.spec import GenerationSpec, LoadSpec, QuantSpec
from core.worker import Chunk, Worker

PROMPTS = [QUESTION, "Name a primary color.", "Write a haiku about the sea.", "What is 2+2?", "Who wrote Hamlet?",
           "Give me a synonym for happy.", "What is the largest planet?", "Translate 'cat' to French."]
GREEDY = GenerationSpec(greedy=True, max_new_tokens=24)


# ----------------------------------------------------------------------------- the scheduler, without a model

def test_chats_join_in_arrival_order_up_to_the_batch_cap():
    line = [Waiting(False, v) for v in ("a", "b", "c", "d")]
    assert scheduler.decide(line, [], max_batch=3, max_per_visitor=2).admit == (0, 1, 2)
    assert scheduler.decide(line, ["x", "y"], max_batch=3, max_per_visitor=2).admit == (0,)


def test_the_batchs_two_pass_greedy_choice_is_argmax_ties_included():
    import torch

    from core.serving.batch import greedy

    torch.manual_seed(0)
    for vocab in (128256, 49152, 50257):  # Llama 3's and SmolLM2's vocabularies split into chunks; GPT-2's does not
        logits = (torch.randn(8, vocab) * 2).round().to(torch.bfloat16)  # many equal maxima
        logits[0] = 0  # all equal: the first
        logits[1, 3000] = logits[1, 5000] = 100  # equal maxima in two chunks: the first chunk's
        logits[2, 1023:1025] = 100  # across a chunk boundary
        logits[3] = float("-inf")
        assert torch.equal(greedy(logits), logits.argmax(-1)), vocab


def test_an_exclusive_job_waits_for_the_batch_to_drain_and_holds_the_chats_behind_it():
    line = [Waiting(False, "a"), Waiting(True), Waiting(False, "b")]
    assert scheduler.decide(line, ["x"], 8, 2).admit == (0,)  # the chat before it still joins; b waits behind it
    assert scheduler.decide(line[1:], ["x"], 8, 2) == scheduler.Decision()  # draining: nobody joins
    assert scheduler.decide(line[1:], [], 8, 2).exclusive == 0  # drained: the job runs


def test_a_visitor_over_the_cap_waits_without_holding_up_others_and_the_owner_has_no_cap():
    line = [Waiting(False, "a"), Waiting(False, "a"), Waiting(False, "b"), Waiting(False, None), Waiting(False, None)]
    assert scheduler.decide(line, ["a"], 8, 2).admit == (0, 2, 3, 4)
    assert scheduler.decide(line, ["a", "a"], 8, 2).admit == (2, 3, 4)


# ----------------------------------------------------------------------------- the batch, on the embedded model

@pytest.fixture(scope="module")
def worker(checkpoint) -> Worker:
    worker = Worker(Engine(), max_pending=32, max_batch=8)
    worker.run(lambda engine, job: engine.load(LoadSpec()), "load")
    return worker


def _ask(worker: Worker, prompt, spec: GenerationSpec = GREEDY, session: str | None = None):
    return worker.submit_chat(ChatRequest(prompt, spec), "chat", session)


def _load(worker: Worker, mode: str) -> None:
    worker.run(lambda engine, job: engine.load(LoadSpec(quant=QuantSpec(mode=mode))), "load")


@pytest.mark.parametrize("mode", ["none", "nf4", "fp4"])
def test_eight_chats_together_answer_exactly_as_each_alone(worker, mode):
    if worker.snapshot.spec.quant.mode != mode:
        _load(worker, mode)
    assert worker.serving.rows == 8 and "together" in worker.snapshot.batching
    alone = [_ask(worker, p).wait() for p in PROMPTS]
    together = [job.wait() for job in [_ask(worker, p) for p in PROMPTS]]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert max(r.together for r in together) == 8 and all(r.together == 1 for r in alone)
    assert "Paris" in together[0].text and together[0].precision == mode if mode != "none" else True
    if mode == "none":  # and equal to transformers' own generate(), one prompt at a time
        plain = [generation.generate(worker.engine.current, [p], GREEDY).token_ids[0] for p in PROMPTS[:3]]
        assert [r.token_ids for r in together[:3]] == plain


def test_stop_on_one_of_eight_ends_only_that_one(worker):
    if worker.snapshot.spec.quant.mode != "none":
        _load(worker, "none")
    alone = [_ask(worker, p).wait() for p in PROMPTS[1:4]]
    story = _ask(worker, "Write a long story about a lighthouse keeper.", GenerationSpec(greedy=True,
                                                                                          max_new_tokens=300),
                 session="storyteller")
    others = [_ask(worker, p, session=f"v{i}") for i, p in enumerate(PROMPTS[1:4])]
    text = ""
    for event in story.follow(poll=0.05):
        if isinstance(event, Chunk):
            text += event.value
            if len(text) > 20:
                assert worker.cancel("storyteller", "chat") == 1
                break
    stopped = story.wait()
    assert stopped.finish is Finish.CANCELLED and stopped.text and len(stopped.token_ids) < 100
    assert [job.wait().token_ids for job in others] == [r.token_ids for r in alone]


def test_a_seed_gives_the_same_sample_alone_and_in_a_batch_and_stop_strings_cut_the_answer(worker):
    sampled = GenerationSpec(greedy=False, temperature=1.0, top_p=0.95, top_k=40, repetition_penalty=1.1, seed=7,
                             max_new_tokens=24)
    alone = _ask(worker, PROMPTS[2], sampled).wait()
    jobs = [_ask(worker, p, sampled) for p in PROMPTS[:4]]
    assert jobs[2].wait().token_ids == alone.token_ids and jobs[2].result.together > 1
    stopped = _ask(worker, QUESTION, GenerationSpec(greedy=True, max_new_tokens=24, stop=("Paris",))).wait()
    assert stopped.finish is Finish.STOP and "Paris" not in stopped.text and stopped.text.startswith("The capital")


def test_the_next_turn_of_a_chat_reuses_the_earlier_turns(worker):
    chat = [{"role": "user", "content": QUESTION}]
    for turn in range(3):
        before = worker._batch.reused_tokens
        answer = _ask(worker, chat).wait()
        if turn:  # the earlier turns' keys and values were kept: only the new message is computed
            assert worker._batch.reused_tokens - before > answer.metrics.prompt_tokens // 2
        chat += [{"role": "assistant", "content": answer.text}, {"role": "user", "content": "And of Italy?"}]


def test_the_running_batch_lets_go_of_the_model_before_another_loads(worker):
    """A load frees the old model before the new one loads (two rarely fit on one GPU): the batch that answered on it
    (its rows, kept conversations and, on a GPU, its cache and graphs) must not keep it alive meanwhile."""
    import gc
    import weakref

    _ask(worker, QUESTION).wait()
    old = weakref.ref(worker.engine.current.model)

    def unload(engine, job) -> bool:
        engine.unload()
        gc.collect()
        return old() is None

    assert worker.run(unload, "unload")
    _load(worker, "none")
    assert "Paris" in _ask(worker, QUESTION).wait().text


def test_llm_int8_is_answered_one_at_a_time_and_says_why(worker):
    _load(worker, "int8")
    assert worker.serving.rows == 1 and "one at a time" in worker.snapshot.batching
    results = [job.wait() for job in [_ask(worker, p) for p in PROMPTS[:3]]]
    assert all(r.together == 1 for r in results) and "Paris" in results[0].text
    _load(worker, "none")


def test_the_graphed_static_rows_give_the_same_answers_on_the_cpu(worker):
    """The GPU's running batch (static rows, buckets, columns shifted as rows join and leave; prompts arriving together
    prefilled together; each step launched before the previous one's tokens are read, each row's next token chosen on
    the device) runs here without a graph, through the same forward: staggered arrivals, a longer prompt joining late,
    rows leaving early, a seeded sampler. Its answers equal the plain batch's, one prompt joining at a time."""
    from core.serving.batch import Batch
    from core.serving.requests import RequestState, eos_ids, prompt_ids
    from core.serving.static_rows import StaticRows

    loaded = worker.engine.current
    prompts = [QUESTION, "Name a primary color.", "Explain in many words why the sky looks blue during the day.",
               "What is 2+2?", "Write a haiku about the sea.", "Who wrote Hamlet?"]
    lengths = [6, 20, 12, 16, 10, 14]
    sampled = GenerationSpec(greedy=False, temperature=0.9, top_k=40, top_p=0.9, seed=11, max_new_tokens=18)

    def state(prompt, new):
        spec = GenerationSpec(greedy=True, max_new_tokens=new) if new != 18 else sampled
        request = ChatRequest([{"role": "user", "content": prompt}], spec)
        return RequestState(request, prompt_ids(loaded, request.prompt, spec, None), eos_ids(loaded.model),
                            loaded.tokenizer, lambda piece: None, loaded.input_device)

    def answers(batch, arriving: int, asks=tuple(zip(prompts, [*lengths[:-1], 18]))) -> list:
        states = [state(p, n) for p, n in asks]
        waiting = list(states)
        while len(batch) or waiting:
            if waiting:  # `arriving` join every step, while others end at their own lengths
                batch.add([waiting.pop(0) for _ in range(min(arriving, len(waiting)))])
            if len(batch):
                batch.step()
        assert batch._launched is None  # nothing left in flight once the batch is empty
        return [tuple(s.generated) for s in states]

    alone = answers(Batch(loaded.model), 1)
    assert answers(Batch(loaded.model, StaticRows(loaded.model)), 1) == alone
    overlapped = Batch(loaded.model, StaticRows(loaded.model, capacity=8), overlap=True, prefill_together=True)
    assert answers(overlapped, 2) == alone
    assert overlapped.reused_tokens == 0 and len(overlapped.prefixes._kept) == len(prompts)
    again = answers(overlapped, 3)  # the store, its columns and the kept conversations, reused
    assert again == alone and overlapped.reused_tokens > 0
    # kept conversations and new ones in one prefill: both paddings, a kept row's columns gathered around a gap
    mixed = [(prompts[2], 12), ("Name three fruits.", 9), (prompts[0], 6), ("What is the boiling point of water?", 11)]
    assert answers(overlapped, 4, mixed) == answers(Batch(loaded.model), 1, mixed)
