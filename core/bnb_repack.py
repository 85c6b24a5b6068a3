"""bitsandbytes' CPU repack of 4-bit weights, and how a save still writes the canonical checkpoint.

On a CPU with AVX512-BF16, bitsandbytes 0.50.2 repacks every `Linear4bit` at its first forward
(`_convert_weight_packed_for_cpu`): the packed bytes are reordered for its kernel, and the
QuantState is changed *in place*: its absmax (fp32, or uint8 with double quantization) becomes a
transposed bf16 matrix. Its inverse, which `state_dict()` runs through `_save_to_state_dict`,
restores the bytes but leaves a plain absmax transposed in bf16 (and re-quantizes a nested one),
and it runs on the live module. So after one chat, `state_dict()` (and so `save_pretrained`)
breaks the loaded model and writes a broken checkpoint.

Measured here (bnb 0.50.2, torch 2.13 CPU, the embedded SmolLM2; tests/test_save.py): after a
forward, `state_dict()` changes the logits of fp4/nf4 models; `get_memory_footprint()`,
`named_parameters()`, `buffers()`, `.to("cpu")` and `.cpu()` change nothing; int8 models are
not affected by any of them. By reading the code: `Params4bit.cuda()`/`.xpu()` run the same broken
inverse, so a repacked CPU model must never be moved to a GPU; on CUDA nothing is repacked.

The workaround never lets that inverse run on the live model:
- `capture(model)`, right after loading and before any forward, keeps a shallow copy of each
  4-bit QuantState that can be repacked. The repack replaces the absmax tensors rather than
  writing into them, so the copy keeps the originals alive: 4 bytes per 64 weights (1 with double
  quantization), on the CPU only, about 12% (3%) of the packed weights.
- `canonical_weights(model, captured)`, for the duration of a save, puts the captured QuantState
  and the exactly un-permuted bytes in place of the live ones, then puts the live objects back.
  A model reloaded from that checkpoint repacks the same way at its first forward, so its logits
  equal the live model's bitwise.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from core.errors import SaveError

CPU_BLOCK_N = 32  # the block of output rows bitsandbytes' CPU layout interleaves (its default)


def _four_bit_layers(model) -> Iterator[tuple[str, torch.nn.Module]]:
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            yield name, module


def _repacked(module) -> bool:
    return bool(getattr(module.weight.quant_state, "packing_format_for_cpu", False))


def capture(model) -> dict[str, object]:
    """Copies of the QuantStates that bitsandbytes may repack (4-bit layers on the CPU). Call before any forward."""
    captured = {}
    for name, module in _four_bit_layers(model):
        state = module.weight.quant_state
        if module.weight.device.type != "cpu" or state is None:
            continue
        if _repacked(module):
            continue  # too late: canonical_weights will refuse to save this layer
        captured[name] = copy.copy(state)
    return captured


def unpermute(packed: torch.Tensor, original_shape: torch.Size, block_n: int = CPU_BLOCK_N) -> torch.Tensor:
    """The canonical packed bytes from bitsandbytes' CPU layout ([N, K/2] uint8): the exact inverse of its byte
    permutation, on a new tensor."""
    n, k_half = packed.shape
    pairs = packed.reshape(-1, 32)  # 32 bytes: 32 low nibbles then 32 high nibbles
    nibbles = torch.cat([pairs & 0xF, (pairs >> 4) & 0xF], dim=-1).to(torch.uint8)
    nibbles = nibbles.reshape(n // block_n, k_half, block_n, 2).transpose(-3, -2).contiguous().reshape(-1)
    return ((nibbles[::2] << 4) | nibbles[1::2]).to(torch.uint8).reshape(original_shape)


@contextmanager
def canonical_weights(model, captured: dict[str, object]) -> Iterator[None]:
    """Within the block, every 4-bit layer holds its canonical (serializable) form; afterwards the live one again."""
    swapped = []
    try:
        for name, module in _four_bit_layers(model):
            if not _repacked(module):
                continue
            original = captured.get(name)
            if original is None:
                raise SaveError(f"Layer {name} was repacked by bitsandbytes before its canonical form was captured, "
                                "so it cannot be saved faithfully. Load the model again and save before chatting.")
            weight = module.weight
            live = (weight.data, weight.quant_state)
            canonical = unpermute(weight.data, live[1].original_qshape)  # recorded by the repack
            storage = getattr(live[1], "original_storage_type", None)
            weight.data = canonical.view(storage) if storage is not None else canonical
            weight.quant_state = original
            swapped.append((weight, live))
        yield
    finally:
        for weight, (data, state) in swapped:
            weight.data, weight.quant_state = data, state

