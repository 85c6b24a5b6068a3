"""A newcomer's second hour in a real browser: one truth on the page, every tab on a phone, chats that survive a
reload (issue 23). Each test follows one user through the steps that belong together, in the order they act.

Screenshots of every tab at 390x844 (a phone) and 1366x900 land in `test-artifacts/`; the README's come from them.
"""

from __future__ import annotations

import pytest

from conftest import QUESTION
from test_browser import (WATCH_STATUS, last_answer, lines_per_cell, open_page, open_sampling, send, shot,
                          wait_for_new_answer)

pytest.importorskip("playwright.sync_api")
from playwright.sync_api import expect  # noqa: E402

TABS = ("Model", "Generate", "Save & push", "Compare")
COLOR = "Name a primary color."

# Elements wider than the screen, which a phone would have to scroll sideways to read (tables may scroll inside
# their own box, so they are not counted).
WIDER_THAN_SCREEN = """() => [...document.querySelectorAll('button, input, textarea, label, [role=tab]')]
  .filter(el => el.offsetParent !== null && el.getBoundingClientRect().right > window.innerWidth + 1)
  .map(el => el.outerHTML.slice(0, 80))"""


def short_answers(page, tokens: int = 12) -> None:
    """At most `tokens` new tokens per answer (the Sampling panel), so that answers on 2 shared cores come quickly."""
    page.get_by_role("tab", name="Generate").click()
    open_sampling(page)
    page.locator("#max-new-tokens input[type=number]").fill(str(tokens))
    page.locator("#max-new-tokens input[type=number]").press("Enter")


def every_tab(page, size: str) -> None:
    """Each tab from the tab bar, one tap each (none folded into a menu), and a screenshot of it."""
    for name in TABS:
        tab = page.get_by_role("tab", name=name)
        expect(tab).to_be_visible()
        tab.click()
        expect(tab).to_have_attribute("aria-selected", "true")
        page.wait_for_timeout(300)
        assert page.evaluate(WIDER_THAN_SCREEN) == [], name
        shot(page, f"{size}-{name.split()[0].lower()}")
    assert not page.get_by_role("button", name="More tabs").is_visible()


def test_one_truth_on_the_page_for_every_visitor(browser, app):
    page = open_page(browser, app.url, width=1366, height=900)
    try:
        report = page.locator("#load-out")
        expect(report).to_contain_text("float32", timeout=60_000)  # the loaded model's report, once the page opens
        assert "packed" not in report.inner_text()  # no "quantized weights packed" on a full-precision model
        # Point 7: a CPU-only budget too small says so, names no GPU, and stays on the page after its toast.
        page.get_by_text("LLM.int8() 8-bit").click()
        page.get_by_label("Max memory per device").fill("cpu=100MB")
        page.get_by_role("button", name="Load", exact=True).click()
        error = page.locator("#load-error")
        expect(error).to_contain_text("The CPU budget (cpu=100MB) cannot hold", timeout=60_000)
        assert "GPU" not in error.inner_text()
        # Points 5 and 6: the fit check offers moving the model to the GPU with room; the fix keeps the units.
        budget = "0=150MB, 1=1GiB, cpu=8GB"
        page.get_by_label("Max memory per device").fill(budget)
        page.get_by_text("Will it fit?", exact=False).first.click()
        page.get_by_role("button", name="Will it fit?", exact=True).click()
        expect(page.locator("#fit-out")).to_contain_text("Put the whole model on cuda:1", timeout=120_000)
        page.get_by_role("button", name="Apply fix").click()
        expect(page.locator("#form-device-map input")).to_have_value("cuda:1")
        expect(page.get_by_label("Max memory per device")).to_have_value(budget)
        expect(page.locator("#fit-out")).to_contain_text("Outdated")
        page.get_by_role("button", name="Will it fit?", exact=True).click()
        expect(page.locator("#fit-out")).to_contain_text("Fits", timeout=120_000)
        page.reload()  # Point 3: the form shows the loaded model again, not what was typed
        page.get_by_role("tab", name="Model").wait_for()
        expect(page.get_by_role("radio", name="none (full precision)")).to_be_checked()
        expect(page.get_by_label("Max memory per device")).to_have_value("")
        expect(page.locator("#form-device-map input")).to_have_value("auto")

        # Point 1: one fast-path state, shown the same in both boxes, the note and the status line.
        short_answers(page)
        send(page, QUESTION)
        assert "Paris" in last_answer(page)
        page.locator("#fast-toggle input").check()
        expect(page.locator("#chat-status")).to_contain_text("Fast path turned on", timeout=60_000)
        expect(page.locator("#fast-note")).to_contain_text("Fast path on")
        page.get_by_role("tab", name="Model").click()
        expect(page.locator("#form-fast-path input")).to_be_checked()
        page.get_by_text("FP4 4-bit").click()
        page.get_by_role("button", name="Load", exact=True).click()
        expect(report.locator("table")).to_contain_text("4-bit FP4", timeout=300_000)  # the new report, not progress
        expect(report).to_contain_text("packed")
        page.get_by_role("tab", name="Generate").click()
        expect(page.locator("#fast-toggle input")).to_be_checked()
        expect(page.locator("#fast-note")).to_contain_text("Fast path on")
        page.evaluate(WATCH_STATUS)
        send(page, COLOR)
        wait_for_new_answer(page)
        expect(page.locator("#chat-status")).to_contain_text("fast path on")
        # Point 2: every answer keeps the model that wrote it, across the load.
        chat = page.get_by_role("log", name="chatbot conversation")
        labels = [line for line in chat.inner_text().splitlines() if "answered by" in line]
        assert [line.rsplit("·", 1)[1].strip() for line in labels] == ["float32", "fp4"], labels
        every_tab(page, "1366x900")

        # Point 3: a page opened now (any visitor, or a reload) shows the loaded model's settings.
        other = open_page(browser, app.url, width=1366, height=900)
        expect(other.get_by_role("radio", name="FP4 4-bit")).to_be_checked()
        expect(other.locator("#form-fast-path input")).to_be_checked()
        expect(other.locator("#load-out table")).to_contain_text("4-bit FP4")
        other.get_by_role("tab", name="Generate").click()
        expect(other.locator("#fast-toggle input")).to_be_checked()
        other.close()

        # Point 4: Undo drops the exchange and the status line that described it; with nothing left, says so.
        page.get_by_role("tab", name="Generate").click()
        page.get_by_role("button", name="Undo").click()
        expect(page.locator("#chat-status")).to_have_text("Removed the last exchange.")
        expect(chat).not_to_contain_text(COLOR)
        page.get_by_role("button", name="Undo").click()
        page.get_by_role("button", name="Undo").click()
        expect(page.locator("#chat-status")).to_have_text("Nothing to undo yet.")
    finally:
        page.close()
        app.client().predict(api_name="/load_model")  # the embedded model in full precision, fast path off


