"""A real browser (Playwright driving Debian's chromium) loads the default model and chats with it."""

from __future__ import annotations

import shutil

import pytest

from conftest import QUESTION

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags for a closed network and a root user; without the background-networking ones chromium keeps
# trying to reach Google's hosts.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Records every distinct text of the conversation (the chatbot's ARIA log), to prove the answer streams in.
WATCH_CHAT = """() => {
  window.__seen = [];
  setInterval(() => {
    const log = document.querySelector('#chat [role="log"]');
    const text = log ? log.innerText.trim() : '';
    if (text && window.__seen[window.__seen.length - 1] !== text) window.__seen.push(text);
  }, 15);
}"""


@pytest.fixture()
def page(app_url, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(app_url)
        yield page
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        browser.close()


def test_browser_loads_default_model_and_streams_an_answer(page, tmp_path):
    from playwright.sync_api import expect

    page.get_by_role("button", name="Load", exact=True).click()
    expect(page.get_by_text("Loaded", exact=False).first).to_be_visible(timeout=180_000)
    expect(page.get_by_text("footprint").first).to_be_visible()
    page.get_by_role("tab", name="Generate").click()
    page.get_by_text("Sampling").click()
    page.get_by_label("Greedy").check()
    page.evaluate(WATCH_CHAT)
    page.get_by_label("Message").fill(QUESTION)
    page.get_by_role("button", name="Send").click()
    conversation = page.get_by_role("log", name="chatbot conversation")
    expect(conversation).to_contain_text("Paris", timeout=120_000)
    expect(page.get_by_text("tok/s").first).to_be_visible(timeout=30_000)
    seen = [text for text in page.evaluate("window.__seen") if QUESTION in text]
    answers = [text.split(QUESTION, 1)[1].strip() for text in seen]
    partial = [a for a in answers if a and "Paris" not in a]
    assert partial, answers  # parts of the answer were on the page before the whole of it
    assert "Paris" in answers[-1] and all(len(a) <= len(b) for a, b in zip(answers, answers[1:]))
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    assert (tmp_path / "chat.png").stat().st_size > 10_000
