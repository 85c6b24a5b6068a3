"""The one model in memory, and the rules for replacing it.

A load is checked as far as it can be before the current model is touched (spec validation, model
resolution and the placement plan), so that most bad requests change nothing. Then the old model
is freed, since two models rarely fit on one GPU, and the new one loads; if that fails, the
previous spec is loaded again and the error says so. All work is serialized by one lock: one GPU
serves one request at a time (the app's queue also has concurrency 1).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable

from core import fastpath, loading, placement, source
from core.errors import EngineError, NoModelLoadedError
from core.loading import LoadedModel
from core.spec import LoadSpec, validate

Progress = Callable[[float, str], None]


class Engine:
    def __init__(self) -> None:
        self._current: LoadedModel | None = None
        self.lock = threading.RLock()

    @property
    def current(self) -> LoadedModel:
        if self._current is None:
            raise NoModelLoadedError("No model is loaded yet. Open the Model tab and press Load.")
        return self._current

    @property
    def loaded(self) -> bool:
        return self._current is not None

    def preflight(self, spec: LoadSpec, progress: Progress | None = None) -> LoadSpec:
        """Every check that needs no weights: spec, model existence, placement. Raises EngineError."""
        checked = validate(spec, loading.cuda_device_count())
        config = source.load_config(checked, progress)
        if checked.device_map == "auto" and not checked.max_memory and loading.cuda_device_count() == 0:
            return checked  # everything goes to the CPU; nothing to plan
        placement.plan(checked, config=config)
        return checked

    def load(self, spec: LoadSpec, progress: Progress | None = None) -> LoadedModel:
        with self.lock:
            checked = self.preflight(spec, progress)
            previous = self._current.spec if self._current else None
            self.unload()
            try:
                loaded = loading.load(checked, progress)
            except EngineError as error:
                if previous is not None:
                    self._restore(previous)
                    error.message += " The previous model was loaded again and is ready."
                raise
            if checked.fast_path:
                fastpath.enable(loaded)
            self._current = loaded
            return loaded

    def _restore(self, spec: LoadSpec) -> None:
        loaded = loading.load(spec)
        if spec.fast_path:
            fastpath.enable(loaded)
        self._current = loaded

    def unload(self) -> None:
        with self.lock:
            if self._current is None:
                return
            fastpath.reverse(self._current)
            self._current = None
            gc.collect()
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except ImportError:
                pass
