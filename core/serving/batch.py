"""The running batch: requests join at the next step, decode one token a step together, and leave when done.

Each request's prompt is prefilled alone (a batch of one, exactly as if it were the only visitor), then
its keys and values join the batch's cache as one more row. The rows are right-aligned: every row's
newest token sits in the last column, and a shorter row is padded on the left, masked out of attention
and given its own position ids, which is how `generate()` itself runs a left-padded batch. So a decode
step is one forward of [rows, 1] tokens whatever each row's length, and a row that leaves is dropped
from the cache (with the columns no remaining row needs). This is the padded batching of TGI's first
engines, on transformers' DynamicCache; it runs any decoder-only model whose cache layers are plain
full-attention layers (core.serving.batching_of says which).

Earlier turns are not recomputed: when a request ends, its row's keys and values are kept (a few
conversations, least recently used first out), and a later prompt that starts with the same tokens,
the next turn of that chat, prefills only what is new (`PrefixStore`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from core.serving.requests import RequestState, Status, most_together


class Rows:
    """The batch's KV cache: [rows, heads, columns, head_dim] per layer, rows right-aligned, with their mask."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # bool [rows, columns]: False where a row is padded
        self.positions: torch.Tensor | None = None  # long [rows]: the position of each row's next token

    def __len__(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    def join(self, cache: DynamicCache, length: int) -> None:
        """Adds one row: a batch-of-one cache holding `length` positions."""
        device = cache.layers[0].keys.device
        if self.cache is None:
            self.cache = cache
            self.mask = torch.ones(1, length, dtype=torch.bool, device=device)
            self.positions = torch.tensor([length], device=device)
            return
        columns = int(self.mask.shape[1])
        width = max(columns, length)
        for mine, new in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(new.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(new.values, width)])
        row = torch.zeros(1, width, dtype=torch.bool, device=device)
        row[:, width - length:] = True
        self.mask = torch.cat([_pad_left(self.mask, width), row])
        self.positions = torch.cat([self.positions, torch.tensor([length], device=device)])

    def leave(self, keep: Sequence[int]) -> None:
        """Keeps only the rows `keep` (in that order), and drops the columns none of them needs."""
        if not keep:
            self.cache = self.mask = self.positions = None
            return
        index = torch.tensor(list(keep), device=self.mask.device)
        mask = self.mask[index]
        first = int(mask.any(0).nonzero()[0])  # columns before it are padding in every remaining row
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]
        self.mask = mask[:, first:]
        self.positions = self.positions[index]

    def row_cache(self, row: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """The keys and values of one row without its padding (to keep for a later turn of its chat)."""
        columns = self.mask[row]
        return tuple((layer.keys[row:row + 1, :, columns].clone(), layer.values[row:row + 1, :, columns].clone())
                     for layer in self.cache.layers)

    def step(self, model, tokens: Sequence[int]) -> torch.Tensor:
        """One decode step: each row's newest token in, each row's next-token logits ([rows, vocab]) out."""
        device = self.mask.device
        ids = torch.tensor(tokens, device=device)[:, None]
        self.mask = torch.cat([self.mask, torch.ones(len(tokens), 1, dtype=torch.bool, device=device)], dim=1)
        out = model(input_ids=ids, attention_mask=self.mask.long(), position_ids=self.positions[:, None],
                    cache=self.cache, use_cache=True)
        self.positions = self.positions + 1
        return out.logits[:, -1]


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """`tensor` with zeros (False) before its columns (dim 2 for keys and values, dim 1 for a mask) up to `width`."""
    dim = 2 if tensor.dim() == 4 else 1
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


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


class Batch:
    """The requests decoding together on one model, and their cache."""

    def __init__(self, model, rows=None, prefixes: PrefixStore | None = None) -> None:
        self.model = model
        self.rows = rows if rows is not None else Rows()  # or core.serving.static_rows.StaticRows, graphed
        self.states: list[RequestState] = []  # in row order
        self.prefixes = prefixes or PrefixStore()
        self.reused_tokens = 0  # prompt tokens taken from kept prefixes instead of computed, since the model loaded

    def __len__(self) -> int:
        return len(self.states)

    @torch.inference_mode()
    def add(self, state: RequestState) -> None:
        """Prefills `state`'s prompt alone and chooses its first token; it joins the rows unless that ended it."""
        cache, logits = self._prefill(state.prompt_ids)
        if state.accept(state.choose(logits)):
            self._keep(state, cache_layers=_layers(cache), extra=[])
            return
        state.status = Status.DECODING
        self.rows.join(cache, len(state.prompt_ids))
        self.states.append(state)
        most_together(self.states)

    def _prefill(self, ids: list[int]) -> tuple[DynamicCache, torch.Tensor]:
        device = self.model.get_input_embeddings().weight.device
        shared, layers = self.prefixes.longest(ids)
        cache = DynamicCache(config=self.model.config)
        if layers is not None:  # the kept keys and values of the shared prefix: only the rest is computed
            for index, (keys, values) in enumerate(layers):
                cache.update(keys[:, :, :shared].clone(), values[:, :, :shared].clone(), index)
            self.reused_tokens += shared
        rest = torch.tensor([ids[shared:]], device=device)
        positions = torch.arange(shared, len(ids), device=device)[None]
        out = self.model(input_ids=rest, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        return out.cache, out.logits[0, -1]

    @torch.inference_mode()
    def step(self) -> list[RequestState]:
        """One token for every running request; returns the requests that ended (finished or cancelled)."""
        tokens = [state.generated[-1] for state in self.states]
        logits = self.rows.step(self.model, tokens)
        greedy = logits.argmax(-1).tolist()  # one host sync for every row that needs nothing more
        ended = []
        for i, state in enumerate(self.states):
            token = state.choose(logits[i]) if state.needs_row else greedy[i]
            if state.accept(token):
                ended.append(i)
        return self._remove(ended)

    def cancel(self, cancelled: Sequence[RequestState]) -> list[RequestState]:
        """Drops the cancelled requests from the rows; returns them."""
        from core.serving.requests import Finish

        rows = [i for i, state in enumerate(self.states) if state in cancelled]
        for i in rows:
            self.states[i].end(Finish.CANCELLED)
        return self._remove(rows)

    def _remove(self, rows: list[int]) -> list[RequestState]:
        if not rows:
            return []
        gone = [self.states[i] for i in rows]
        for i, state in zip(rows, gone):
            if state.finish is not None and state.finish.value != "cancelled":
                self._keep(state, cache_layers=self.rows.row_cache(i), extra=state.generated[:-1])
        keep = [i for i in range(len(self.states)) if i not in rows]
        self.rows.leave(keep)
        self.states = [self.states[i] for i in keep]
        return gone

    def _keep(self, state: RequestState, cache_layers: tuple, extra: list[int]) -> None:
        """The finished answer's keys and values, for its chat's next turn: prompt plus answer, but the last token
        (which was chosen, never run)."""
        self.prefixes.keep(state.prompt_ids + extra, cache_layers)

    def clear(self) -> None:
        self.prefixes.clear()


def _layers(cache: DynamicCache) -> tuple:
    return tuple((layer.keys, layer.values) for layer in cache.layers)


def batchable(model) -> str | None:
    """None when the batch can run `model`; else why not, in words. Checked on a one-token cache of the model's own
    kind, so a model whose layers use sliding windows or other caches answers one at a time, with the reason."""
    cache = DynamicCache(config=model.config)
    odd = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if odd:
        return (f"its cache uses {', '.join(sorted(odd))} layers, which the running batch does not pad "
                "and merge")
    return None