def test_a_phone_reaches_every_tab_and_keeps_its_conversations(browser, app_url):
    page = open_page(browser, app_url, width=390, height=844)
    every_tab(page, "390x844")
    page.get_by_role("tab", name="Model").click()
    cells = lines_per_cell(page, '#load-out th, #load-out td')
    assert len(cells) >= 16, cells  # the report's table was measured
    broken = [(text, lines) for text, lines in cells if " " not in text and lines > 1]
    assert broken == []  # one word stays on one line ("property", not "propert" + "y")

    # Point 13: conversations survive a reload, in this browser only; answers can be edited, copied, regenerated.
    short_answers(page)
    send(page, QUESTION)
    assert "Paris" in last_answer(page)
    chat = page.locator("#chat")
    expect(chat.get_by_role("button", name="Copy message").first).to_be_visible()
    page.evaluate(WATCH_STATUS)
    chat.get_by_role("button", name="Edit").first.click()
    chat.locator("textarea").fill("What is the capital of Italy?")
    chat.get_by_role("button", name="Submit").click()
    wait_for_new_answer(page)
    log = page.get_by_role("log", name="chatbot conversation")
    edited = last_answer(page, "What is the capital of Italy?")
    assert "Italy" in edited and "Paris" not in edited  # answered the edited message (the 135M model's geography)
    assert QUESTION not in log.inner_text()  # the edited message replaced the first one
    page.get_by_role("button", name="New chat").click()
    expect(page.locator("#chat-status")).to_have_text("")
    send(page, COLOR, greedy=False)
    last_answer(page, COLOR)
    page.reload()
    short_answers(page)
    expect(page.get_by_role("log", name="chatbot conversation")).to_contain_text(COLOR, timeout=30_000)
    page.get_by_text("Conversations", exact=True).click()
    saved = page.locator("#conversation-list")
    expect(saved.get_by_role("radio")).to_have_count(2)
    saved.get_by_text("What is the capital of Italy?").click()
    expect(page.get_by_role("log", name="chatbot conversation")).to_contain_text(edited)
    shot(page, "390x844-conversations")
    stranger = open_page(browser, app_url, width=390, height=844)  # another browser: nothing of this one's
    stranger.get_by_role("tab", name="Generate").click()
    stranger.get_by_text("Conversations", exact=True).click()
    expect(stranger.locator("#conversation-list").get_by_role("radio")).to_have_count(0)
    stranger.close()
    page.get_by_role("button", name="Delete this chat").click()
    expect(saved.get_by_role("radio")).to_have_count(1)
