"""The GPU decode step as a CUDA graph, hooked into `model.generate()` without changing the model.

Plain decode at batch 1 is host-bound: an 8B model runs ~1,500 kernel launches per token, and the
GPU idles ~80% of each step (benchmarks/RESULTS.md). Here the engine owns a `StaticCache` per
batch size, captures the decode forward once in a CUDA graph (optionally of a `torch.compile`d
forward), and routes generate() to it through two *instance* attributes that generate() already
consults: `_valid_auto_compile_criteria` and `get_compiled_call`. Prefill runs normally; each decode
step copies its tensor inputs into the graph's buffers and replays it. No weight, module, config
value or class attribute changes; `release()` deletes the two attributes and frees caches and graphs.

Encoder-decoders (T5, BART): the decoder step takes the encoder's output and an `EncoderDecoderCache`
whose cross-attention half holds keys and values over the input, filled at prefill and only read by
the decode steps. That cache is sized to the input exactly, so a graph holds one input length: a
cross-attention cache over padding would change the attention sums and with them the tokens. The
caches (and graphs) of the last `KEPT_INPUT_LENGTHS` input lengths are kept; a new length costs one
capture at its first decode step.

A model split across GPUs (accelerate's device map) is captured as one graph over all of them: the
capture begins on the GPU that holds the input embeddings, every other GPU's work is issued on a
stream that joins that capture, and the hand-offs between GPUs (accelerate's hooks moving
activations) become device-to-device copies inside the graph. Memory a capture allocates on the
other GPUs goes to a pool kept with the graph, as the capturing GPU's does to the graph pool. Each
GPU's layers keep their part of the static cache beside them (the cache allocates each layer where
its keys arrive).

bitsandbytes 0.50's 4-bit matmul and the fast path's own kernels (core.kernels) are torch.library
ops, so their layers capture and compile cleanly. bitsandbytes' LLM.int8() matmul with an outlier
threshold syncs with the host inside each layer and cannot be captured: fastpath.choose() graphs
int8 models only with the W8A16 kernel in its place. `compile_mode` is torch.compile's mode:
"default", or "max-autotune-no-cudagraphs" (Inductor tunes its kernels; the graph stays ours).

Also here, `defer_stop_checks`: generate() reads "all sequences finished?" from the GPU after every
step, a host sync; transformers defers that check by one step on Apple GPUs only. Enabling it on
CUDA saves ~1 ms a step (+8-12%); streamed tokens then arrive one step later. It also crops the cache by 0 after
every step, which the graphed cache skips (`GraphedStaticCache`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from transformers import EncoderDecoderCache, StaticCache
from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

LENGTH_STEP = 256  # static caches grow in steps of this many tokens, so most requests reuse a graph
KEPT_INPUT_LENGTHS = 4  # encoder-decoders: cross-attention caches (and their graphs) kept for this many input lengths
_NOOP_CROP_LAYERS = (StaticLayer, StaticSlidingWindowLayer)  # crop(0) subtracts 0 from their lengths


class GraphedStaticCache(StaticCache):
    """A static cache whose `crop(0)` does nothing when it has nothing to do. generate()'s deferred stop check crops the
    cache it was given by 0 after every step (keeping its place for a rollback): on static layers that is one
    in-place subtraction of 0 per layer, 32 kernels launched between two graph replays on an 8B model, ~35 µs a step
    (benchmarks/RESULTS.md). Layers whose crop(0) trims state (linear attention) are still cropped."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._crop_zero_is_noop = all(type(layer) in _NOOP_CROP_LAYERS for layer in self.layers)  # types are fixed

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove or not self._crop_zero_is_noop:
            super().crop(tokens_to_remove)


class StaticEncoderDecoderCache(EncoderDecoderCache):
    """Two static caches whose `crop` shortens the self-attention half only: the cross-attention half holds the input
    for the whole answer. generate()'s deferred stop check crops the cache it was given (by 0 each step, by the one
    extra step at the end), which transformers' EncoderDecoderCache allows for dynamic caches only."""

    def crop(self, tokens_to_remove: int) -> None:
        self.self_attention_cache.crop(tokens_to_remove)


@dataclass
class Captured:
    """One decode step held by a graph: the buffers it reads, the arguments built on them, and how to run it."""

    batch: int
    cache: object
    inputs: dict[str, torch.Tensor]  # static buffers: each step copies its tensors in, by name
    kwargs: dict  # the forward's arguments on those buffers (benchmarks run the step outside the graph with them)
    replay: Callable[[], None] = lambda: None
    out: object = None


