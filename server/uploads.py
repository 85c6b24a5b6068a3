"""The app takes no files, so the HTTP routes through which Gradio writes a request's files to the server are closed.

Gradio keeps what it receives on its upload route (and in multipart bodies of its other routes) in its temp folder, for
anyone to send: thirty anonymous 900 KB uploads all landed there. Nothing on the page or in the API takes a file, so
the middleware below refuses such requests for everyone before Gradio reads them. Gradio's login form (`--auth`) is
the one multipart request the app accepts.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

REFUSAL = "This app takes no files: uploads are refused."
_WRITING_ROUTES = ("/upload", "/process_recording")  # Gradio's routes that store a request's files
_LOGIN = ("/login", "/login/")


def writes_files(method: str, path: str, content_type: str) -> bool:
    """Whether a request would have Gradio store files it carries."""
    if method != "POST" or path.endswith(_LOGIN):
        return False
    return path.rstrip("/").endswith(_WRITING_ROUTES) or content_type.lower().startswith("multipart/")


class RefuseUploads:
    """ASGI middleware: 403 for every request that `writes_files`, before its body is read."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            content_type = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"content-type"), "")
            if writes_files(scope["method"], scope["path"], content_type):
                await JSONResponse({"detail": REFUSAL}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)
