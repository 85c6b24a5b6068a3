"""The running batch's cache on the fast path: static rows, a CUDA graph per batch-size bucket.

Same layout as `batch.Rows` (rows right-aligned, each row's padding masked, positions per row), but held
in a `StaticCache` of fixed shape [bucket, heads, length, head_dim] so that a decode step is a CUDA graph
replay (core.cuda_graphs.GraphedDecode.step captures one per cache and shape). Buckets are 1, 2, 4, 8, 16,
32 rows: one visitor decodes in the one-row graph, as fast as the fast path alone; sixteen share one
step. Every row writes its newest token in the same column (`cumulative_length`, set before each step);
a joining row is copied in so that it ends in that column, and when it is longer than the rows already
there they all move right. Columns no row needs are reclaimed by moving everything left when the cache
is full, and the cache grows (new graphs) only when a single row needs more. All of it also runs without
a graph (on the CPU, in the tests), through the same forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, StaticCache

BUCKETS = (1, 2, 4, 8, 16, 32)
LENGTH_STEP = 256  # as core.cuda_graphs: lengths round up to this, so most requests reuse a captured graph


def bucket_for(rows: int) -> int:
    return next((b for b in BUCKETS if b >= rows), rows)


class StaticRows:
    def __init__(self, model, graph=None) -> None:
        self.model = model
        self.graph = graph  # a GraphedDecode, or None: eager forwards over the same cache
        self.cache: StaticCache | None = None
        self.bucket = 0
        self.length = 0  # columns of the cache
        self.column = 0  # where the next token of every row is written
        self.starts: list[int] = []  # each row's first column
        self.positions: list[int] = []  # each row's next position id
        self.dtype: torch.dtype | None = None  # of the keys and values, from the first row that joins
        self._inputs: tuple | None = None  # the step's ids, positions and mask on the device (see _build_inputs)

    def __len__(self) -> int:
        return len(self.starts)

    # ------------------------------------------------------------------ cache shape

    def _new_cache(self, bucket: int, length: int) -> StaticCache:
        cache = StaticCache(config=self.model.config, max_cache_len=length)
        device = self.model.get_input_embeddings().weight.device
        with torch.inference_mode():  # allocate the layers now: rows are copied in before any forward
            cache.early_initialization(batch_size=bucket, num_heads=_kv_heads(self.model.config),
                                       head_dim=_head_dim(self.model.config), dtype=self.dtype,
                                       device=device)
            for layer, where in zip(cache.layers, _layer_devices(self.model, device)):
                if where != device:  # a model split across GPUs: each layer's cache beside the layer
                    layer.keys, layer.values = layer.keys.to(where), layer.values.to(where)
                    layer.cumulative_length, layer.device = layer.cumulative_length.to(where), where
        return cache

    def _reshape(self, bucket: int, length: int, shift: int = 0) -> None:
        """Moves the rows into a cache of `bucket` rows and `length` columns, every row `shift` columns left."""
        new = self._new_cache(bucket, length)
        rows, kept = len(self.starts), self.column - shift
        if self.cache is not None and rows and kept > 0:
            for old, mine in zip(self.cache.layers, new.layers):
                mine.keys[:rows, :, :kept] = old.keys[:rows, :, shift:self.column]
                mine.values[:rows, :, :kept] = old.values[:rows, :, shift:self.column]
        self._forget(self.cache)
        self.cache, self.bucket, self.length = new, bucket, length
        self._inputs = None
        self.column = max(kept, 0)
        self.starts = [s - shift for s in self.starts]

    def _forget(self, cache) -> None:
        """Drops the graphs captured for a cache that is no longer used (they hold its addresses and memory)."""
        if cache is not None and self.graph is not None:
            self.graph.graphs = {k: v for k, v in self.graph.graphs.items() if k[0] != id(cache)}

    def _room(self, rows: int, needed_columns: int) -> None:
        """Makes room for `rows` rows and `needed_columns` columns: a bigger bucket, reclaimed columns, or a longer
        cache, in that order of preference."""
        bucket = max(self.bucket, bucket_for(rows))
        if needed_columns <= self.length and bucket == self.bucket:
            return
        shift = min(self.starts) if self.starts else self.column  # columns no row needs
        length = self.length
        if needed_columns - shift > length:
            length = -(-(needed_columns - shift) // LENGTH_STEP) * LENGTH_STEP
        self._reshape(bucket, length, shift)

    # ------------------------------------------------------------------ rows

    def join(self, cache: DynamicCache, length: int) -> None:
        self.dtype = self.dtype or cache.layers[0].keys.dtype
        rows = len(self.starts) + 1
        if length > self.column:  # the new row is longer: everyone moves right so that it ends in `column` too
            self._room(rows, length + 1)
            self._shift_right(length - self.column)
        else:
            self._room(rows, self.column + 1)
        row, start = rows - 1, self.column - length
        for mine, new in zip(self.cache.layers, cache.layers):
            mine.keys[row, :, start:self.column] = new.keys[0].to(mine.keys.device)
            mine.values[row, :, start:self.column] = new.values[0].to(mine.values.device)
        self.starts.append(start)
        self.positions.append(length)
        self._inputs = None

    def _shift_right(self, by: int) -> None:
        if by <= 0:
            return
        rows = len(self.starts)
        if rows:
            for layer in self.cache.layers:
                layer.keys[:rows, :, by:self.column + by] = layer.keys[:rows, :, :self.column].clone()
                layer.values[:rows, :, by:self.column + by] = layer.values[:rows, :, :self.column].clone()
        self.starts = [s + by for s in self.starts]
        self.column += by
        self._inputs = None

    def leave(self, keep: Sequence[int]) -> None:
        keep = list(keep)
        if keep != list(range(len(keep))):
            for layer in self.cache.layers:
                index = torch.tensor(keep, device=layer.keys.device)
                layer.keys[:len(keep)] = layer.keys[index]
                layer.values[:len(keep)] = layer.values[index]
        self.starts = [self.starts[i] for i in keep]
        self.positions = [self.positions[i] for i in keep]
        self._inputs = None
        if not keep:
            self._forget(self.cache)
            self.cache, self.bucket, self.length, self.column = None, 0, 0, 0
        elif bucket_for(len(keep)) < self.bucket:
            self._reshape(bucket_for(len(keep)), self.length, min(self.starts))

    def row_cache(self, row: int) -> tuple:
        start = self.starts[row]
        return tuple((layer.keys[row:row + 1, :, start:self.column].clone(),
                      layer.values[row:row + 1, :, start:self.column].clone()) for layer in self.cache.layers)

    def step(self, model, tokens: Sequence[int]) -> torch.Tensor:
        rows = len(tokens)
        self._room(rows, self.column + 1)
        if self._inputs is None:
            self._build_inputs()
        ids, positions, mask = self._inputs
        ids[:rows, 0] = torch.tensor(tokens, dtype=torch.long)  # the one host-to-device copy of a step
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
        """The step's input tensors on the device, rebuilt only when rows or the cache change: the mask (each row
        from its start, padding rows only at the new column), the positions, and where the next token goes."""
        device = self.model.get_input_embeddings().weight.device
        rows = len(self.starts)
        columns = torch.arange(self.length, device=device)
        starts = torch.full((self.bucket,), self.column, device=device)
        starts[:rows] = torch.tensor(self.starts, device=device)
        mask = ((columns[None] >= starts[:, None]) & (columns[None] < self.column)).long()
        positions = torch.zeros(self.bucket, 1, dtype=torch.long, device=device)
        positions[:rows, 0] = torch.tensor(self.positions, device=device)
        self._inputs = (torch.zeros(self.bucket, 1, dtype=torch.long, device=device), positions, mask)
        for layer in self.cache.layers:
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

