"""The GPU decode step as a CUDA graph, hooked into `model.generate()` without changing the model.

Plain decode at batch 1 is host-bound: an 8B model runs ~1,500 kernel launches per token, and the
GPU idles ~80% of each step (benchmarks/RESULTS.md). Here the engine owns a `StaticCache` per
batch size, captures the decode forward once in a CUDA graph (optionally of a `torch.compile`d
forward), and routes generate() to it through two *instance* attributes that generate() already
consults: `_valid_auto_compile_criteria` and `get_compiled_call`. Prefill runs normally; each decode
step copies its inputs into the graph's buffers and replays it. No weight, module, config value or
class attribute changes; `release()` deletes the two attributes and frees caches and graphs.

bitsandbytes 0.50's 4-bit matmul and the fast path's own kernels (core.kernels) are torch.library
ops, so their layers capture and compile cleanly. bitsandbytes' LLM.int8() matmul with an outlier
threshold syncs with the host inside each layer and cannot be captured: fastpath.choose() graphs
int8 models only with the W8A16 kernel in its place. `compile_mode` is torch.compile's mode:
"default", or "max-autotune-no-cudagraphs" (Inductor tunes its kernels; the graph stays ours).

Also here, `defer_stop_checks`: generate() reads "all sequences finished?" from the GPU after every
step, a host sync; transformers defers that check by one step on Apple GPUs only. Enabling it on
CUDA saves ~1 ms a step (+8-12%); streamed tokens then arrive one step later.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch

LENGTH_STEP = 256  # static caches grow in steps of this many tokens, so most requests reuse a graph


class GraphedDecode:
    def __init__(self, model, compile_step: bool = False, compile_mode: str = "default") -> None:
        self.model = model
        self.compile_step = compile_step
        self.forward = (torch.compile(model, mode=compile_mode, fullgraph=True, dynamic=False)
                        if compile_step else model)  # a wrapper: `model` itself is not modified
        self.pool = torch.cuda.graph_pool_handle()
        self.caches: dict[int, object] = {}
        self.graphs: dict[tuple, types.SimpleNamespace] = {}
        self.length = 0

    def install(self) -> GraphedDecode:
        caches = self.caches
        self.model._valid_auto_compile_criteria = (
            lambda model_kwargs, generation_config: any(model_kwargs.get("cache") is c for c in caches.values()))
        self.model.get_compiled_call = lambda compile_config=None: self.step
        return self

    def release(self) -> None:
        for name in ("_valid_auto_compile_criteria", "get_compiled_call"):
            self.model.__dict__.pop(name, None)
        self.graphs.clear()
        self.caches.clear()
        self.forward = None
        if self.compile_step:
            torch._dynamo.reset()
        torch.cuda.empty_cache()

    def cache_for(self, batch: int, needed: int):
        """A reset static cache for `batch` sequences of up to `needed` tokens (prompt + new + 1)."""
        from transformers import StaticCache

        if needed > self.length:  # longer than the graphs were captured for: start over, larger
            self.graphs.clear()
            self.caches.clear()
            self.length = -(-needed // LENGTH_STEP) * LENGTH_STEP
        cache = self.caches.get(batch)
        if cache is None:
            cache = StaticCache(config=self.model.config, max_cache_len=self.length)
            self.caches[batch] = cache
        else:
            with torch.inference_mode():  # its tensors were made under generate()'s inference mode
                cache.reset()  # in place: the graph keeps the addresses it captured
        return cache

    def step(self, input_ids, cache, position_ids=None, attention_mask=None, **other):
        other.pop("return_dict", None)
        if any(isinstance(v, torch.Tensor) for v in other.values()):  # inputs this graph was not made for
            return self.model(input_ids=input_ids, cache=cache, position_ids=position_ids,
                              attention_mask=attention_mask, **other)
        key = (id(cache), tuple(input_ids.shape), _shape(position_ids), _shape(attention_mask),
               tuple(sorted(other.items())))
        captured = self.graphs.get(key)
        if captured is None:
            captured = self._capture(input_ids, cache, position_ids, attention_mask, other)
            self.graphs[key] = captured
        captured.ids.copy_(input_ids)
        if position_ids is not None:
            captured.pos.copy_(position_ids)
        if attention_mask is not None:
            captured.mask.copy_(attention_mask)
        captured.graph.replay()
        return captured.out

    def _capture(self, input_ids, cache, position_ids, attention_mask, other) -> types.SimpleNamespace:
        captured = types.SimpleNamespace(
            ids=input_ids.clone(), pos=None if position_ids is None else position_ids.clone(),
            mask=None if attention_mask is None else attention_mask.clone())
        kwargs = dict(input_ids=captured.ids, cache=cache, **other)
        if captured.pos is not None:
            kwargs["position_ids"] = captured.pos
        if captured.mask is not None:
            kwargs["attention_mask"] = captured.mask
        lengths = [layer.cumulative_length.clone() for layer in cache.layers]

        def rewind() -> None:  # warm-up steps advance the cache; put it back
            for layer, length in zip(cache.layers, lengths):
                layer.cumulative_length.copy_(length)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles here when compile_step; warms cuBLAS and bitsandbytes
                self.forward(**kwargs)
                rewind()
        torch.cuda.current_stream().wait_stream(side)
        captured.kwargs = kwargs  # what a benchmark needs to run the step outside the graph (profiles)
        captured.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured.graph, pool=self.pool):
            captured.out = self.forward(**kwargs)
        return captured


def _shape(tensor) -> tuple | None:
    return None if tensor is None else (tuple(tensor.shape), tensor.dtype)


def defer_stop_checks() -> Callable[[], None]:
    """Lets generate() check for finished sequences one step late on CUDA too; returns the undo."""
    import transformers.generation.utils as generation_utils

    original = generation_utils.DeferredStopCheck.__dict__["is_supported"]

    def is_supported(device, cache, cache_is_returned, is_assistant) -> bool:
        if is_assistant:
            return False
        return cache is None or cache.is_croppable or not cache_is_returned

    generation_utils.DeferredStopCheck.is_supported = staticmethod(is_supported)

    def undo() -> None:
        generation_utils.DeferredStopCheck.is_supported = original

    return undo
