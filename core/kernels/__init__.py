"""Triton kernels of the GPU fast path, one module per kernel, each with its PyTorch reference beside it.

- `w8a16`: weight-only int8 over LLM.int8()'s stored CB/SCB (activations stay 16-bit).
- `w4a16`: 4-bit GEMV, and a decode-once GEMM for 2-16 rows, over bitsandbytes' packed NF4/FP4 bytes and absmax.
- `w4mma`: 4-bit weights on tensor cores for 1-16 rows, a CUDA kernel over the bytes shuffled in place (reversible).
- `nvrtc`: compiles that CUDA C at run time with the NVRTC library torch's CUDA wheels bring.
- `attention`: a decode step's attention split over the key/value cache (flash-decoding), an attention
  implementation for transformers.
- `gemv16`: 16-bit weights: a one-token GEMV, and the skinny GEMM for 2-16 rows.
- `tiling`: tile shapes, the one launch over up to three weights that share an input, the skinny
  split-K GEMM of int8 and 16-bit weights, and int8 codes converted to floats by byte permutes.
- `layers`: which layers of a loaded model the kernels can read in place, one class per weight format.
- `select`: ours or the library's, decided per shape by one measurement on the GPU.
- `fusion`: a Llama attention's q/k/v, and an MLP's gate/up with SiLU, each in one launch.
- `modules`: installs the kernel-backed `forward`s on a loaded model, and removes them exactly.

The Triton kernels run where Triton runs: on a CUDA GPU, or on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1 set before the kernels are defined; the CPU tests do that). `unavailable()` says
why they cannot run here, for the fast path's reason string. The CUDA kernel (`w4mma`) needs a GPU and NVRTC;
on the CPU its algorithm is checked through `w4mma.emulate`.
"""

from __future__ import annotations

import importlib.util


def unavailable(device_type: str) -> str | None:
    """None when the kernels can run on this device type; otherwise the reason, for the UI."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton), so the fast path's own kernels are off"
    if device_type == "cuda":
        return None
    from core.kernels import w8a16

    if interpreted(w8a16.gemv_kernel):
        return None
    return "the fast path's own kernels need a CUDA GPU"


def interpreted(kernel) -> bool:
    """True when `kernel` was defined under Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)

