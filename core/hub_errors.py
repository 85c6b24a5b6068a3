"""Hub failures in one sentence each. Needs only huggingface_hub (and core.errors, which needs nothing), so the
Space publisher can use it."""

from __future__ import annotations

from core.errors import first_line


def explain_hub_error(error: Exception, repo_id: str) -> str:
    """One sentence for each way a Hub call fails; never includes the token."""
    from huggingface_hub.errors import HfHubHTTPError

    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, HfHubHTTPError) and status == 401:
        return "The Hub rejected the token (401). Sign in again, or create a token with write access."
    if isinstance(error, HfHubHTTPError) and status == 403:
        namespace = repo_id.split("/")[0]
        return (f"The token may not write to {namespace!r} (403). Push to your own namespace, or ask an admin of "
                f"{namespace!r} for write access.")
    if isinstance(error, HfHubHTTPError) and status == 400:
        return f"The Hub refused the request (400): {_short(error)}"
    if isinstance(error, HfHubHTTPError):
        return f"The Hub answered with an error ({status}): {_short(error)}"
    if isinstance(error, (ConnectionError, OSError)) or "Connect" in type(error).__name__:
        return "Could not reach the Hugging Face Hub. Check the network and try again."
    return f"The push failed: {type(error).__name__}: {_short(error)}"


def _short(error: Exception) -> str:
    return first_line(error) or type(error).__name__
