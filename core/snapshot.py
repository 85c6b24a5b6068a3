"""What handlers may know about the loaded model: an immutable record the model worker publishes after each job.

Only the worker thread touches the engine and the model (core.worker). Pages, the API and the status line
run on other threads and on the event loop, so they read this snapshot instead: it is built on the worker
thread from the loaded model once a job has ended, and replaced whole (one attribute assignment), so a
reader sees the model before or after a load, never one half-way. During a load the previous snapshot
stays: requests queued behind the load are answered by the new model, and say so when they end.
"""

from __future__ import annotations

from dataclasses import dataclass

from core import fastpath, generation
from core.fastpath import FastPathState
from core.loading import LoadedModel, LoadReport
from core.spec import GenerationSpec, LoadSpec, model_name


@dataclass(frozen=True)
class Snapshot:
    model: str  # the name pages and /v1 show (core.spec.model_name)
    spec: LoadSpec
    report: LoadReport
    fast_path: FastPathState
    defaults: GenerationSpec  # sampling defaults from the model's generation config
    defaults_note: str  # where those defaults came from, in words
    context_window: int | None
    batching: str  # how chats are served together on this model, or why one at a time (core.serving)

    @property
    def precision(self) -> str:
        """The quantization mode, or the dtype of a full-precision model: what an answer's label names."""
        return self.spec.quant.mode if self.spec.quant.enabled else self.spec.dtype


def of(loaded: LoadedModel, batching: str) -> Snapshot:
    """Built on the worker thread, which owns `loaded`."""
    defaults, note = generation.defaults_from(loaded)
    return Snapshot(model=model_name(loaded.report.model), spec=loaded.spec, report=loaded.report,
                    fast_path=fastpath.state(loaded), defaults=defaults, defaults_note=note,
                    context_window=generation.context_window(loaded), batching=batching)
