"""A real browser (Playwright driving Debian's chromium) used the way people use the app.

Screenshots of each step land in `test-artifacts/` (git-ignored) for a human to look at.
"""

from __future__ import annotations

import subprocess
import sys

from conftest import QUESTION, ROOT, subprocess_env

ARTIFACTS = ROOT / "test-artifacts"
WAITING = "waiting for the model"

# Records every distinct text of the conversation (the chatbot's ARIA log), to prove the answer streams in.
WATCH_CHAT = """() => {
  window.__seen = [];
  setInterval(() => {
    const log = document.querySelector('#chat [role="log"]');
    const text = log ? log.innerText.trim() : '';
    if (text && window.__seen[window.__seen.length - 1] !== text) window.__seen.push(text);
  }, 15);
}"""


def open_page(browser, url: str, width: int = 1280, height: int = 900):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(url)
    page.get_by_role("tab", name="Model").wait_for()
    # The page's opening event fills the form from the loaded model: wait for it, as its result would replace
    # whatever a test types first (its load report, or the note that no model is loaded: the report is empty
    # until then).
    page.wait_for_function("() => /footprint|No model loaded yet/.test(document.body.innerText)", timeout=120_000)
    return page


def open_tab(page, name: str) -> None:
    """Clicks a tab; every tab is in the tab bar on any screen (the bar wraps), none behind a "more" menu."""
    tab = page.get_by_role("tab", name=name)
    assert tab.is_visible(), f"the {name} tab is not in the tab bar"
    tab.click()


WATCH_STATUS = """() => {
  window.__status = [];
  setInterval(() => {
    const el = document.querySelector('#chat-status');
    const text = el ? el.innerText.trim() : '';
    if (window.__status[window.__status.length - 1] !== text) window.__status.push(text);
  }, 10);
}"""


def wait_for_new_answer(page, timeout_ms: int = 120_000) -> None:
    """After a Send or Retry started with WATCH_STATUS running: until a later status carries the metrics."""
    page.wait_for_function("() => { const s = window.__status; const i = s.findIndex(t => t.startsWith('Waiting')"
                           " || t.startsWith('Generating')); return i >= 0 && s.slice(i).some(t => t.includes("
                           "'tok/s')); }", timeout=timeout_ms)


def lines_per_cell(page, cells: str) -> list[tuple[str, int]]:
    """Each table cell matched by the CSS selector `cells`: its text and the number of lines the browser drew it on."""
    return [tuple(cell) for cell in page.evaluate("""selector => [...document.querySelectorAll(selector)].map(cell => {
      const range = document.createRange();
      range.selectNodeContents(cell);
      return [cell.innerText.trim(), new Set([...range.getClientRects()].map(r => Math.round(r.top))).size];
    })""", cells)]


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def open_sampling(page) -> None:
    box = page.get_by_label("Greedy")
    if box.count() == 0 or not box.is_visible():
        page.get_by_text("Sampling", exact=True).click()
        box.wait_for()


def send(page, text: str, greedy: bool = True) -> None:
    page.get_by_role("tab", name="Generate").click()
    if greedy:
        open_sampling(page)
        page.get_by_label("Greedy").check()
    page.get_by_label("Message", exact=True).fill(text)
    page.get_by_role("button", name="Send").click()


def last_answer(page, question: str = QUESTION) -> str:
    """The answer to the last `question` once it carries its 'answered by' footer, without the footer."""
    from playwright.sync_api import expect

    log = page.get_by_role("log", name="chatbot conversation")
    expect(log).to_contain_text("answered by", timeout=120_000)
    return log.inner_text().rsplit(question, 1)[1].rsplit("answered by", 1)[0].strip()


def test_load_then_stream_an_answer(browser, app_url):
    from playwright.sync_api import expect

    page = open_page(browser, app_url)
    page.get_by_role("button", name="Load", exact=True).click()
    expect(page.get_by_text("Loaded", exact=False).first).to_be_visible(timeout=180_000)
    expect(page.get_by_text("footprint").first).to_be_visible()
    page.evaluate(WATCH_CHAT)
    send(page, QUESTION)
    conversation = page.get_by_role("log", name="chatbot conversation")
    expect(conversation).to_contain_text("Paris", timeout=120_000)
    expect(page.get_by_text("tok/s").first).to_be_visible(timeout=30_000)
    seen = [text for text in page.evaluate("window.__seen") if QUESTION in text]
    answers = [text.split(QUESTION, 1)[1].strip() for text in seen]
    # The question showed at once: marked as waiting, or (when the first token came within one update) with only
    # the start of its answer
    assert answers and (WAITING in answers[0] or "answered by" not in answers[0]), answers
    streamed = [a for a in answers if a and WAITING not in a]
    assert [a for a in streamed if "Paris" not in a], answers  # parts of the answer showed before all of it
    parts = [a.split("answered by", 1)[0].strip() for a in streamed]
    final = parts[-1]
    # Each part shown while streaming is the start of the final answer (a frame the browser drew while it re-rendered
    # a message, seen once in a loaded suite, may be shorter than the one before it; it is still a start of it).
    assert "Paris" in final and all(final.startswith(a) for a in parts), streamed
    shot(page, "chat")


def test_chat_save_chat_again_and_reload_the_save(browser, app):
    from playwright.sync_api import expect

    page = open_page(browser, app.url)
    send(page, QUESTION)
    first = last_answer(page)
    assert "Paris" in first
    page.get_by_role("tab", name="Save & push").click()
    page.get_by_role("button", name="Save on the server").click()
    expect(page.get_by_text("Saved", exact=False).first).to_be_visible(timeout=180_000)
    shot(page, "saved")
    page.get_by_role("tab", name="Generate").click()
    page.get_by_role("button", name="New chat").click()
    send(page, QUESTION)
    assert last_answer(page) == first
    folder = max(app.save_dir.glob("*"), key=lambda p: p.stat().st_mtime)
    reload = ("import sys; sys.path.insert(0, sys.argv[2]); from core import loading, generation; "
              "from core.spec import LoadSpec, GenerationSpec; m = loading.load(LoadSpec(model=sys.argv[1])); "
              "print(generation.generate(m, [sys.argv[3]], GenerationSpec(greedy=True, max_new_tokens=128))"
              ".texts[0])")
    done = subprocess.run([sys.executable, "-c", reload, str(folder), str(ROOT), QUESTION], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == first


def test_stop_then_another_tab_chats(browser, app_url):
    from playwright.sync_api import expect

    first = open_page(browser, app_url)
    first.get_by_role("tab", name="Generate").click()
    open_sampling(first)
    first.locator("#max-new-tokens input[type=number]").fill("500")
    send(first, "Write a very long story about a lighthouse keeper and his cat.")
    log = first.get_by_role("log", name="chatbot conversation")
    expect(first.locator("#chat-status")).to_contain_text("Generating", timeout=120_000)
    first.wait_for_timeout(1500)
    first.get_by_role("button", name="Stop").click()
    expect(first.locator("#chat-status")).to_contain_text("Stopped", timeout=30_000)
    expect(log).to_contain_text("stopped · answered by")
    shot(first, "stopped")
    second = open_page(browser, app_url)
    send(second, QUESTION)
    assert "Paris" in last_answer(second)
