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


def timeline(run, skip: int = 3) -> str:
    """Where a graphed decode loop's time goes, from a CUDA trace of `run()` (torch.profiler, CUDA activity only, so
    the host's Python is not slowed by the profiler's own op records).

    A step is one replay of a captured graph (a `cudaGraphLaunch`), from its first kernel on the GPU to the next
    replay's first kernel. Per step, in µs: the graph's kernels (union of their intervals), every other kernel or copy
    in that window (generate()'s token choice and stop checks, the inputs copied into the graph's buffers), the GPU's
    idle time, and on the host the period between launches and the part of it spent waiting on the GPU (a host that
    never waits is the bottleneck). The `skip` first and last replays are left out (capture, warm-up, the end)."""
    import json
    import tempfile
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
    with tempfile.NamedTemporaryFile(suffix=".json") as handle:
        prof.export_chrome_trace(handle.name)
        events = json.loads(Path(handle.name).read_text())["traceEvents"]
    return summarize_timeline(events, skip)


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def summarize_timeline(events: list[dict], skip: int = 3) -> str:
    def correlation(event: dict):
        return (event.get("args") or {}).get("correlation")

    runtime = sorted((e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and "ts" in e),
                     key=lambda e: e["ts"])
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "ts" in e),
                 key=lambda e: e["ts"])
    launches = [e for e in runtime if e["name"] in ("cudaGraphLaunch", "cuGraphLaunch")]
    by_correlation: dict = {}
    for event in gpu:
        by_correlation.setdefault(correlation(event), []).append(event)
    waits = [e for e in runtime if "Synchronize" in e["name"] or e["name"] in ("cudaMemcpy", "cudaMemcpyAsync")]
    steps, others = [], {}
    chosen = launches[skip:len(launches) - skip]
    for launch, following in zip(chosen, chosen[1:]):
        mine, theirs = by_correlation.get(correlation(launch)), by_correlation.get(correlation(following))
        if not mine or not theirs:
            continue
        start, end = mine[0]["ts"], theirs[0]["ts"]
        window = [e for e in gpu if start <= e["ts"] < end]
        graph_busy = _union([(e["ts"], min(e["ts"] + e["dur"], end)) for e in mine])
        busy = _union([(e["ts"], min(e["ts"] + e["dur"], end)) for e in window])
        for event in window:
            if correlation(event) != correlation(launch):
                entry = others.setdefault(event["name"][:70], [0.0, 0])
                entry[0] += event["dur"]
                entry[1] += 1
        host_from, host_to = launch["ts"], following["ts"]
        waited = sum(e["dur"] for e in waits if host_from <= e["ts"] < host_to)
        steps.append((end - start, graph_busy, busy - graph_busy, end - start - busy, host_to - host_from, waited,
                      len(mine)))
    if not steps:
        return (f"timeline: {len(launches)} graph launches, {len(gpu)} GPU events; no step whose kernels carry its "
                "launch's correlation id")
    n = len(steps)
    mean = [sum(s[i] for s in steps) / n for i in range(7)]
    lines = [f"timeline over {n} steps (µs a step): GPU period {mean[0]:.0f} = graph {mean[1]:.0f} "
             f"({mean[6]:.0f} kernels) + other kernels/copies {mean[2]:.0f} + idle {mean[3]:.0f}; "
             f"host period {mean[4]:.0f}, of which waiting on the GPU {mean[5]:.0f}"]
    for name, (total, count) in sorted(others.items(), key=lambda item: -item[1][0])[:12]:
        lines.append(f"  outside the graph: {total / n:6.1f} µs, {count / n:.1f}x  {name}")
    return "\n".join(lines)
