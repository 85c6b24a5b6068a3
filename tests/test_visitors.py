"""Many visitors at once, against real app processes: answered together, each as if alone, and nobody waits for
a client that left.

In the order a visiting group acts: eight chats arrive together through gradio_client (equal to their solo
answers, faster than one at a time), one of them presses Stop; collaborators' /v1 clients give up and hang
up, and /call clients never read their results (the next request runs alone: the abandoned ones are gone);
one visitor of a shared app sends a burst (held to its per-visitor cap); two browser tabs stream at once.
"""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest

from conftest import QUESTION, AppProcess

KEY = "sk-visitors-0123456789"
MODEL = "SmolLM2-135M-Instruct"
PROMPTS = [QUESTION, "Name a primary color.", "Write a haiku about the sea.", "What is 2+2?", "Who wrote Hamlet?",
           "Give me a synonym for happy.", "What is the largest planet?", "Translate 'cat' to French."]
CHAT = dict(max_new_tokens=40, greedy=True)
TOGETHER = re.compile(r"answered together with (\d+) other")
FOOTER = re.compile(r"\n\n\*(?:stopped · )?answered by [^\n]*\*\s*$")


@pytest.fixture(scope="module")
def visitors_app(checkpoint, session_dir):
    process = AppProcess("visitors-app", session_dir, {"APP_OPENAI_API": "1", "APP_API_KEY": KEY,
                                                        "APP_MAX_BATCH": "8"})
    yield process
    process.stop()


def _text(history) -> str:
    content = history[-1]["content"]
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content)
    return FOOTER.sub("", content)


def _together(status: str) -> int:
    found = TOGETHER.search(status)
    return int(found.group(1)) + 1 if found else 1


def test_eight_chats_together_answer_as_alone_and_faster_and_stop_ends_only_one(visitors_app):
    client = visitors_app.client()
    client.predict(message="Hi", **CHAT, api_name="/generate")  # warm-up
    started = time.perf_counter()
    alone = [client.predict(message=p, **CHAT, api_name="/generate") for p in PROMPTS]
    one_at_a_time = time.perf_counter() - started
    assert all(_together(status) == 1 for _, status in alone)
    started = time.perf_counter()
    jobs = [client.submit(message=p, **CHAT, api_name="/generate") for p in PROMPTS]
    together = [job.result(timeout=300) for job in jobs]
    at_once = time.perf_counter() - started
    assert [_text(h) for h, _ in together] == [_text(h) for h, _ in alone]
    assert "Paris" in _text(together[0][0]) and max(_together(s) for _, s in together) >= 6
    assert one_at_a_time / at_once >= 1.6, (one_at_a_time, at_once)
    story = client.submit(message="Write a very long story about a lighthouse keeper.", max_new_tokens=400,
                          greedy=True, api_name="/generate")
    # Other visitors: each its own client (its own session), as each tab is; Stop cancels its own session's chats
    others = [visitors_app.client().submit(message=p, **CHAT, api_name="/generate") for p in PROMPTS[:3]]
    while not any("Generating" in str(out[1]) for out in story.outputs()):
        time.sleep(0.1)
    story.cancel()  # the visitor's Stop: Gradio closes its handler, which cancels its request
    assert [_text(job.result(timeout=300)[0]) for job in others] == [_text(h) for h, _ in alone[:3]]


