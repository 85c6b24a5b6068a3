"""The running batch's cache on the fast path: static rows, a CUDA graph per batch-size bucket.

Same layout as `batch.Rows` (rows right-aligned, each row's padding masked, positions per row), but held
in one static store of `capacity` rows and `length` columns, allocated once, so that a decode step is a
CUDA graph replay (core.cuda_graphs.GraphedDecode.step captures one per cache and shape). Buckets are 1,
2, 4, 8, 16, 32 rows, each a `StaticCache` whose layers are views of the store's first rows: one visitor
decodes in the one-row graph, sixteen share one step, and moving between buckets copies nothing, so each
bucket's graph is captured once and replayed for as long as the store lives. Every row writes its newest
token in the same column (`column`, the layers' shared `cumulative_length`); a joining row is copied in
so that it ends in that column, and when it is longer than the rows already there they all move right.
Columns no row needs are reclaimed in place (everything moves left) when the store is full; the store
grows (and its graphs are captured again) only when a single row needs more columns than it has. Each
row's next input token stays on the device (`tokens`): a step needs nothing from the host. All of it also
runs without a graph (on the CPU, in the tests), through the same forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import StaticCache

from core.serving.rows import device_longs

BUCKETS = (1, 2, 4, 8, 16, 32)
LENGTH_STEP = 256  # as core.cuda_graphs: lengths round up to this, so most requests reuse a captured graph


def bucket_for(rows: int) -> int:
    return next((b for b in BUCKETS if b >= rows), rows)


class StaticRows:
    def __init__(self, model, graph=None, capacity: int = 16) -> None:
        self.model = model
        self.graph = graph  # a GraphedDecode, or None: eager forwards over the same cache
        self.capacity = bucket_for(capacity)  # rows of the store: the running batch's cap, rounded up to a bucket
        self.device = model.get_input_embeddings().weight.device
        self.store: StaticCache | None = None  # `capacity` rows x `length` columns, allocated when a row first joins
        self.views: dict[int, StaticCache] = {}  # bucket -> a cache over the store's first `bucket` rows
        self.bucket = 0
        self.length = 0  # columns of the store
        self.column = 0  # where the next token of every row is written
        self.starts: list[int] = []  # each row's first column
        self.positions: list[int] = []  # each row's next position id
        self.tokens: torch.Tensor | None = None  # long [rows] on the device: each row's next input token
        self.dtype: torch.dtype | None = None  # of the keys and values, from the first row that joins
        self._inputs: tuple | None = None  # the step's ids, positions and mask on the device (see _build_inputs)

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def cache(self) -> StaticCache | None:
        return self.views.get(self.bucket)

    # ------------------------------------------------------------------ the store and its views

    def _new_store(self, length: int) -> StaticCache:
        cache = StaticCache(config=self.model.config, max_cache_len=length)
        with torch.inference_mode():  # allocate the layers now: rows are copied in before any forward
            cache.early_initialization(batch_size=self.capacity, num_heads=_kv_heads(self.model.config),
                                       head_dim=_head_dim(self.model.config), dtype=self.dtype, device=self.device)
            for layer, where in zip(cache.layers, _layer_devices(self.model, self.device)):
                if where != self.device:  # a model split across GPUs: each layer's cache beside the layer
                    layer.keys, layer.values = layer.keys.to(where), layer.values.to(where)
                    layer.cumulative_length, layer.device = layer.cumulative_length.to(where), where
        return cache

    def _view(self, bucket: int) -> StaticCache:
        """The store's first `bucket` rows as a cache of its own (its layers share the store's tensors, and the
        column they write next)."""
        if bucket not in self.views:
            view = StaticCache(config=self.model.config, max_cache_len=self.length)
            for mine, whole in zip(view.layers, self.store.layers):
                mine.keys, mine.values = whole.keys[:bucket], whole.values[:bucket]
                mine.cumulative_length, mine.device = whole.cumulative_length, whole.device
                mine.batch_size, mine.num_heads = bucket, whole.num_heads
                mine.k_head_dim, mine.v_head_dim = whole.k_head_dim, whole.v_head_dim
                mine.is_initialized = True
            self.views[bucket] = view
        return self.views[bucket]

    def _grow(self, length: int, shift: int) -> None:
        """A new store of `length` columns holding the rows, every row `shift` columns left; its graphs start over."""
        store, rows, kept = self._new_store(length), len(self.starts), self.column - shift
        if self.store is not None and rows and kept > 0:
            for old, new in zip(self.store.layers, store.layers):
                new.keys[:rows, :, :kept] = old.keys[:rows, :, shift:self.column]
                new.values[:rows, :, :kept] = old.values[:rows, :, shift:self.column]
        self.close()
        self.store, self.length = store, length
        self._moved(-shift)

    def _shift(self, by: int) -> None:
        """Moves every row `by` columns within the store (left when negative)."""
        rows = len(self.starts)
        if rows and by:
            old = slice(max(0, -by), self.column)
            new = slice(max(0, by), self.column + by)
            for layer in self.store.layers:
                layer.keys[:rows, :, new] = layer.keys[:rows, :, old].clone()
                layer.values[:rows, :, new] = layer.values[:rows, :, old].clone()
        self._moved(by)

    def _moved(self, by: int) -> None:
        self.starts = [s + by for s in self.starts]
        self.column = max(self.column + by, 0)
        self._inputs = None

    def _place(self, rows: int, width: int) -> None:
        """Room for `rows` rows whose tokens need `width` columns before the write column, and the write column: the
        rows move as little as they can (right for a longer row, left to reclaim columns), and the store grows (its
        graphs start over) only when `width` does not fit."""
        if rows > self.capacity:
            raise ValueError(f"{rows} rows: the static store holds {self.capacity} (APP_MAX_BATCH)")
        if self.store is None or width + 1 > self.length:
            self._grow(-(-(width + 1) // LENGTH_STEP) * LENGTH_STEP, min(self.starts, default=self.column))
        if self.column < width or self.column + 1 > self.length:
            self._shift(width - self.column)
        if bucket_for(rows) != self.bucket:
            self.bucket, self._inputs = bucket_for(rows), None
        self._view(self.bucket)

    def _width(self) -> int:
        """Columns the rows occupy before the write column."""
        return self.column - min(self.starts, default=self.column)

    def close(self) -> None:
        """Drops the graphs captured for the store's views (they hold its addresses; all graphs go together, see
        GraphedDecode.reset), and the store."""
        mine = {id(view) for view in self.views.values()}
        if self.graph is not None and any(key[0] in mine for key in self.graph.graphs):
            self.graph.reset()
        self.views, self.store = {}, None

    def held_bytes(self) -> int:
        """Device memory the store keeps between chats."""
        if self.store is None:
            return 0
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.store.layers)

    # ------------------------------------------------------------------ rows

    def join(self, layers: tuple, length: int, token: int) -> None:
        """Adds one row: its keys and values ([1, heads, length, head_dim] per layer) and its next input token."""
        self.dtype = self.dtype or layers[0][0].dtype
        rows = len(self.starts) + 1
        self._place(rows, max(self._width(), length))  # a longer row: everyone moves right, to end where it ends
        row, start = rows - 1, self.column - length
        for mine, (keys, values) in zip(self.store.layers, layers):
            mine.keys[row, :, start:self.column] = keys[0].to(mine.keys.device)
            mine.values[row, :, start:self.column] = values[0].to(mine.values.device)
        self.starts.append(start)
        self.positions.append(length)
        new = device_longs([token], self.device)
        self.tokens = new if self.tokens is None else torch.cat([self.tokens, new])
        self._inputs = None

    def leave(self, keep: Sequence[int]) -> None:
        keep = list(keep)
        if keep != list(range(len(keep))):
            index = device_longs(keep, self.device)
            for layer in self.store.layers:
                where = index.to(layer.keys.device)
                layer.keys[:len(keep)] = layer.keys[where]
                layer.values[:len(keep)] = layer.values[where]
            self.tokens = self.tokens[index]
        else:
            self.tokens = self.tokens[:len(keep)]
        self.starts = [self.starts[i] for i in keep]
        self.positions = [self.positions[i] for i in keep]
        self._inputs = None
        if not keep:  # the store and its graphs stay, for the next visitor
            self.bucket, self.column, self.tokens = 0, 0, None
        else:
            self.bucket = bucket_for(len(keep))

    def row_cache(self, row: int, length: int) -> tuple:
        """The first `length` positions of one row's keys and values (to keep for a later turn of its chat)."""
        start = self.starts[row]
        return tuple((layer.keys[row:row + 1, :, start:start + length].clone(),
                      layer.values[row:row + 1, :, start:start + length].clone()) for layer in self.store.layers)

    def step(self, model) -> torch.Tensor:
        """One decode step from each row's next token; each row's next-token logits ([rows, vocab]), on the device,
        with no wait for the host."""
        rows = len(self.starts)
        self._place(rows, self._width())
        if self._inputs is None:
            self._build_inputs()
        ids, positions, mask = self._inputs
        ids[:rows, 0] = self.tokens
        mask[:, self.column] = 1
        if self.graph is not None:
            logits = self.graph.step(ids, self.cache, position_ids=positions, attention_mask=mask).logits
        else:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache,
                           use_cache=True).logits
        self.column += 1  # the forward advanced every layer's cumulative_length by one as well
        positions.add_(1)
        self.positions = [p + 1 for p in self.positions]
        return logits[:rows, -1]

    def _build_inputs(self) -> None:
        """The step's input tensors on the device, rebuilt only when rows or the store change: the mask (each row
        from its start, padding rows only at the new column), the positions, and where the next token goes."""
        rows, device = len(self.starts), self.device
        columns = torch.arange(self.length, device=device)
        starts = device_longs(self.starts + [self.column] * (self.bucket - rows), device)
        mask = ((columns[None] >= starts[:, None]) & (columns[None] < self.column)).long()
        positions = device_longs(self.positions + [0] * (self.bucket - rows), device)[:, None]
        self._inputs = (torch.zeros(self.bucket, 1, dtype=torch.long, device=device), positions, mask)
        for layer in self.store.layers:
            layer.cumulative_length.fill_(self.column)


def _layer_devices(model, default: torch.device) -> list[torch.device]:
    """The device of each decoder layer (they differ on a model split across GPUs)."""
    layers = getattr(model.get_decoder(), "layers", None) if hasattr(model, "get_decoder") else None
    if layers is None:
        return [default] * model.config.num_hidden_layers
    return [next((p.device for p in layer.parameters()), default) for layer in layers]


def _kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
