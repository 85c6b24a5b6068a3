"""The user-facing errors of the engine.

Core raises only these for problems a user can fix; the outermost layer (the CLI, the Gradio app)
turns them into its own error type. Each message says what went wrong and what to do about it,
and never contains a token.
"""

from __future__ import annotations


def first_line(text: object, limit: int = 300) -> str:
    """The first line of a message (surrounding blank space dropped), at most `limit` characters: what a one-line
    summary or log entry quotes of a longer error."""
    return (str(text).strip().splitlines() or [""])[0][:limit]


class EngineError(Exception):
    """Base of every error whose message is meant for the user."""

    title = "Error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class SpecError(EngineError):
    """A field of a request has a value that cannot work; raised before anything is downloaded."""

    title = "Invalid setting"

    def __init__(self, field: str, value: object, fix: str) -> None:
        self.field = field
        self.value = value
        super().__init__(f"{field}={_shown(value)} is not valid: {fix}")


def _shown(value: object, limit: int = 120) -> str:
    """A value as an error quotes it: its repr, cut to `limit` characters, so that a megabyte of input is never echoed
    back (nor written to the log)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 20]}… ({len(text):,} characters)"


class ModelNotFoundError(EngineError):
    title = "Model not found"


class HubUnreachableError(EngineError):
    title = "Hugging Face Hub unreachable"


class BudgetTooSmallError(EngineError):
    """The memory budget cannot hold the model as requested."""

    title = "Does not fit"


class OutOfMemoryError(EngineError):
    title = "Out of memory"


class EnvironmentNotSupportedError(EngineError):
    """An option needs hardware or a library this machine does not have."""

    title = "Not supported here"


class NoModelLoadedError(EngineError):
    title = "No model loaded"


class LoadFailedError(EngineError):
    """A load failed for a reason the engine did not foresee (a broken checkpoint, code that raised)."""

    title = "Load failed"


class QueueFullError(EngineError):
    title = "Queue full"


class InputTooLongError(EngineError):
    title = "Input too long"


class SaveError(EngineError):
    title = "Save refused"


class PushError(EngineError):
    """A push failed; the saved folder is kept so that a retry does not save again."""

    title = "Push failed"

    def __init__(self, message: str, saved_folder: str | None = None) -> None:
        super().__init__(message)
        self.saved_folder = saved_folder
