"""The running batch: requests join at the next step, decode one token a step together, and leave when done.

Prompts are prefilled, then each one's keys and values join the batch's cache as one more row
(core.serving.rows without a graph, core.serving.static_rows on the GPU's fast path), and each step
decodes one token for every row. On the CPU each prompt is prefilled alone, a batch of one, exactly as if
it were the only visitor. On a GPU the prompts that arrive together are prefilled together, left-padded
as `generate()` pads a batch (one forward instead of one per prompt, so the sixteenth visitor does not
wait for fifteen prefills; their numbers are those of a batch, within bf16 rounding of a lone prefill).

On a GPU the steps also overlap with the host's work: step N+1 is launched before step N's tokens are
read back, because each row's next token is chosen on the device (the argmax, or its own sampler) and
fed to the next step there. While the GPU computes, the host streams the previous step's text, checks
stop strings and ends. A row that ended so costs one wasted row of one step. A request whose choice
needs the host (a constraint, log-probabilities, a repetition penalty) makes its steps wait, as on the
CPU, where every step does.

Earlier turns are not recomputed: when a request ends, its row's keys and values are kept (a few
conversations, least recently used first out), and a later prompt that starts with the same tokens,
the next turn of that chat, prefills only what is new (`PrefixStore`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from core.serving.requests import Finish, RequestState, Status, most_together
from core.serving.rows import Rows, pad_left, device_longs

Prefill = tuple[RequestState, int, tuple | None]  # a request, the tokens of its kept prefix, and their keys and values
PREFILL_TOKENS = 8192  # padded prompt tokens one prefill may hold together (its activations and attention mask)


class PrefixStore:
    """Keys and values of recently finished answers, by their token ids, for the next turn of the same chat."""

    def __init__(self, entries: int = 8) -> None:
        self.entries = entries
        self._kept: OrderedDict[tuple[int, ...], tuple] = OrderedDict()

    def keep(self, ids: Sequence[int], layers: tuple) -> None:
        if self.entries <= 0 or not ids:
            return
        self._kept[tuple(ids)] = layers
        self._kept.move_to_end(tuple(ids))
        while len(self._kept) > self.entries:
            self._kept.popitem(last=False)

    def longest(self, ids: Sequence[int]) -> tuple[int, tuple | None]:
        """The longest kept prefix of `ids` (at most all but its last token, which must be run for its logits)."""
        best, found = 0, None
        for kept, layers in self._kept.items():
            shared = _common_prefix(kept, ids, len(ids) - 1)
            if shared > best:
                best, found = shared, (kept, layers)
        if found is None:
            return 0, None
        self._kept.move_to_end(found[0])
        return best, found[1]

    def clear(self) -> None:
        self._kept.clear()


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class StepTimes:
    """Where the host's time went in the steps since `reset` (benchmarks/serve.py prints it)."""

    steps: int = 0
    rows: int = 0  # summed over the steps
    launch_s: float = 0.0  # building and launching steps, choosing on the device
    wait_s: float = 0.0  # waiting for a step's tokens to reach the host
    settle_s: float = 0.0  # then: text streamed, stop strings, ends, rows removed
    prefills: int = 0  # prefill forwards (a group of prompts arriving together is one)
    prompts: int = 0
    prefill_s: float = 0.0  # prefills, first tokens and joins, waiting for the device included

    def summary(self) -> str:
        n = max(self.steps, 1)
        return (f"{self.steps} steps, {self.rows / n:.1f} rows a step; per step: launch {self.launch_s / n * 1e3:.2f} "
                f"ms, waiting for the device {self.wait_s / n * 1e3:.2f} ms, text and ends "
                f"{self.settle_s / n * 1e3:.2f} ms; {self.prompts} prompts in {self.prefills} prefills, "
                f"{self.prefill_s * 1e3:.0f} ms in all")


