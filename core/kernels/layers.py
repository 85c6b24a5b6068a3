"""The linear layers the kernels can serve, found in a loaded model, with one call per layer.

A `Layer` wraps one module of a kind the kernels read in place: an LLM.int8() layer (CB, SCB), a
bitsandbytes 4-bit layer (packed bytes, absmax) or a plain 16-bit `nn.Linear`. Layers whose weights
are anything else (torchao's tensor subclasses, bitsandbytes' CPU repacking, 4-bit blocks that
straddle rows) are not found, so they keep their own forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from core.kernels import gemv16, interpreted, w4a16, w8a16

SIXTEEN_BIT = (torch.bfloat16, torch.float16)


@dataclass(frozen=True, eq=False)
class Layer:
    module: torch.nn.Module
    kind: str  # "int8", "4bit" or "16bit"
    packed: w4a16.Packed | None = None
    decode: str = field(default="", repr=False)  # 4-bit: w4a16.prmt_tables(code) on a GPU with 16-bit x
    activations: torch.dtype = torch.bfloat16  # int8: the model's dtype (the layer itself has none)

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
        if self.kind == "4bit":
            return self.module.compute_dtype or torch.bfloat16
        if self.kind == "int8":
            return self.activations
        return self.module.weight.dtype

    @property
    def label(self) -> str:
        if self.kind == "4bit":
            return self.module.weight.quant_state.quant_type
        return {"int8": "int8", "16bit": str(self.module.weight.dtype).removeprefix("torch.")}[self.kind]

    @property
    def key(self) -> tuple:
        """Layers with equal keys run the same kernel specialization: one measurement covers them."""
        extra = ()
        if self.kind == "4bit":
            extra = (self.packed.blocksize, self.packed.nested, self.decode)
        return (self.kind, self.label, self.out_features, self.in_features, self.compute_dtype, *extra)

    def int8_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self.module.weight.data, _scb(self.module), self.module.bias

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """This layer's forward through the fast path's kernel."""
        if self.kind == "int8":
            return w8a16.linear(x, *self.int8_weights())
        if self.kind == "4bit":
            out = w4a16.apply(x.to(self.compute_dtype), self.packed, self.decode)
        else:
            out = gemv16.gemv(x, [self.module.weight], False)[0]
        if self.module.bias is not None:
            out = out + self.module.bias.to(out.dtype)
        return out.to(x.dtype)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same math in PyTorch."""
        if self.kind == "int8":
            return w8a16.reference(x, *self.int8_weights())
        if self.kind == "4bit":
            return w4a16.reference(x.to(self.compute_dtype), self.packed, self.module.bias).to(x.dtype)
        out = x.float() @ self.module.weight.float().T
        if self.module.bias is not None:
            out = out + self.module.bias.float()
        return out.to(x.dtype)


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
            return Layer(module, "int8", activations=dtype)
        return None
    if bnb is not None and isinstance(module, bnb.Linear4bit):
        return _four_bit(module)
    if type(module) is torch.nn.Linear and type(module.weight.data) is torch.Tensor \
            and module.weight.dtype in SIXTEEN_BIT:  # exact types: torchao's quantized weights are subclasses
        return Layer(module, "16bit")
    return None


def _four_bit(module) -> Layer | None:
    state = getattr(module.weight, "quant_state", None)
    if state is None or getattr(state, "packing_format_for_cpu", False):  # bitsandbytes' CPU repacking
        return None
    packed = w4a16.Packed.from_param(module.weight)
    if not packed.supported():
        return None
    compute = module.compute_dtype or torch.bfloat16
    prmt = module.weight.is_cuda and compute in SIXTEEN_BIT and not interpreted(w4a16.gemv_kernel)
    return Layer(module, "4bit", packed, w4a16.prmt_tables(state.code) if prmt else "")


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes.nn
