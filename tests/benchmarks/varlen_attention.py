"""Attention restricted to each packed example (varlen), an experiment kept beside the packing benchmark.

Measured on this CPU (bench_packing.py, `varlen` mode) it gains nothing over sdpa with transformers' block-diagonal
mask: attention is a small share of the step and torch's CPU SDPA backward costs about the same per token at any
sequence length, so the farm's runner does not use it. It is meant for GPU runs without flash-attn, where a masked
row takes SDPA's full rows x length² path; not measured there yet (no device was lent). tests/test_training_data.py
checks it is exact, so a GPU measurement can decide whether the runner should adopt it.
"""

from __future__ import annotations

VARLEN_ATTENTION = "farm_varlen_sdpa"
"""Name under which `varlen_attention` is registered in transformers' AttentionInterface."""

_plan_cache: tuple = (None, None)  # (position_ids tensor, its plan): one plan per forward, shared by every layer


def segment_plan(position_ids, rows: int, group_ratio: float = 0.75):
    """Where each packed example sits, grouped for attention: ([(count, length, gather index)], scatter index).

    An example starts at every row start and wherever the position does not follow the previous one (the rule
    transformers uses). Examples are sorted by length and grouped while each is at least `group_ratio` times the
    longest of its group; a group is gathered into [count, length], each example padded at its end, which causal
    attention never lets one of its real tokens see. Cached for the last `position_ids` tensor seen (the same
    object reaches every layer of one forward), so a forward builds one plan; reading the positions is a host
    sync on a GPU, once per forward.
    """
    global _plan_cache
    if _plan_cache[0] is not position_ids:
        _plan_cache = (position_ids, _build_plan(position_ids, rows, group_ratio))
    return _plan_cache[1]


def _build_plan(position_ids, rows: int, group_ratio: float):
    import torch

    positions = position_ids.expand(rows, -1).tolist()
    length = len(positions[0])
    segments = []  # (flat start, length), flat = row * length + column
    for r, pos in enumerate(positions):
        start = 0
        for t in range(1, length + 1):
            if t == length or pos[t] != pos[t - 1] + 1:
                segments.append((r * length + start, t - start))
                start = t
    segments.sort(key=lambda s: -s[1])  # stable: equal lengths keep row order
    groups: list[list[tuple[int, int]]] = []
    for seg in segments:
        if groups and seg[1] >= group_ratio * groups[-1][0][1]:
            groups[-1].append(seg)
        else:
            groups.append([seg])
    plan, scatter, offset = [], [0] * (rows * length), 0
    for group in groups:
        longest = group[0][1]
        gather = []
        for j, (start, n) in enumerate(group):
            gather += [*range(start, start + n), *([start] * (longest - n))]
            scatter[start:start + n] = range(offset + j * longest, offset + j * longest + n)
        plan.append((len(group), longest, torch.tensor(gather, device=position_ids.device)))
        offset += len(group) * longest
    return plan, torch.tensor(scatter, device=position_ids.device)


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     position_ids=None, **kwargs):
    """Causal attention within each packed example only (a transformers AttentionInterface function).

    query/key/value are [rows, heads, length, head_dim]; returns ([rows, length, heads, head_dim], None) as
    transformers' sdpa does. Instead of full rows under a block-diagonal mask (cost ~ rows x length²), each group
    of similar-length examples (`segment_plan`) runs one causal SDPA (cost ~ the sum of example lengths²).
    transformers builds no mask for an implementation without a mask function, so none is built per step
    either (a right-padded batch's 2D mask is dropped too, and stays exact for real tokens: causal attention never
    lets one see the pads after it); without position_ids, or for one query token, this is plain sdpa.
    """
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if position_ids is None or attention_mask is not None or query.shape[2] == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows, heads, length, dim = query.shape
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    plan, scatter = segment_plan(position_ids, rows)
    flat = [t.transpose(1, 2).reshape(rows * length, heads, dim) for t in (query, key, value)]
    outs = []
    for count, longest, gather in plan:
        q, k, v = (t.index_select(0, gather).view(count, longest, heads, dim).transpose(1, 2) for t in flat)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
        outs.append(out.transpose(1, 2).reshape(count * longest, heads, dim))
    out = (outs[0] if len(outs) == 1 else torch.cat(outs)).index_select(0, scatter)
    return out.view(rows, length, heads, dim), None


def use_varlen_attention(model) -> bool:
    """Register `varlen_attention` and switch the model's attention to it when it is sdpa (True then)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    if config._attn_implementation != "sdpa":
        return False
    config._attn_implementation = VARLEN_ATTENTION
    return True
