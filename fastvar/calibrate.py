"""Calibrating a KV budget for any model (the official ScaleKV code ships budgets, not what made them).

On a few inputs, the model runs unpatched while each block's attention at each scale is measured: the share
that the scale's window queries (the same bias-free queries the budget's cut scores keys by) put on keys of
earlier scales. Following ScaleKV's criterion, blocks whose attention spreads across scales are the scale's
"drafters" and keep their whole cache; the "refiners", which attend to their own scale, share what is left of
the target fraction of the full cache. The drafters of a scale are the blocks above the largest gap among the
blocks' shares (as many as the budget affords). The budget is written in the official format
(``KVBudget.to_file``), so that the official loader reads it too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

import fastvar
from fastvar.adapters import find_adapter
from fastvar.config import FastVARConfig
from fastvar.kv_budget import KVBudget, window_positions, window_queries
from fastvar.pipelines.base import Pipeline


def attention_spread(pipe: Pipeline, inputs: Sequence[Any], seeds: Sequence[int] = (0,),
                     window: int = 16, **options: Any) -> tuple[torch.Tensor, list[int]]:
    """(scales, blocks): the share of each block's window-query attention at each scale that falls on keys
    of earlier scales, averaged over the calls (one per seed, all ``inputs`` together; ``options`` go to each
    call), and each scale's token count. NaN where nothing is measured: text stages, the first and the last
    scale (whose keys are not stored)."""
    model = pipe.transformer
    adapter = find_adapter(model)
    attentions = [adapter.attention(block) for block in adapter.blocks(model)]
    sums: dict[tuple[int, int], list[float]] = {}

    def measure(layer: int, attention: torch.nn.Module, x: torch.Tensor) -> None:
        state, cache = model._fastvar, attention.kv_cache
        si = state.scale
        if si is None or si < max(1, state.schedule.text_scales) or cache is None or cache.finished:
            return
        keys, _ = cache.keys_and_values(x.shape[0])
        h, w = state.schedule.shapes[si]
        local = torch.tensor(window_positions(h, w, window), device=x.device)
        weight = getattr(attention, adapter.query_projection).weight
        queries = window_queries(x.float(), local, weight.float(), keys.shape[1])
        attention_weights = (queries @ keys.float().transpose(2, 3) / math.sqrt(keys.shape[3])).softmax(dim=-1)
        earlier = attention_weights[..., : keys.shape[2] - x.shape[1]].sum(dim=-1).mean().item()
        sums.setdefault((si, layer), []).append(earlier)

    hooks = [attention.register_forward_hook(lambda m, args, out, layer=layer: measure(layer, m, args[0]))
             for layer, attention in enumerate(attentions)]
    try:
        for seed in seeds:
            pipe(**{pipe.batch_argument: list(inputs)}, seed=seed, preset=FastVARConfig(), progress=False, **options)
        shapes = model._fastvar.schedule.shapes
    finally:
        for hook in hooks:
            hook.remove()
        fastvar.unpatch(model)
    spread = torch.full((len(shapes), len(attentions)), math.nan)
    for (si, layer), shares in sums.items():
        spread[si, layer] = sum(shares) / len(shares)
    return spread, [h * w for h, w in shapes]


def budget_from_spread(spread: torch.Tensor, tokens: Sequence[int], fraction: float, window: int = 16,
                       name: str | None = None) -> KVBudget:
    """A budget keeping ``fraction`` of the full cache of the last cut scale (all blocks), the same total at
    every budgeted scale: from the first scale whose caches pass that share per block, the scale's drafters
    (``spread`` above the largest gap, as many as fit) keep their whole cache, the refiners an equal share of
    the rest. ``tokens``: each scale's token count."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction = {fraction!r}: the share of the KV cache to keep, in (0, 1)")
    K, depth = spread.shape
    full = [sum(tokens[: si + 1]) for si in range(K)]
    total = fraction * full[K - 2] * depth  # the official total: 10% of the cache before the last scale
    threshold = int(total / depth)
    if threshold < window:
        raise ValueError(f"fraction {fraction} keeps {threshold} tokens per block, fewer than the window of {window}")
    capacities = {}
    for si in range(K - 1):
        if full[si] <= threshold:
            continue
        if spread[si].isnan().any():
            raise ValueError(f"no attention measured at scale {si}, which the budget must cover")
        order = spread[si].argsort(descending=True).tolist()
        gaps = [spread[si, a] - spread[si, b] for a, b in zip(order, order[1:])]
        drafters = order[: 1 + max(range(len(gaps)), key=gaps.__getitem__)] if gaps else []
        while drafters and (total - len(drafters) * full[si]) / (depth - len(drafters)) < window:
            drafters.pop()  # the weakest drafter of those the budget cannot afford
        refiners = min(full[si], int((total - len(drafters) * full[si]) / (depth - len(drafters))))
        capacities[si - K] = tuple(full[si] if b in drafters else refiners for b in range(depth))
    capacities[-1] = capacities[-2]  # the last scale is not cut; the official format reads it so
    return KVBudget(capacities, window=window, threshold=threshold, name=name)


def calibrate(pipe: Pipeline, inputs: Sequence[Any], fraction: float = 0.1, seeds: Sequence[int] = (0,),
              window: int = 16, **options: Any) -> KVBudget:
    """A KV budget for ``pipe``'s model keeping ``fraction`` of the cache, measured on ``inputs`` (prompts or
    class ids) with ``seeds`` and the call ``options`` (their schedule: size, aspect ratio ...)."""
    spread, tokens = attention_spread(pipe, inputs, seeds, window, **options)
    return budget_from_spread(spread, tokens, fraction, window, name=f"calibrated-{fraction:g}")