def _v1(visitors_app, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{visitors_app.url}v1/chat/completions", json={"model": MODEL, "temperature": 0, **body},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=timeout)


def test_clients_that_give_up_or_never_read_cost_nothing(visitors_app):
    story = {"max_tokens": 400, "messages": [{"role": "user", "content": "Write a very long story about a ship."}]}

    def give_up() -> None:
        with pytest.raises(httpx.TimeoutException):
            _v1(visitors_app, story, timeout=1.0)

    hangers = [threading.Thread(target=give_up) for _ in range(3)]
    for thread in hangers:
        thread.start()
    for thread in hangers:
        thread.join()
    time.sleep(1.0)  # the server notices a hung-up client at its next poll (every 0.25 s)
    reply = _v1(visitors_app, {"max_tokens": 3, "messages": [{"role": "user", "content": QUESTION}]}).json()
    assert reply["usage"]["completion_tokens"] == 3
    assert reply["metrics"]["answered_together"] == 1  # the three stories were cancelled: it ran alone

    fn = {"data": ["Write a very long story about a dragon.", [], 400, True, 0.7, 0.9, 50, 1.0, -1, "", False, ""]}
    for _ in range(2):  # results never read: nobody opens the stream of these calls
        posted = httpx.post(f"{visitors_app.url}gradio_api/call/generate", json=fn, timeout=30)
        assert posted.status_code == 200 and posted.json()["event_id"]
    time.sleep(8)  # the grace for an unread call (5 s), then the next poll
    reply = _v1(visitors_app, {"max_tokens": 3, "messages": [{"role": "user", "content": QUESTION}]}).json()
    assert reply["metrics"]["answered_together"] == 1


def test_a_visitors_burst_is_held_to_its_cap_while_the_owner_is_not(shared_app, visitors_app):
    client = shared_app.client()
    jobs = [client.submit(message=p, **CHAT, api_name="/generate") for p in PROMPTS[:4]]
    statuses = [job.result(timeout=300)[1] for job in jobs]
    assert all("answered by" in s for s in statuses)
    assert max(_together(s) for s in statuses) == 2  # APP_MAX_ACTIVE_PER_VISITOR's default
    owner = visitors_app.client()
    statuses = [job.result(timeout=300)[1] for job in
                [owner.submit(message=p, **CHAT, api_name="/generate") for p in PROMPTS[:4]]]
    assert max(_together(s) for s in statuses) >= 3


def test_two_browser_tabs_stream_at_the_same_time(visitors_app, browser):
    from playwright.sync_api import expect

    from test_browser import open_page, send, shot

    pages = [open_page(browser, visitors_app.url) for _ in range(2)]
    for page in pages:
        page.evaluate("""() => { window.__streaming = []; setInterval(() => {
            const t = (document.querySelector('#chat-status') || {}).innerText || '';
            window.__streaming.push([Date.now(), t.startsWith('Generating')]); }, 20); }""")
    for page, topic in zip(pages, ("a lighthouse", "a dragon")):
        send(page, f"Write a long story about {topic}.")
    for page in pages:
        expect(page.get_by_text("answered together with 1 other").first).to_be_visible(timeout=180_000)
    shot(pages[0], "two-tabs-first")
    shot(pages[1], "two-tabs-second")
    spans = []
    for page in pages:
        times = [t for t, streaming in page.evaluate("window.__streaming") if streaming]
        spans.append((min(times), max(times)))
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]  # both streamed at once
    for page in pages:
        page.close()


def test_the_page_and_v1_models_answer_while_a_load_runs(visitors_app, browser):
    """Handlers read the worker's published snapshot, never the engine: during a load they see the model before it,
    after it the new one, and never a half-loaded one."""
    from playwright.sync_api import expect

    from test_browser import open_page

    headers = {"Authorization": f"Bearer {KEY}"}
    owner = visitors_app.client()
    load = owner.submit(quant="nf4", api_name="/load_model")
    page = open_page(browser, visitors_app.url)  # opened while the load runs: it shows the model loaded before it
    expect(page.get_by_text("Loaded", exact=False).first).to_be_visible(timeout=60_000)
    seen = []
    while not load.done():
        reply = httpx.get(f"{visitors_app.url}v1/models", headers=headers, timeout=30)
        seen.append((reply.status_code, [m["quantization"] for m in reply.json()["data"]]))
        time.sleep(0.05)
    assert seen and all(status == 200 and models in (["none"], ["nf4"]) for status, models in seen), seen
    assert "4-bit NF4" in load.result(timeout=300)[0]
    after = httpx.get(f"{visitors_app.url}v1/models", headers=headers, timeout=30).json()["data"][0]
    assert after["quantization"] == "nf4" and after["id"] == MODEL
    page.close()
    owner.predict(api_name="/load_model")  # back to the default
