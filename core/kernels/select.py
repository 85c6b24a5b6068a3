"""Which kernel a group of same-shaped layers uses, ours or the library's: decided once by measuring.

Both candidates are timed on the model's own layers of that shape, each layer once in turn (32
layers of an 8B model are far larger than the 60 MB L2, so the weights come from memory as in a
real decode step), captured in one CUDA graph so that launch gaps stay out, replayed a few times;
the median per layer decides. Decisions are kept for the process, per device and shape.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Call = Callable[[], object]


@dataclass(frozen=True)
class Decision:
    label: str  # what was compared, e.g. "nf4 4096x14336, 1 row"
    ours_us: float
    theirs_us: float
    theirs: str = "the library's"  # who the alternative is: "bitsandbytes'", "cuBLAS'", "separate layers'"

    @property
    def ours(self) -> bool:
        return self.ours_us < self.theirs_us

    def describe(self) -> str:
        if self.ours:
            return f"{self.label}: ours ({self.ours_us:.1f} µs against {self.theirs_us:.1f})"
        return f"{self.label}: {self.theirs} ({self.theirs_us:.1f} µs against ours {self.ours_us:.1f})"


def graph_time_us(calls: Sequence[Call], replays: int = 5) -> float:
    """Median µs per call of `calls`, run in order inside one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: Triton compiles, libraries init
        for call in calls:
            call()
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(calls))
    return statistics.median(times)


_decided: dict[tuple, Decision] = {}


def decide(key: tuple, label: str, ours: Sequence[Call], theirs: Sequence[Call],
           timer: Callable[[Sequence[Call]], float] = graph_time_us, who: str = "the library's") -> Decision:
    """Times both (once per key in this process) and returns which is faster; `who` names theirs."""
    if key not in _decided:
        with torch.inference_mode():
            _decided[key] = Decision(label, timer(ours), timer(theirs), who)
    return _decided[key]


def forget() -> None:
    """Drops the remembered decisions (tests, and benchmarks that compare settings)."""
    _decided.clear()
