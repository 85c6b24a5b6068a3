"""User errors become one readable message; anything unexpected a short one; a traceback only in the server log.

Core and server raise `EngineError`s whose text names the field, the value and the fix. Here they become
`gr.Error` (a toast in the browser, `AppError` in gradio_client) and one line in the log. For a
visitor, server paths are taken out of the message. Messages are HTML-escaped: Gradio renders them as HTML.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
from collections.abc import Callable

import gradio as gr

from core.errors import EngineError, first_line
from server.access import redact_paths
from server.context import AppContext

log = logging.getLogger("app")
_last_error: dict[str, str] = {}  # session -> the last error message shown to it, for `.failure()` listeners


def last_error(request: gr.Request | None) -> str:
    """The last error this session saw, as Markdown, for output areas that keep it after the toast is gone."""
    message = _last_error.get(getattr(request, "session_hash", None) or "", "")
    return f"**Failed:** {message}" if message else ""


def _request_and_profile(args: tuple, kwargs: dict) -> tuple[gr.Request | None, dict | None]:
    values = [*args, *kwargs.values()]
    request = next((v for v in values if isinstance(v, gr.Request)), None)
    profile = next((v for v in values if isinstance(v, gr.OAuthProfile)), None)
    return request, profile


def user_errors(ctx: AppContext) -> Callable[[Callable], Callable]:
    def decorate(handler: Callable) -> Callable:
        def translate(error: Exception, args: tuple, kwargs: dict) -> gr.Error:
            if isinstance(error, EngineError):
                message, title = error.message, error.title
                log.info("%s refused: %s: %s", handler.__name__, title, first_line(message))
            else:
                log.exception("unexpected error in %s", handler.__name__)
                message, title = (f"Unexpected error ({type(error).__name__}). The server log has the details.",
                                  "Unexpected error")
            request, profile = _request_and_profile(args, kwargs)
            if ctx.settings.shared and not ctx.caller(request, profile).is_owner:
                message = redact_paths(message)
            message = html.escape(message, quote=False)
            if request is not None and getattr(request, "session_hash", None):
                if len(_last_error) > 10_000:
                    _last_error.clear()
                _last_error[request.session_hash] = message
            return gr.Error(message, title=title, print_exception=False)

        if inspect.isgeneratorfunction(handler):
            @functools.wraps(handler)
            def stream(*args, **kwargs):
                try:
                    yield from handler(*args, **kwargs)
                except gr.Error:
                    raise
                except Exception as error:
                    raise translate(error, args, kwargs) from None
            return stream

        @functools.wraps(handler)
        def call(*args, **kwargs):
            try:
                return handler(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as error:
                raise translate(error, args, kwargs) from None
        return call
    return decorate
