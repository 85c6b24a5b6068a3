"""Attention for one query token per row (a decode step), split over the key/value cache (flash-decoding).

At batch 1 an 8B model's decode attention reads 2 MB of keys and values a layer from its static
cache, half a microsecond of an H200's bandwidth, yet cuDNN's flash kernel (what sdpa picks inside the
graph) took 9-13 µs a layer (benchmarks/RESULTS.md): one program per head walks all 512 positions.
Here the cache is split into parts of 64 positions (more where the cache is longer than 64 · 64), one
program per (row, key/value head, part) computes all the query heads that share that key/value head
(grouped-query attention: no repeated key/value heads) with an online softmax, and a second launch
combines the parts per head. The mask
is transformers' own (boolean, or additive floats), so padding of a batched step, the static cache's
unused positions and sliding windows all apply as in sdpa.

`attention` is registered as the attention implementation NAME (with sdpa's masks) and serves a
step of one query token per row, with a mask shared by the heads, no soft-capping or position bias,
and a power-of-two head size of at most 256; anything else (prefill included) goes to transformers'
own sdpa. The fast path selects NAME on a GPU with its kernels; `reverse` restores the model's own
implementation. `reference` is the same math in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from core.kernels import interpreted

NAME = "sdpa_split_kv"
CHUNK = 64  # cache positions per block
MAX_PARTS = 64  # programs per (row, key/value head) at most: a longer cache gives each program more blocks
GROUP_ROWS = 16  # query heads per key/value head, padded to tl.dot's smallest tile


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, acc_ptr, stat_ptr, L, scale,
                  stride_qb, stride_qh, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
                  stride_mb, GROUPS: tl.constexpr, HEADS_KV: tl.constexpr, D: tl.constexpr,
                  CHUNK: tl.constexpr, BLOCKS: tl.constexpr, ROWS: tl.constexpr, MASK: tl.constexpr,
                  FP32_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """Program (row·HEADS_KV + kv head, part): the unnormalized output of the GROUPS query heads over the
    part's BLOCKS·CHUNK positions (an online softmax over its blocks), with their max and sum
    (acc [.., ROWS, D], stat [.., 2, ROWS])."""
    pair, part = tl.program_id(0), tl.program_id(1)
    b, h = pair // HEADS_KV, pair % HEADS_KV
    g = tl.arange(0, ROWS)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qb + (h * GROUPS + g)[:, None] * stride_qh + d[None, :],
                mask=(g < GROUPS)[:, None], other=0.0)
    if FP32_DOT:  # Triton's CPU interpreter multiplies 16-bit operands of tl.dot as integers
        q = q.to(tl.float32)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    total = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    for block in range(BLOCKS):
        pos = (part * BLOCKS + block) * CHUNK + tl.arange(0, CHUNK)
        inside = pos < L
        k = tl.load(k_ptr + b * stride_kb + h * stride_kh + pos[:, None] * stride_kl + d[None, :],
                    mask=inside[:, None], other=0.0)
        v = tl.load(v_ptr + b * stride_vb + h * stride_vh + pos[:, None] * stride_vl + d[None, :],
                    mask=inside[:, None], other=0.0)
        if FP32_DOT:
            s = tl.dot(q, tl.trans(k.to(tl.float32)))
        else:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = s * scale
        if MASK == 1:  # boolean: True attends
            keep = tl.load(mask_ptr + b * stride_mb + pos, mask=inside, other=0) != 0
            s = tl.where(keep[None, :], s, float("-inf"))
        elif MASK == 2:  # additive floats
            s = s + tl.load(mask_ptr + b * stride_mb + pos, mask=inside, other=float("-inf")).to(tl.float32)[None, :]
        s = tl.where(inside[None, :], s, float("-inf"))
        new = tl.maximum(m, tl.max(s, axis=1))
        safe = tl.where(new == float("-inf"), 0.0, new)  # nothing to attend yet: everything stays 0
        p = tl.exp(s - safe[:, None])
        keep_old = tl.exp(m - safe)
        total = total * keep_old + tl.sum(p, axis=1)
        if FP32_DOT:
            acc = acc * keep_old[:, None] + tl.dot(p, v.to(tl.float32))
        else:
            acc = acc * keep_old[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = new
    base = pair * tl.num_programs(1) + part
    tl.store(acc_ptr + (base * ROWS + g)[:, None] * D + d[None, :], acc)
    tl.store(stat_ptr + base * 2 * ROWS + g, m)
    tl.store(stat_ptr + base * 2 * ROWS + ROWS + g, total)


@triton.jit
def _combine_kernel(acc_ptr, stat_ptr, out_ptr, CHUNKS, GROUPS: tl.constexpr, D: tl.constexpr,
                    ROWS: tl.constexpr, CHUNKS_POW2: tl.constexpr):
    """Program (row·HEADS + head): its chunks' outputs weighed by exp(max - overall max), over their sums."""
    head = tl.program_id(0)
    pair, g = head // GROUPS, head % GROUPS
    c = tl.arange(0, CHUNKS_POW2)
    live = c < CHUNKS
    base = pair * CHUNKS + c
    m = tl.load(stat_ptr + base * 2 * ROWS + g, mask=live, other=float("-inf"))
    total = tl.load(stat_ptr + base * 2 * ROWS + ROWS + g, mask=live, other=0.0)
    top = tl.max(m, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.where(live & (m != float("-inf")), tl.exp(m - top), 0.0)
    d = tl.arange(0, D)
    acc = tl.load(acc_ptr + ((base * ROWS + g) * D)[:, None] + d[None, :], mask=live[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(total * weight, axis=0)
    tl.store(out_ptr + head * D + d, out.to(out_ptr.dtype.element_ty))


@torch.library.custom_op("llm_app::split_kv_attention", mutates_args=())
def split_kv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
             scale: float) -> torch.Tensor:
    """query [B, H, 1, D], key/value [B, H_kv, L, D] (unit stride along D), mask [B, 1, 1, >= L] or None
    → [B, 1, H, D] (transformers' layout after attention)."""
    batch, heads, _, dim = query.shape
    heads_kv, length = key.shape[1], key.shape[2]
    groups = heads // heads_kv
    blocks = triton.cdiv(triton.cdiv(length, CHUNK), MAX_PARTS)  # of CHUNK positions per program
    chunks = triton.cdiv(length, CHUNK * blocks)
    acc = torch.empty((batch * heads_kv * chunks, GROUP_ROWS, dim), device=query.device, dtype=torch.float32)
    stat = torch.empty((batch * heads_kv * chunks, 2, GROUP_ROWS), device=query.device, dtype=torch.float32)
    kind = 0 if mask is None else 1 if mask.dtype == torch.bool else 2
    flat = mask.reshape(batch, -1) if mask is not None else query  # stand-in, never read
    fp32 = interpreted(_split_kernel)
    _split_kernel[(batch * heads_kv, chunks)](
        query, key, value, flat, acc, stat, length, scale, query.stride(0), query.stride(1), key.stride(0),
        key.stride(1), key.stride(2), value.stride(0), value.stride(1), value.stride(2),
        flat.stride(0) if mask is not None else 0, GROUPS=groups, HEADS_KV=heads_kv, D=dim, CHUNK=CHUNK,
        BLOCKS=blocks, ROWS=GROUP_ROWS, MASK=kind, FP32_DOT=fp32,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32", num_warps=4)
    out = torch.empty((batch, 1, heads, dim), device=query.device, dtype=query.dtype)
    _combine_kernel[(batch * heads,)](acc, stat, out, chunks, GROUPS=groups, D=dim, ROWS=GROUP_ROWS,
                                      CHUNKS_POW2=triton.next_power_of_2(chunks), num_warps=4)
    return out


@split_kv.register_fake
def _(query, key, value, mask, scale):
    batch, heads, _, dim = query.shape
    return query.new_empty((batch, 1, heads, dim))


def served(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
           kwargs: dict) -> bool:
    """Whether `split_kv` computes this call: one query token per row, a mask shared by the heads, nothing
    sdpa would add (position bias, soft-capping, attention weights), a power-of-two head size up to 256."""
    dim = query.shape[-1]
    return (query.shape[2] == 1 and query.dtype == key.dtype == value.dtype
            and key.shape[-1] == value.shape[-1] == dim and dim in (16, 32, 64, 128, 256)
            and query.shape[1] % key.shape[1] == 0 and query.shape[1] // key.shape[1] <= GROUP_ROWS
            and (mask is None or (mask.dim() == 4 and mask.shape[0] == query.shape[0] and mask.shape[1] == 1
                                  and mask.shape[2] == 1 and mask.shape[-1] >= key.shape[2]))
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and not kwargs.get("output_attentions", False) and query.stride(-1) == 1 and key.stride(-1) == 1
            and value.stride(-1) == 1)


def attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: split_kv for a decode step, sdpa for everything else."""
    if dropout == 0.0 and served(query, key, value, attention_mask, kwargs):
        mask = attention_mask[..., :key.shape[2]] if attention_mask is not None else None
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return split_kv(query, key, value, mask, scale), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """The same in PyTorch (fp32): [B, 1, H, D]."""
    groups = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(groups, dim=1)
    v = value.float().repeat_interleave(groups, dim=1)
    s = query.float() @ k.transpose(-1, -2) * scale
    if mask is not None:
        mask = mask[..., :key.shape[2]]
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    return (torch.softmax(s, dim=-1) @ v).transpose(1, 2).to(query.dtype)


def register() -> str:
    """Makes NAME an attention implementation transformers accepts (with sdpa's masks); returns NAME."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
