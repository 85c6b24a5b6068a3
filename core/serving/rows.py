"""The running batch's cache without a graph: a DynamicCache whose rows are right-aligned, with their mask.

Every row's newest token sits in the last column, and a shorter row is padded on the left, masked out of
attention and given its own position ids, which is how `generate()` itself runs a left-padded batch. So a
decode step is one forward of [rows, 1] tokens whatever each row's length, and a row that leaves is
dropped from the cache (with the columns no remaining row needs). This is the padded batching of TGI's
first engines, on transformers' DynamicCache; core.serving.static_rows holds the same layout in a static
cache for the GPU's graphs. Both keep each row's next input token on the device (`tokens`), so that a step
needs nothing from the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache


def device_longs(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """`values` as a long tensor on `device`, without waiting for the GPU's queued work (through pinned memory)."""
    pinned = device.type == "cuda"
    return torch.tensor(list(values), dtype=torch.long, pin_memory=pinned).to(device, non_blocking=pinned)


class Rows:
    """The batch's KV cache: [rows, heads, columns, head_dim] per layer, rows right-aligned, with their mask."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # bool [rows, columns]: False where a row is padded
        self.positions: torch.Tensor | None = None  # long [rows]: the position of each row's next token
        self.tokens: torch.Tensor | None = None  # long [rows]: each row's next input token

    def __len__(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    def join(self, layers: tuple, length: int, token: int) -> None:
        """Adds one row: its keys and values ([1, heads, length, head_dim] per layer) and its next input token."""
        device = layers[0][0].device
        if self.cache is None:
            self.cache = DynamicCache()
            for index, (keys, values) in enumerate(layers):
                self.cache.update(keys, values, index)
            self.mask = torch.ones(1, length, dtype=torch.bool, device=device)
            self.positions = device_longs([length], device)
            self.tokens = device_longs([token], device)
            return
        columns = int(self.mask.shape[1])
        width = max(columns, length)
        for mine, (keys, values) in zip(self.cache.layers, layers):
            mine.keys = torch.cat([pad_left(mine.keys, width), pad_left(keys, width)])
            mine.values = torch.cat([pad_left(mine.values, width), pad_left(values, width)])
        row = torch.zeros(1, width, dtype=torch.bool, device=device)
        row[:, width - length:] = True
        self.mask = torch.cat([pad_left(self.mask, width), row])
        self.positions = torch.cat([self.positions, device_longs([length], device)])
        self.tokens = torch.cat([self.tokens, device_longs([token], device)])

    def leave(self, keep: Sequence[int]) -> None:
        """Keeps only the rows `keep` (in that order), and drops the columns none of them needs."""
        if not keep:
            self.cache = self.mask = self.positions = self.tokens = None
            return
        index = device_longs(keep, self.mask.device)
        mask = self.mask[index]
        first = int(mask.any(0).nonzero()[0])  # columns before it are padding in every remaining row
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]
        self.mask = mask[:, first:]
        self.positions = self.positions[index]
        self.tokens = self.tokens[index]

    def row_cache(self, row: int, length: int) -> tuple:
        """The first `length` positions of one row's keys and values, without its padding (to keep for a later turn
        of its chat)."""
        columns = self.mask[row].nonzero()[:length, 0]
        return tuple((layer.keys[row:row + 1, :, columns].clone(), layer.values[row:row + 1, :, columns].clone())
                     for layer in self.cache.layers)

    def step(self, model) -> torch.Tensor:
        """One decode step from each row's next token; each row's next-token logits ([rows, vocab])."""
        rows = len(self)
        self.mask = torch.cat([self.mask, torch.ones(rows, 1, dtype=torch.bool, device=self.mask.device)], dim=1)
        out = model(input_ids=self.tokens[:, None], attention_mask=self.mask.long(),
                    position_ids=self.positions[:, None], cache=self.cache, use_cache=True)
        self.positions = self.positions + 1
        return out.logits[:, -1]

    def close(self) -> None:
        self.leave([])

    def held_bytes(self) -> int:
        """Device memory the rows keep between chats: none (the cache goes with the last row)."""
        return 0


def pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """`tensor` with zeros (False) before its columns (dim 2 for keys and values, dim 1 for a mask) up to `width`."""
    dim = 2 if tensor.dim() == 4 else 1
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