@dataclass
class Launched:
    """A step launched on the device: its rows' requests, and their chosen tokens, on the host once `ready`."""

    states: list[RequestState]
    tokens: torch.Tensor
    ready: object = None  # a torch.cuda.Event recorded after the copy to the host; None on the CPU

    @classmethod
    def of(cls, states: list[RequestState], chosen: torch.Tensor) -> Launched:
        if chosen.device.type != "cuda":
            return cls(states, chosen)
        tokens = chosen.to("cpu", non_blocking=True)  # pinned: the copy runs behind the step
        ready = torch.cuda.Event()
        ready.record()
        return cls(states, tokens, ready)

    def read(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.tokens.tolist()


class Batch:
    """The requests decoding together on one model, and their cache."""

    def __init__(self, model, rows=None, prefixes: PrefixStore | None = None, overlap: bool = False,
                 prefill_together: bool = False) -> None:
        self.model = model
        self.rows = rows if rows is not None else Rows()  # or core.serving.static_rows.StaticRows, graphed
        self.states: list[RequestState] = []  # in row order
        self.prefixes = prefixes or PrefixStore()
        self.overlap = overlap  # launch each step before reading the previous one's tokens (a GPU)
        self.prefill_together = prefill_together  # prompts that arrive together share one prefill (a GPU)
        self.reused_tokens = 0  # prompt tokens taken from kept prefixes instead of computed, since the model loaded
        self._launched: Launched | None = None
        self.times = StepTimes()

    def __len__(self) -> int:
        return len(self.states)

    @torch.inference_mode()
    def add(self, states: Sequence[RequestState]) -> list[RequestState]:
        """Prefills the prompts of `states` and chooses each one's first token; each joins the rows unless that
        ended it. Returns those it ended."""
        ended, started = [], time.perf_counter()
        for group in self._groups(states):
            self.times.prefills, self.times.prompts = self.times.prefills + 1, self.times.prompts + len(group)
            for state, layers, logits in self._prefill(group):
                if state.accept(state.choose(logits)):
                    self._keep(state, tuple((keys.clone(), values.clone()) for keys, values in layers))
                    ended.append(state)
                    continue
                state.status = Status.DECODING
                self.rows.join(layers, len(state.prompt_ids), state.generated[-1])
                self.states.append(state)
        most_together(self.states)
        self.times.prefill_s += time.perf_counter() - started
        return ended

    def _groups(self, states: Sequence[RequestState]) -> Iterator[list[Prefill]]:
        """The prefills to run, each request with its kept prefix (tokens, keys and values): longest prompts first
        (a shorter row joins without moving the others), together when allowed, up to PREFILL_TOKENS padded."""
        group: list[Prefill] = []
        for state in sorted(states, key=lambda s: -len(s.prompt_ids)):
            item = (state, *self.prefixes.longest(state.prompt_ids))
            full = (len(group) + 1) * len(group[0][0].prompt_ids) > PREFILL_TOKENS if group else False
            if group and (not self.prefill_together or full):
                yield group
                group = []
            group.append(item)
        if group:
            yield group

    def _prefill(self, group: list[Prefill]) -> list[tuple[RequestState, tuple, torch.Tensor]]:
        """Each request's keys and values ([1, heads, prompt, head_dim] per layer) and last logits, from one forward.

        A row's kept prefix is not computed again: the kept keys and values are left-padded to the longest kept
        prefix of the group and its new tokens to the longest new part, and one mask hides both paddings (the
        left-padded batches of `generate()`, in two parts). A lone prompt has no padding and no mask."""
        device = self.model.get_input_embeddings().weight.device
        kept = max(shared for _, shared, _ in group)
        new = [len(state.prompt_ids) - shared for state, shared, _ in group]
        width = max(new)
        cache = DynamicCache(config=self.model.config)
        if kept:
            some = next(layers for _, _, layers in group if layers is not None)
            for index, (keys, _) in enumerate(some):
                empty = keys[:, :, :0]
                parts = [[pad_left((layers[index][part] if layers is not None else empty)[:, :, :shared], kept)
                          for _, shared, layers in group] for part in (0, 1)]
                cache.update(torch.cat(parts[0]), torch.cat(parts[1]), index)
            self.reused_tokens += sum(shared for _, shared, _ in group)
        ids, positions, columns = [], [], []
        for (state, shared, _), count in zip(group, new):
            pad = width - count
            ids += [0] * pad + state.prompt_ids[shared:]
            positions += [0] * pad + list(range(shared, len(state.prompt_ids)))
            columns.append(list(range(kept - shared, kept)) + list(range(kept + pad, kept + width)))
        padded = any(len(c) != kept + width for c in columns)
        mask = None
        if padded:
            mask = torch.zeros(len(group), kept + width, dtype=torch.long)
            for row, used in enumerate(columns):
                mask[row, used] = 1
            mask = mask.to(device)
        out = self.model(input_ids=device_longs(ids, device).view(len(group), width), attention_mask=mask,
                         position_ids=device_longs(positions, device).view(len(group), width), cache=cache,
                         use_cache=True, logits_to_keep=1)
        results = []
        for row, ((state, _, _), used) in enumerate(zip(group, columns)):
            take = slice(used[0], used[-1] + 1) if used == list(range(used[0], used[-1] + 1)) else torch.tensor(used)
            results.append((state, tuple((_columns(layer.keys, row, take), _columns(layer.values, row, take))
                                         for layer in out.cache.layers), out.logits[row, -1]))
        return results

    @torch.inference_mode()
    def step(self) -> list[RequestState]:
        """One token for every running request; returns the requests that ended (finished or cancelled).

        Overlapped, this launches the step and then reads the previous one's tokens, while this one runs; else it
        reads this step's own tokens before it returns."""
        wait = not self.overlap or any(state.needs_host for state in self.states)
        ended = self._settle() if wait else []  # the host must know every token before a row chooses from it
        if self.states:
            launched = self._launch()
            ended += self._settle()
            self._launched = launched
            if wait or not self.states:
                ended += self._settle()
        return ended

    def _launch(self) -> Launched:
        started = time.perf_counter()
        logits = self.rows.step(self.model)
        chosen = greedy(logits)  # every row that needs nothing more than the greedy token
        for i, state in enumerate(self.states):
            if state.needs_row:
                chosen[i] = state.choose(logits[i]) if state.needs_host else state.pick(logits[i])
        self.rows.tokens = chosen
        launched = Launched.of(list(self.states), chosen)
        self.times.steps, self.times.rows = self.times.steps + 1, self.times.rows + len(self.states)
        self.times.launch_s += time.perf_counter() - started
        return launched

    def _settle(self) -> list[RequestState]:
        """Takes the launched step's tokens: the text each adds, stop strings, ends; removes the rows that ended."""
        launched, self._launched = self._launched, None
        if launched is None:
            return []
        started = time.perf_counter()
        tokens = launched.read()
        read = time.perf_counter()
        ended = []
        for state, token in zip(launched.states, tokens):
            if state.status is Status.DECODING and state.accept(token):  # a row gone since the launch is skipped
                ended.append(state)
        gone = self._remove(ended)
        self.times.wait_s += read - started
        self.times.settle_s += time.perf_counter() - read
        return gone

    def cancel(self, cancelled: Sequence[RequestState]) -> list[RequestState]:
        """Drops the cancelled requests from the rows; returns them."""
        for state in cancelled:
            state.end(Finish.CANCELLED)
        return self._remove(list(cancelled))

    def _remove(self, gone: list[RequestState]) -> list[RequestState]:
        if not gone:
            return []
        leaving = {id(state) for state in gone}
        keep = []
        for i, state in enumerate(self.states):
            if id(state) not in leaving:
                keep.append(i)
            elif state.finish is not Finish.CANCELLED:  # its prompt and answer, but the last token (chosen, never run)
                length = len(state.prompt_ids) + len(state.generated) - 1
                self._keep(state, self.rows.row_cache(i, length))
        self.rows.leave(keep)
        self.states = [self.states[i] for i in keep]
        return gone

    def _keep(self, state: RequestState, cache_layers: tuple) -> None:
        """The finished answer's keys and values, for its chat's next turn."""
        self.prefixes.keep(state.prompt_ids + state.generated[:-1], cache_layers)

    def close(self) -> None:
        """Lets go of the cache, its graphs and the kept conversations (the model or its fast path changed)."""
        self._launched = None
        self.states = []
        self.rows.close()
        self.prefixes.clear()


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (the first of equal maxima, as `argmax`), in two passes when the vocabulary splits into
    chunks: the best of each chunk, then the best chunk. PyTorch's one-pass argmax over an 8B model's 128,256 logits
    is one long reduction a row, 37 µs of each decode step on an H200 (benchmarks/RESULTS.md); the two passes spread
    it over the GPU."""
    rows, vocab = logits.shape
    chunk = next((c for c in (1024, 512, 256) if vocab % c == 0 and vocab >= 8 * c), 0)
    if not chunk:
        return logits.argmax(-1)
    best, where = logits.reshape(rows, vocab // chunk, chunk).max(-1)  # the first maximum of each chunk
    part = best.argmax(-1, keepdim=True)  # the first chunk holding the row's maximum
    return (where.gather(-1, part) + part * chunk).squeeze(-1)


def _columns(tensor: torch.Tensor, row: int, take) -> torch.Tensor:
    """One row's columns `take` (a slice, or indices) of a [rows, heads, columns, head_dim] tensor."""
    if isinstance(take, torch.Tensor):
        take = take.to(tensor.device, non_blocking=True)
    return tensor[row:row + 1, :, take]


def batchable(model) -> str | None:
    """None when the batch can run `model`; else why not, in words. Checked on a one-token cache of the model's own
    kind, so a model whose layers use sliding windows or other caches answers one at a time, with the reason."""
    cache = DynamicCache(config=model.config)
    odd = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if odd:
        return (f"its cache uses {', '.join(sorted(odd))} layers, which the running batch does not pad "
                "and merge")
    return None
