"""The README's examples, run as written against a real app process (only the address is the test app's)."""

from __future__ import annotations

import re

from conftest import QUESTION, ROOT
from test_app import content


def readme_block(after: str) -> str:
    """The first ```python block of the README after the line that starts with `after`."""
    text = (ROOT / "README.md").read_text()
    start = text.index("\n" + after)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_the_readmes_conversation_example_runs(app):
    code = readme_block("A conversation goes on by sending the history back")
    assert code.count('"http://127.0.0.1:7860/"') == 1
    scope: dict = {}
    exec(code.replace('"http://127.0.0.1:7860/"', repr(app.url)), scope)  # noqa: S102 - the README's own code
    history = scope["history"]
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert content(history[0]) == QUESTION and content(history[2]) == "And of Spain?"
    assert "answered by" in content(history[-1]) and "tok/s" in scope["status"]
