"""What the decode benchmark and its kernel sweep share: the model shapes, the copy bandwidth, the conditions line."""

from __future__ import annotations

import importlib.metadata as metadata
import os

import torch

SHAPES = {
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "smol": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192,
                 tie_word_embeddings=True),
}


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    if device != "cuda":
        return 0.0
    size = 1 << 30
    src = torch.empty(size, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * size * 20 / (start.elapsed_time(end) / 1000)


def conditions(device: str, bandwidth: float) -> str:
    """The card, its copy bandwidth and the versions that matter, for a results table."""
    versions = {"torch": torch.__version__}
    for name in ("transformers", "bitsandbytes", "triton", "torchao"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    card = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    bw = f", copy bandwidth {bandwidth / 1e12:.2f} TB/s" if bandwidth else ""
    return f"{card}{bw}; " + ", ".join(f"{k} {v}" for k, v in versions.items())
