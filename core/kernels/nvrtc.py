"""CUDA C kernels compiled at run time with NVRTC, the compiler library torch's CUDA wheels bring.

No compiler is needed on the user's machine: the source is compiled for the GPU at hand, in the
process, the first time a specialization is launched (about a second), and kept for the process.
Launches go through the driver on the current stream, so CUDA graphs capture them like any kernel.

`unavailable()` says why NVRTC cannot be used here (no CUDA, no NVRTC library); callers then keep
the Triton kernels, which stay the reference that the CPU tests check.
"""

from __future__ import annotations

import ctypes
import functools

import torch


@functools.cache
def unavailable() -> str | None:
    """None when NVRTC kernels can be compiled and launched here; otherwise the reason."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return "no CUDA GPU"
    try:
        _library()
        from torch.cuda._utils import _cuda_load_module  # noqa: F401  torch's loader (private: checked here)
    except (OSError, ImportError, AttributeError) as exc:
        return f"NVRTC is not available ({type(exc).__name__}: {exc})"
    return None


@functools.cache
def _library() -> ctypes.CDLL:
    from torch.cuda import _utils

    lib = _utils._get_nvrtc_library()
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def _check(lib: ctypes.CDLL, result: int, log: bytes = b"") -> None:
    if result != 0:
        text = lib.nvrtcGetErrorString(result)
        raise RuntimeError(f"NVRTC: {text.decode() if text else result}\n{log.decode(errors='replace')}")


def compile_cubin(source: str, arch: str) -> bytes:
    """`source` (no includes) compiled to a CUBIN for `arch` ("90" for an H100/H200)."""
    lib = _library()
    program = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"kernel.cu", 0, None, None))
    try:
        flags = [f"--gpu-architecture=sm_{arch}", "--std=c++17"]
        array = (ctypes.c_char_p * len(flags))(*[f.encode() for f in flags])
        result = lib.nvrtcCompileProgram(program, len(flags), array)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(program, log)
        _check(lib, result, log.value)
        lib.nvrtcGetCUBINSize(program, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetCUBIN(program, cubin))
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


_kernels: dict[tuple, object] = {}


def kernel(source: str, name: str, device: torch.device):
    """The kernel `name` of `source` (an `extern "C"` function), compiled and loaded for `device`
    once per process; call it as `k(grid=..., block=..., args=[tensors and ints])`."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (source, name, index)
    if key not in _kernels:
        from torch.cuda import _utils

        major, minor = torch.cuda.get_device_capability(index)
        cubin = compile_cubin(source, f"{major}{minor}")
        with torch.cuda.device(index):
            _kernels[key] = _utils._cuda_load_module(cubin, [name])[name]
    return _kernels[key]
