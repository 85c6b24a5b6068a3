"""One token through a decoder layer's GEMVs that share an input: q/k/v in one launch, gate/up + SiLU in one.

At batch 1 the small projections cost their launch and tail more than their bytes, and gate and up
only meet in silu(gate) · up. For Llama-style attention and MLP modules whose projections are all
kernel-served layers of one format (core.kernels.layers) and have no bias, the module's `forward` is
set on the instance to one that, for a single token, computes them with one grouped GEMV launch;
any other input goes to the class's own forward. The attention forward repeats transformers 5.24's
`LlamaAttention.forward` around the fused projection, so it is used only where the module's class
forward is exactly that one. Each group of equal shapes is measured once against the separate
layers (as installed) and fused only where faster.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from core.kernels import select
from core.kernels.layers import Layer


@dataclass(frozen=True)
class Fused:
    forwards: dict
    notes: tuple[str, ...]


def install(model, layers: dict[str, Layer], timer) -> Fused:
    from transformers.models.llama import modeling_llama as llama

    by_module = {layer.module: layer for layer in layers.values()}
    groups: dict[tuple, list] = defaultdict(list)
    for module in model.modules():
        if type(module).forward is llama.LlamaAttention.forward:
            members = [by_module.get(p) for p in (module.q_proj, module.k_proj, module.v_proj)]
            silu_pair = False
        elif type(module).forward is llama.LlamaMLP.forward and _is_silu(module.act_fn):
            members = [by_module.get(p) for p in (module.gate_proj, module.up_proj)]
            silu_pair = True
        else:
            continue
        if _fusable(members):
            groups[(silu_pair, *(m.key for m in members))].append((module, members))
    forwards, notes = {}, []
    for (silu_pair, *_), entries in groups.items():
        decision = _measure(entries, silu_pair, timer)
        notes.append(f"{len(entries)}x {decision.describe()}")
        if decision.ours:
            for module, members in entries:
                fused = members[0].grouped(members, silu_pair)
                forwards[module] = _mlp(module, fused) if silu_pair else _attention(module, fused)
    for module, forward in forwards.items():
        module.forward = forward
    return Fused(forwards, tuple(notes))


def _is_silu(act) -> bool:
    from transformers.activations import SiLUActivation

    return isinstance(act, (SiLUActivation, torch.nn.SiLU))


def _fusable(members: list[Layer | None]) -> bool:
    if any(m is None for m in members):
        return False
    first = members[0]
    return all(type(m) is type(first) and m.in_features == first.in_features and m.module.bias is None
               and m.compute_dtype == first.compute_dtype and first.groups_with(m) for m in members)


def _measure(entries: list, silu_pair: bool, timer) -> select.Decision:
    _, members = entries[0]
    first = members[0]
    x = torch.randn(1, first.in_features, device=first.device, dtype=first.compute_dtype)
    what = "gate/up + SiLU" if silu_pair else "q/k/v"
    label = f"{first.label} {what} {'+'.join(str(m.out_features) for m in members)}x{first.in_features} in one launch"
    key = ("fused", first.device_name, silu_pair, *(m.key for m in members), len(entries))
    ours = [lambda members=members: members[0].grouped(members, silu_pair)(x) for _, members in entries]
    if silu_pair:
        theirs = [lambda m=m: m.act_fn(m.gate_proj(x)) * m.up_proj(x) for m, _ in entries]
    else:
        theirs = [lambda m=m: (m.q_proj(x), m.k_proj(x), m.v_proj(x)) for m, _ in entries]
    return select.decide(key, label, ours, theirs, timer, "the separate layers'")


def _one_token(x: torch.Tensor) -> bool:
    return x.numel() == x.shape[-1]


def _mlp(mlp, gate_up) -> Callable:
    original = type(mlp).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not _one_token(x):
            return original(mlp, x)
        return mlp.down_proj(gate_up(x)[0])

    return forward


def _attention(attn, qkv) -> Callable:
    """transformers 5.24's LlamaAttention.forward with q/k/v from one launch for a single token."""
    from transformers.models.llama import modeling_llama as llama

    original = type(attn).forward

    def forward(hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        if not _one_token(hidden_states):
            return original(attn, hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, attn.head_dim)
        q, k, v = qkv(hidden_states)
        query = q.view(hidden_shape).transpose(1, 2)
        key = k.view(hidden_shape).transpose(1, 2)
        value = v.view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = llama.apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, attn.layer_idx, kwargs=kwargs)
        interface = llama.ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                               llama.eager_attention_forward)
        out, weights = interface(attn, query, key, value, attention_mask, dropout=0.0, scaling=attn.scaling,
                                 **kwargs)
        return attn.o_proj(out.reshape(*input_shape, -1).contiguous()), weights

    return forward
