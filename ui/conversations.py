"""Past conversations, kept in the visitor's own browser: a list to reopen, a New chat, a Delete.

Gradio's `gr.BrowserState` keeps a value in the browser's localStorage (encrypted with a key sent to the page) and
hands it to handlers as an input; nothing is stored on the server. This is what `gr.ChatInterface(save_history=
True)` does, written out here because the Generate tab keeps its own chat plumbing (the `/generate` API with its
`history` parameter, a Stop that keeps the partial answer with its label, the queue position): ChatInterface's
submit and stop cannot be used apart from its own. The saved value is a list of conversations, the most recently
used first, each a list of messages as the chatbot holds them (with each answer's "answered by" label).
"""

from __future__ import annotations

import gradio as gr

STORAGE_KEY = "quantized-llm-app-conversations"
# The browser holds the key too, so it only keeps the stored text from being plain; a fixed one lets conversations
# survive a restart of the app (Gradio's default, a random key per start, would lose them).
SECRET = "quantized-llm-app: conversations stay in this browser"
KEEP = 30  # conversations kept; the oldest go first (localStorage holds about 5 MB per site)
TITLE_CHARS = 40


def text_of(content) -> str:
    """A message's text, whatever shape its content came in."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # gradio 6 may send [{"type": "text", "text": ...}]
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return "" if content is None else str(content)


def storage() -> gr.BrowserState:
    return gr.BrowserState([], storage_key=STORAGE_KEY, secret=SECRET)


def title(conversation: list) -> str:
    first = next((text_of(m.get("content")) for m in conversation if m.get("role") == "user"), "") or "(empty)"
    first = " ".join(first.split())
    return first if len(first) <= TITLE_CHARS else first[:TITLE_CHARS - 1] + "…"


def listing(saved: list | None, current: int | None) -> dict:
    """The list to choose from, with the open conversation selected."""
    conversations = saved or []
    choices = [(title(c), i) for i, c in enumerate(conversations)]
    return gr.update(choices=choices, value=current if current is not None and current < len(choices) else None,
                     label=f"Conversations ({len(choices)})")


def remember(history: list | None, saved: list | None, current: int | None):
    """Stores the open conversation first in the list (a new one is added); an empty chat is not stored."""
    conversations = list(saved or [])
    if current is not None and current < len(conversations):
        conversations.pop(current)
    if history:
        conversations.insert(0, list(history))
        current = 0
    else:
        current = None
    conversations = conversations[:KEEP]
    return conversations, current, listing(conversations, current)


def restore(saved: list | None, history: list | None, current: int | None, restored: bool):
    """Once the browser has handed over its stored conversations (at page load, or a moment later): the list, and
    the most recent conversation open again, unless the visitor has started a chat meanwhile."""
    conversations = saved or []
    if restored or history or not conversations:
        return gr.skip(), gr.skip(), listing(conversations, current), restored or bool(conversations)
    return list(conversations[0]), 0, listing(conversations, 0), True


def open_one(index: int | None, saved: list | None):
    conversations = saved or []
    if index is None or not 0 <= index < len(conversations):
        return gr.skip(), gr.skip(), gr.skip()
    return list(conversations[index]), index, ""


def new_chat(saved: list | None):
    return [], None, "", listing(saved, None)


def delete(saved: list | None, current: int | None):
    """Removes the open conversation from the list and empties the chat."""
    conversations = list(saved or [])
    if current is not None and current < len(conversations):
        conversations.pop(current)
    return conversations, [], None, "", listing(conversations, None)