@dataclass(frozen=True)
class StepInputs:
    """A decode step's arguments as a graph sees them: tensors to copy in, and the values that select the graph."""

    tensors: dict[str, torch.Tensor]
    outputs: dict[str, type]  # model outputs passed in (an encoder's), by argument name: rebuilt around buffers
    fixed: dict = field(default_factory=dict)  # everything else but the cache: part of the graph's key

    def key(self, cache) -> tuple:
        shapes = tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in sorted(self.tensors.items()))
        return id(cache), shapes, tuple(sorted(self.fixed.items()))


def split_inputs(kwargs: dict) -> StepInputs | None:
    """The tensors of a step's arguments, flattened (`encoder_outputs.last_hidden_state`), and its other values;
    None when an argument is of a kind no graph can hold (it then runs without one)."""
    from transformers.utils import ModelOutput

    tensors: dict[str, torch.Tensor] = {}
    outputs: dict[str, type] = {}
    fixed: dict = {}
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            tensors[name] = value
        elif isinstance(value, ModelOutput):
            if not all(isinstance(v, torch.Tensor) for v in value.values()):
                return None
            outputs[name] = type(value)
            tensors.update({f"{name}.{part}": v for part, v in value.items()})
        elif isinstance(value, (bool, int, float, str)):
            fixed[name] = value
        else:
            return None
    return StepInputs(tensors, outputs, fixed)


def with_buffers(step: StepInputs, buffers: dict[str, torch.Tensor], cache) -> dict:
    """The forward's arguments with every tensor replaced by its buffer (model outputs rebuilt around theirs)."""
    kwargs: dict = dict(step.fixed, cache=cache)
    for name, tensor in buffers.items():
        if "." not in name:
            kwargs[name] = tensor
    for name, kind in step.outputs.items():
        prefix = f"{name}."
        kwargs[name] = kind(**{n[len(prefix):]: t for n, t in buffers.items() if n.startswith(prefix)})
    return kwargs


def static_layers(cache) -> list:
    """The layers of a static cache, both halves of an encoder-decoder's."""
    if hasattr(cache, "self_attention_cache"):
        return list(cache.self_attention_cache.layers) + list(cache.cross_attention_cache.layers)
    return list(cache.layers)


def cuda_devices(model) -> list[torch.device]:
    """The GPUs holding the model's parameters, the one of its input embeddings first."""
    home = model.get_input_embeddings().weight.device
    found = {p.device for p in model.parameters() if p.device.type == "cuda"}
    return [home] + sorted(found - {home}, key=lambda d: d.index)


