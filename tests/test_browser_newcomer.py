"""A newcomer's first hour in a real browser (desktop and a 390x844 phone): right answers by default, errors that
don't hide the form, results that never go stale, Plan and the fit check agreeing, and a chat that feels like one.

Screenshots of every step land in `test-artifacts/`.
"""

from __future__ import annotations

import pytest

from conftest import QUESTION
from test_browser import WATCH_STATUS, last_answer, lines_per_cell, open_page, send, shot, wait_for_new_answer

pytest.importorskip("playwright.sync_api")
from playwright.sync_api import expect  # noqa: E402


def error_pills(page):
    """Gradio's red 'Error' badges over components (a failed event marks its outputs with them)."""
    return page.locator('[data-testid="status-tracker"]').get_by_text("Error", exact=True)


def test_the_default_settings_answer_right(browser, app_url):
    page = open_page(browser, app_url)
    page.get_by_role("tab", name="Generate").click()
    page.get_by_text("Sampling", exact=True).click()
    expect(page.get_by_text("Sampling defaults: the model's generation config sets none")).to_be_visible(
        timeout=30_000)
    send(page, QUESTION, greedy=False)  # exactly what a newcomer does: type and press Send
    assert "Paris" in last_answer(page)
    shot(page, "generate-tab")


def test_a_user_error_is_one_message_and_the_form_stays(browser, app_url):
    page = open_page(browser, app_url)
    page.get_by_text("Will it fit?", exact=False).first.click()
    page.get_by_role("button", name="Apply fix").click()
    expect(page.get_by_text("Run Will it fit? first", exact=False)).to_be_visible(timeout=30_000)
    assert error_pills(page).count() == 0
    expect(page.get_by_label("Max memory per device")).to_be_editable()
    page.get_by_role("tab", name="Generate").click()
    page.get_by_role("button", name="Send").click()  # nothing typed
    expect(page.get_by_text("type a message first", exact=False).first).to_be_visible(timeout=30_000)
    shot(page, "empty-send")
    chat = page.locator("#chat")
    expect(chat).to_be_visible()  # the chat is on the page, and the error is not in it
    assert "type a message first" not in chat.inner_text() and "Error" not in chat.inner_text()
    expect(error_pills(page)).to_have_count(1)  # beside the buttons, on the status line; none over the chat
    expect(page.locator("#chat-status").get_by_text("Error", exact=True)).to_have_count(1)


def test_a_failed_push_stays_on_the_page_after_its_toast(browser, app_url):
    page = open_page(browser, app_url)
    page.get_by_role("tab", name="Save & push").click()
    page.get_by_label("Repo id").fill("no-namespace")
    page.get_by_role("button", name="Push to the Hub").click()
    expect(page.get_by_text("Failed:", exact=False)).to_be_visible(timeout=30_000)
    expect(page.get_by_text("write it as 'your-name/model-name'", exact=False).first).to_be_visible()
    page.wait_for_timeout(11_000)  # the toast is gone after 10 s; the message in the output area stays
    expect(page.get_by_text("Failed:", exact=False)).to_be_visible()


def test_results_say_what_they_were_computed_for_and_go_stale(browser, app_url):
    page = open_page(browser, app_url)
    page.get_by_role("button", name="Plan").click()
    expect(page.get_by_text("Plan for", exact=False).first).to_be_visible(timeout=60_000)
    page.get_by_text("NF4 4-bit").click()
    expect(page.get_by_text("Outdated", exact=False).first).to_be_visible()
    shot(page, "model-tab")
    page.get_by_role("tab", name="Generate").click()
    page.locator("#fast-toggle input").check()
    expect(page.locator("#chat-status")).to_contain_text("Fast path turned on", timeout=30_000)
    page.locator("#fast-toggle input").uncheck()
    expect(page.locator("#chat-status")).to_contain_text("Fast path turned off", timeout=30_000)


def test_plan_and_fit_agree_about_gpus_that_are_not_here(browser, app_url):
    page = open_page(browser, app_url)
    page.get_by_label("Max memory per device").fill("0=200MB")
    page.get_by_role("button", name="Plan").click()
    expect(page.get_by_text("Planned for 1 GPU; this machine has no GPU").first).to_be_visible(timeout=60_000)
    page.get_by_text("Will it fit?", exact=False).first.click()
    page.get_by_role("button", name="Will it fit?", exact=True).click()
    expect(page.get_by_text("Planned for 1 GPU; this machine has no GPU")).to_have_count(2, timeout=60_000)
    page.get_by_role("button", name="Apply fix").click()
    expect(page.get_by_text("this machine can plan it but not load it", exact=False)).to_be_visible(timeout=30_000)
    shot(page, "fit-for-a-gpu")


def test_the_chat_feels_like_a_chat_on_a_phone(browser, app_url):
    page = open_page(browser, app_url, width=390, height=844)
    page.get_by_role("tab", name="Generate").click()
    send(page, QUESTION)
    chat = page.get_by_role("log", name="chatbot conversation")
    expect(chat).to_contain_text(QUESTION, timeout=5_000)  # the question shows at once
    first = last_answer(page)
    assert "Paris" in first and "answered by SmolLM2-135M-Instruct" in chat.inner_text()
    page.evaluate(WATCH_STATUS)
    page.get_by_role("button", name="Retry").click()
    wait_for_new_answer(page)
    assert chat.inner_text().count(QUESTION) == 1 and last_answer(page) == first  # regenerated, greedily the same
    page.get_by_role("button", name="Undo").click()
    expect(chat).not_to_contain_text(QUESTION)
    shot(page, "phone-generate")


def test_compare_gives_its_table_room_and_says_what_agreement_means(browser, app_url):
    page = open_page(browser, app_url)
    page.get_by_role("tab", name="Compare").click()
    page.get_by_role("checkbox", name="int8").uncheck()
    tokens = page.get_by_role("spinbutton", name="number input for Max new tokens")
    tokens.fill("8")  # the least: 4-bit decodes slowly on a CPU without AVX512-BF16
    tokens.press("Enter")
    page.get_by_role("button", name="Compare", exact=True).click()
    expect(page.locator("#compare-out")).to_contain_text("the none variant", timeout=60_000)  # progress, at once
    table = page.locator("#compare-out table")
    expect(table).to_contain_text("nf4", timeout=600_000)
    expect(table.locator("th").nth(2)).to_have_text("tokens")  # each answer's length beside its agreement
    assert "common." not in page.locator("body").inner_text()  # no untranslated progress words
    expect(page.locator("#compare-out")).to_contain_text("over the length both answers have")
    cells = lines_per_cell(page, '#compare-out th, #compare-out td:not(:nth-child(2))')
    assert len(cells) >= 12, cells  # the header and two rows were measured, not an empty table
    wrapped = [(text, lines) for text, lines in cells if lines > 1]
    assert wrapped == []  # no header or number cell breaks across lines ("tok/s", not "tok/" + "s")
    shot(page, "compare-tab")
