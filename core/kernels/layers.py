"""The linear layers the kernels can serve, found in a loaded model: one small class per weight format.

Each class wraps one module whose weights a kernel reads in place and answers the same questions:
what the activations reach the kernel in (`compute_dtype`), which layers share a kernel
specialization (`key`), the forward through the kernel and through its PyTorch reference, at which
row counts it is measured against the library (`measured_rows`), and how several of them that share
an input run in one launch (`grouped`):

- `Int8Layer`: an LLM.int8() layer (CB, SCB), as W8A16 at every row count (core.kernels.w8a16).
- `FourBitLayer`: a bitsandbytes 4-bit layer (packed bytes, absmax; NF4 or FP4, double-quantized
  absmax too), through core.kernels.w4a16.
- `ShuffledFourBitLayer`: the same layer once its bytes are shuffled for the tensor-core kernel
  (core.kernels.w4mma): 1-16 rows through it, more rows through bitsandbytes' dequantization of an
  unshuffled copy (its own forward would read the shuffled bytes).
- `SixteenBitLayer`: a plain bf16/fp16 `nn.Linear`, through core.kernels.gemv16.

Layers whose weights are anything else (torchao's tensor subclasses, bitsandbytes' CPU repacking,
4-bit blocks that straddle rows) are not found, so they keep their own forward. A new weight format
is a new class here and one line in `_as_layer`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from core.kernels import gemv16, interpreted, w4a16, w4mma, w8a16

SIXTEEN_BIT = (torch.bfloat16, torch.float16)
FEW_ROWS = 16  # row counts the skinny kernels serve (a batched decode step); more rows are prefill

Grouped = Callable[[torch.Tensor], list[torch.Tensor]]


@dataclass(frozen=True, eq=False)
class Layer:
    """What every format shares; subclasses add the format's weights and its four methods."""

    module: torch.nn.Module
    library: ClassVar[str] = "cuBLAS'"  # who computes the layer when ours is not used
    measured_rows: ClassVar[tuple[int, ...]] = (1,)  # row counts timed against the library
    always: ClassVar[bool] = False  # ours at every row count, unmeasured

    @property
    def in_features(self) -> int:
        return self.module.in_features

    @property
    def out_features(self) -> int:
        return self.module.out_features

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    @property
    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations reach the kernel in."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        """The weight format, for notes: "int8", "nf4", "bfloat16"."""
        raise NotImplementedError

    @property
    def key(self) -> tuple:
        """Layers with equal keys run the same kernel specialization: one measurement covers them."""
        return (type(self).__name__, self.label, self.out_features, self.in_features, self.compute_dtype)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """This layer's forward through the fast path's kernels (x: [..., K], any row count)."""
        raise NotImplementedError

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same math in PyTorch."""
        raise NotImplementedError

    def groups_with(self, other: Layer) -> bool:
        """Whether `other` (same class, same input) can share one grouped launch with this layer."""
        return True

    @staticmethod
    def grouped(members: list[Layer], silu_pair: bool) -> Grouped:
        """x (one token) → the members' outputs in one launch ([silu(gate) · up] when `silu_pair`)."""
        raise NotImplementedError

    def _with_bias(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.module.bias is not None:
            out = out + self.module.bias.to(out.dtype)
        return out.to(x.dtype)


@dataclass(frozen=True, eq=False)
class Int8Layer(Layer):
    """LLM.int8() as W8A16 at every row count: its own matmul syncs the host, so no graph could hold it."""

    activations: torch.dtype = torch.bfloat16  # the model's dtype (the layer itself has none)
    always: ClassVar[bool] = True

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.activations

    @property
    def label(self) -> str:
        return "int8"

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self.module.weight.data, _scb(self.module), self.module.bias

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return w8a16.linear(x, *self.weights())

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return w8a16.reference(x, *self.weights())

    @staticmethod
    def grouped(members: list[Int8Layer], silu_pair: bool) -> Grouped:
        weights = [m.weights() for m in members]
        cbs, scbs = [w[0] for w in weights], [w[1] for w in weights]
        return lambda x: w8a16.gemv(x, cbs, scbs, silu_pair)


@dataclass(frozen=True, eq=False)
class FourBitLayer(Layer):
    """A bitsandbytes 4-bit layer read as stored: the GEMV for one row, the decode-once GEMM for 2-16."""

    packed: w4a16.Packed | None = None
    decode: str = field(default="", repr=False)  # w4a16.prmt_tables(code) on a GPU with 16-bit x
    library: ClassVar[str] = "bitsandbytes'"
    # Ours at 2-16 rows decodes one 16-row tile whatever the count, while bitsandbytes' time grows
    # with the rows: the two ends decide the range.
    measured_rows: ClassVar[tuple[int, ...]] = (1, 2, FEW_ROWS)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.module.compute_dtype or torch.bfloat16

    @property
    def label(self) -> str:
        return self.module.weight.quant_state.quant_type

    @property
    def key(self) -> tuple:
        return (*super().key, self.packed.blocksize, self.packed.nested, self.decode)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return self._with_bias(w4a16.apply(x.to(self.compute_dtype), self.packed, self.decode), x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return w4a16.reference(x.to(self.compute_dtype), self.packed, self.module.bias).to(x.dtype)

    def groups_with(self, other: FourBitLayer) -> bool:
        """One code table, block size and decode table per launch; the grouped GEMV reads plain absmax."""
        return (not self.packed.nested and not other.packed.nested and other.packed.blocksize == self.packed.blocksize
                and other.decode == self.decode and torch.equal(other.packed.code, self.packed.code))

    @staticmethod
    def grouped(members: list[FourBitLayer], silu_pair: bool) -> Grouped:
        first = members[0]
        packed, dtype = [m.packed for m in members], first.compute_dtype
        return lambda x: [o.to(x.dtype) for o in w4a16.apply_group(x.to(dtype), packed, silu_pair, first.decode)]


    def tensor_cores(self) -> bool:
        """Whether the tensor-core kernel (core.kernels.w4mma) can serve this layer once shuffled."""
        return w4mma.available(self.device) is None and w4mma.supported(self.packed, self.compute_dtype)

    def shuffled(self) -> ShuffledFourBitLayer:
        """Shuffles the stored bytes in place; the returned layer computes from them (`unshuffle` restores them)."""
        w4mma.shuffle_(self.packed)
        return ShuffledFourBitLayer(self.module, self.packed, self.decode)


@dataclass(frozen=True, eq=False)
class ShuffledFourBitLayer(FourBitLayer):
    """A 4-bit layer whose bytes and absmax are in the tensor-core kernel's layout (core.kernels.w4mma)."""

    always: ClassVar[bool] = True  # its shuffled bytes are read right only here, prefill included

    # (warps, K blocks loaded ahead) for 1-8 rows and for 9-16, measured per shape at fast-path time
    variants: tuple[tuple[int, int], tuple[int, int]] = ((w4mma.WARPS, w4mma.UNROLL),) * 2

    @property
    def key(self) -> tuple:
        return (*super().key, "tensor cores", self.variants)

    def variant(self, rows: int) -> tuple[int, int]:
        return self.variants[1 if rows > 8 else 0]

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > w4mma.MAX_ROWS:
            return self.prefill(x)
        return self._with_bias(w4mma.apply(x.to(self.compute_dtype), self.packed, self.variant(rows)), x)

    def prefill(self, x: torch.Tensor) -> torch.Tensor:
        """More than 16 rows: bitsandbytes dequantizes an unshuffled copy and cuBLAS multiplies, as its own
        forward does from the stored bytes."""
        import copy

        import bitsandbytes.functional as bnb

        weight = self.module.weight
        n, k = self.packed.shape
        state = copy.copy(weight.quant_state)
        state.absmax = w4mma.unshuffled_absmax(self.packed.absmax, n, k)
        data = w4mma.unshuffled(self.packed.data, n, k).view(weight.data.dtype).view(weight.data.shape)
        dense = bnb.dequantize_4bit(data, state).to(self.compute_dtype)
        bias = self.module.bias
        out = torch.nn.functional.linear(x.to(self.compute_dtype), dense,
                                         None if bias is None else bias.to(self.compute_dtype))
        return out.to(x.dtype)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        w, (n, k) = self.packed, self.packed.shape
        stored = w4a16.Packed(w4mma.unshuffled(w.data, n, k), w4mma.unshuffled_absmax(w.absmax, n, k), w.code, w.shape,
                              w.blocksize, w.absmax2, w.code2, w.offset, w.block2)
        return w4a16.reference(x.to(self.compute_dtype), stored, self.module.bias).to(x.dtype)

    def unshuffle(self) -> None:
        w4mma.unshuffle_(self.packed)

    def groups_with(self, other: FourBitLayer) -> bool:
        """Shuffled layers of one code table and nesting share a launch (double-quantized absmax too)."""
        return (isinstance(other, ShuffledFourBitLayer) and other.packed.nested == self.packed.nested
                and torch.equal(other.packed.code, self.packed.code)
                and (not self.packed.nested or torch.equal(other.packed.code2, self.packed.code2)))

    @staticmethod
    def grouped(members: list[ShuffledFourBitLayer], silu_pair: bool) -> Grouped:
        first = members[0]
        packed, dtype = [m.packed for m in members], first.compute_dtype
        return lambda x: [o.to(x.dtype) for o in w4mma.apply_group(x.to(dtype), packed, silu_pair,
                                                                    first.variant(x.numel() // x.shape[-1]))]


@dataclass(frozen=True, eq=False)
class SixteenBitLayer(Layer):
    """A bf16/fp16 `nn.Linear`: the grouped GEMV for one row, a skinny tl.dot GEMM for 2-16."""

    measured_rows: ClassVar[tuple[int, ...]] = (1, 2, FEW_ROWS)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.module.weight.dtype

    @property
    def label(self) -> str:
        return str(self.module.weight.dtype).removeprefix("torch.")

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return self._with_bias(gemv16.linear(x, self.module.weight), x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        out = x.float() @ self.module.weight.float().T
        if self.module.bias is not None:
            out = out + self.module.bias.float()
        return out.to(x.dtype)

    @staticmethod
    def grouped(members: list[SixteenBitLayer], silu_pair: bool) -> Grouped:
        weights = [m.module.weight for m in members]
        return lambda x: gemv16.gemv(x, weights, silu_pair)


def _scb(module) -> torch.Tensor | None:
    """LLM.int8()'s row scales: on the weight until the first forward, then moved to the layer's state."""
    scb = getattr(module.weight, "SCB", None)
    return scb if scb is not None else getattr(module.state, "SCB", None)


def find_layers(model) -> dict[str, Layer]:
    """Every layer of `model` a kernel can serve, by module name."""
    found = {}
    dtype = getattr(model, "dtype", torch.bfloat16)
    for name, module in model.named_modules():
        layer = _as_layer(module, dtype)
        if layer is not None:
            found[name] = layer
    return found


def _as_layer(module, dtype: torch.dtype) -> Layer | None:
    bnb = _bitsandbytes()
    if bnb is not None and isinstance(module, bnb.Linear8bitLt):
        if module.weight.dtype == torch.int8 and _scb(module) is not None:
            return Int8Layer(module, activations=dtype)
        return None
    if bnb is not None and isinstance(module, bnb.Linear4bit):
        return _four_bit(module)
    if type(module) is torch.nn.Linear and type(module.weight.data) is torch.Tensor \
            and module.weight.dtype in SIXTEEN_BIT:  # exact types: torchao's quantized weights are subclasses
        return SixteenBitLayer(module)
    return None


def _four_bit(module) -> FourBitLayer | None:
    state = getattr(module.weight, "quant_state", None)
    if state is None or getattr(state, "packing_format_for_cpu", False):  # bitsandbytes' CPU repacking
        return None
    packed = w4a16.Packed.from_param(module.weight)
    if not packed.supported():
        return None
    compute = module.compute_dtype or torch.bfloat16
    prmt = module.weight.is_cuda and compute in SIXTEEN_BIT and not interpreted(w4a16.gemv_kernel)
    return FourBitLayer(module, packed, w4a16.prmt_tables(state.code) if prmt else "")


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes.nn
