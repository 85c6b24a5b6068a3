"""The one model in memory, and the rules for replacing it.

A load is checked as far as it can be before the current model is touched (spec validation, the
model's config and its kind, and the placement plan, which must put every module on a GPU or the
CPU), so that most bad requests change nothing. Then the old model is freed, since two models rarely fit on one
GPU, and the new one loads; if that fails for any reason, the previous spec is loaded again and the
error says so. The engine is not thread-safe by itself: in the app, only the worker thread
(core.worker) calls it.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

from core import families, fastpath, loading, placement, source
from core.errors import BudgetTooSmallError, EngineError, LoadFailedError, NoModelLoadedError, first_line
from core.loading import LoadedModel
from core.spec import LoadSpec, OnProgress, validate

log = logging.getLogger(__name__)


class Engine:
    def __init__(self) -> None:
        self._current: LoadedModel | None = None
        # Called before the model is let go: whoever keeps state built on it (the worker's running batch, its caches
        # and graphs) lets go too, so that its weights are freed before another model loads.
        self.before_unload: list[Callable[[], None]] = []

    @property
    def current(self) -> LoadedModel:
        if self._current is None:
            raise NoModelLoadedError("No model is loaded yet. Open the Model tab and press Load.")
        return self._current

    @property
    def loaded(self) -> bool:
        return self._current is not None

    def preflight(self, spec: LoadSpec, progress: OnProgress | None = None) -> LoadSpec:
        """Every check that needs no weights: spec, model config and kind, placement. Raises EngineError."""
        checked = validate(spec, loading.cuda_device_count())
        config = source.load_config(checked, progress)
        families.of(config)  # a model of a kind this app cannot run is refused here
        if checked.device_map == "auto" and not checked.max_memory and loading.cuda_device_count() == 0:
            return checked  # everything goes to the CPU; nothing to plan
        refuse_unrunnable(placement.plan(checked, config=config))
        return checked

    def load(self, spec: LoadSpec, progress: OnProgress | None = None) -> LoadedModel:
        checked = self.preflight(spec, progress)
        previous = self._current.spec if self._current else None
        self.unload()
        try:
            loaded = loading.load(checked, progress)
            if checked.fast_path:
                fastpath.enable(loaded)
        except Exception as error:
            raise self._failed(error, previous) from error
        self._current = loaded
        return loaded

    def _failed(self, error: Exception, previous: LoadSpec | None) -> EngineError:
        """The error to raise after a failed load, with the previous model loaded again where possible."""
        if isinstance(error, EngineError):
            failure = error
        else:
            log.exception("load failed")
            failure = LoadFailedError(f"Loading failed ({type(error).__name__}: {first_line(error)}).")
        if previous is None:
            return failure
        try:
            self._restore(previous)
        except Exception:
            log.exception("the previous model could not be loaded again")
            failure.message += " The previous model could not be loaded again either: load a model."
        else:
            failure.message += " The previous model was loaded again and is ready."
        return failure

    def _restore(self, spec: LoadSpec) -> None:
        loaded = loading.load(spec)
        if spec.fast_path:
            fastpath.enable(loaded)
        self._current = loaded

    def unload(self) -> None:
        if self._current is None:
            return
        for hook in self.before_unload:
            hook()
        fastpath.reverse(self._current)
        self._current = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def refuse_unrunnable(plan: placement.PlacementPlan) -> None:
    """Weights on disk or left on the meta device can't run here: refuse before anything is freed."""
    stranded = {m: d for m, d in plan.device_map.items() if not isinstance(d, int) and d != "cpu"}
    if stranded:
        where = sorted({str(d) for d in stranded.values()})
        raise BudgetTooSmallError(
            f"The memory budget leaves {len(stranded)} module(s) with no room on a GPU or the CPU (they would go to "
            f"{', '.join(where)}, which this app does not run from). Raise the budget (for example add or enlarge "
            "'cpu=8GB'), remove the 'disk' entry, or quantize to 4-bit.")