class GraphedDecode:
    def __init__(self, model, compile_step: bool = False, compile_mode: str = "default") -> None:
        self.model = model
        self.compile_step = compile_step
        self.forward = (torch.compile(model, mode=compile_mode, fullgraph=True, dynamic=False)
                        if compile_step else model)  # a wrapper: `model` itself is not modified
        devices = cuda_devices(model) if torch.cuda.is_available() else []
        self.home = devices[0] if devices else None
        self.others = devices[1:]  # GPUs that join the home GPU's capture: a split model
        self.pool = torch.cuda.graph_pool_handle() if devices else None
        # Its own capture stream: destroying a graph can drop the cuBLAS workspaces of the stream it was captured on
        # (pytorch/pytorch#193402), so these graphs share theirs with no throw-away graph (the kernel timings').
        self.capture_stream = torch.cuda.Stream(device=self.home) if devices else None
        self.pools: dict[torch.device, object] = {}  # the other GPUs' memory pools, kept with the graphs
        self.streams: dict[torch.device, object] = {}
        self.caches: dict[tuple, object] = {}  # by (batch,) or, for an encoder-decoder, (batch, input length)
        self.graphs: dict[tuple, Captured] = {}
        self.length = 0

    def install(self) -> GraphedDecode:
        caches = self.caches
        self.model._valid_auto_compile_criteria = (
            lambda model_kwargs, generation_config: any(model_kwargs.get("cache") is c for c in caches.values()))
        self.model.get_compiled_call = lambda compile_config=None: self.step
        return self

    def reset(self) -> None:
        """Drops every captured graph (generate()'s and the running batch's, which capture here too) and starts a new
        memory pool for the next captures: all at once, since destroying one graph can free cuBLAS workspaces that
        others captured on the same stream still use; and a new pool, since PyTorch refuses a capture into a pool
        whose graphs are all gone while its memory is still cached (an internal assert in its caching allocator)."""
        self.graphs.clear()
        if self.pool is not None:
            self.pool = torch.cuda.graph_pool_handle()

    def release(self) -> None:
        for name in ("_valid_auto_compile_criteria", "get_compiled_call"):
            self.model.__dict__.pop(name, None)
        self.graphs.clear()
        self.caches.clear()
        self.pools.clear()
        self.forward = None
        if self.compile_step:
            torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def cache_for(self, batch: int, needed: int, input_length: int | None = None):
        """A reset static cache for `batch` sequences of up to `needed` tokens (prompt + new + 1); with
        `input_length`, an encoder-decoder's: `needed` decoder tokens, and cross-attention over that many inputs."""
        key = (batch,) if input_length is None else (batch, input_length)
        lengths = {k for k in self.caches if len(k) == 2}
        # Longer than the graphs were captured for, or one input length too many: start over. Graphs go all at once:
        # destroying one graph can free cuBLAS workspaces that others captured on the same stream still use.
        if needed > self.length or (key not in self.caches and len(lengths) >= KEPT_INPUT_LENGTHS):
            self.reset()
            self.caches.clear()
            self.length = max(self.length, -(-needed // LENGTH_STEP) * LENGTH_STEP)
        cache = self.caches.get(key)
        if cache is None:
            config = self.model.config.get_text_config(decoder=True)
            cache = GraphedStaticCache(config=config, max_cache_len=self.length)
            if input_length is not None:
                cache = StaticEncoderDecoderCache(cache, StaticCache(config=config, max_cache_len=input_length))
            self.caches[key] = cache
        else:
            with torch.inference_mode():  # its tensors were made under generate()'s inference mode
                cache.reset()  # in place: the graph keeps the addresses it captured
        return cache

    def step(self, input_ids=None, cache=None, position_ids=None, attention_mask=None, **other):
        given = dict(other, input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask)
        given = {name: value for name, value in given.items() if value is not None and name != "return_dict"}
        inputs = split_inputs(given)
        if inputs is None:  # an argument no graph was made for
            return self.model(cache=cache, **given)
        key = inputs.key(cache)
        captured = self.graphs.get(key)
        if captured is None:
            captured = self._capture(inputs, cache)
            self.graphs[key] = captured
        for name, tensor in inputs.tensors.items():
            captured.inputs[name].copy_(tensor)
        captured.replay()
        return captured.out

    def _capture(self, inputs: StepInputs, cache) -> Captured:
        buffers = {name: tensor.clone() for name, tensor in inputs.tensors.items()}
        kwargs = with_buffers(inputs, buffers, cache)
        batch = next(iter(inputs.tensors.values())).shape[0]
        captured = Captured(batch=batch, cache=cache, inputs=buffers, kwargs=kwargs)
        self._record(captured, static_layers(cache))
        return captured

    def _record(self, captured: Captured, layers: list) -> None:
        """Warms up and captures `captured.kwargs` in a CUDA graph; sets its replay and output."""
        lengths = [layer.cumulative_length.clone() for layer in layers]

        def rewind() -> None:  # warm-up steps advance the cache; put it back
            for layer, length in zip(layers, lengths):
                layer.cumulative_length.copy_(length)

        with torch.cuda.device(self.home):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), self._joined(pooled=False):
                for _ in range(2):  # compiles here when compile_step; warms cuBLAS and bitsandbytes
                    self.forward(**captured.kwargs)
                    rewind()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=self.capture_stream), self._joined(pooled=True):
                captured.out = self.forward(**captured.kwargs)
        captured.replay = graph.replay

    @contextmanager
    def _joined(self, pooled: bool) -> Iterator[None]:
        """Within the block, each other GPU's work goes to a stream that waits for the home GPU's current one (so a
        capture there takes it in) and that it waits for at the end; with `pooled`, into that GPU's graph pool."""
        if not self.others:
            yield
            return
        home_stream = torch.cuda.current_stream(self.home)
        previous = {device: torch.cuda.current_stream(device) for device in self.others}
        with ExitStack() as stack:
            for device in self.others:
                if device not in self.streams:
                    self.streams[device] = torch.cuda.Stream(device=device)
                stream = self.streams[device]
                stream.wait_stream(home_stream)
                torch.cuda.set_stream(stream)  # also makes `device` current: set back below
                if pooled:
                    stack.enter_context(torch.cuda.use_mem_pool(self._pool(device), device=device))
            torch.cuda.set_device(self.home)
            try:
                yield
            finally:
                for device in self.others:
                    home_stream.wait_stream(self.streams[device])
                    torch.cuda.set_stream(previous[device])
                torch.cuda.set_device(self.home)

    def _pool(self, device: torch.device):
        if device not in self.pools:
            with torch.cuda.device(device):  # a pool holds memory on the device current at its creation
                self.pools[device] = torch.cuda.MemPool()
        return self.pools[device]


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
