"""The FastVAR tensor operations: score tokens, keep the pivotal ones, restore the full map.

Token maps are (B, L, C) with L = h * w (or t * h * w) tokens in raster order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kept_count(num_tokens: int, ratio: float) -> int:
    """Tokens kept when pruning ``ratio`` of ``num_tokens`` (the official rounding)."""
    return num_tokens - int(num_tokens * ratio)


def token_scores(x: torch.Tensor) -> torch.Tensor:
    """High-frequency energy of each token: squared L2 distance to its map's spatial mean. (B, L)."""
    return (x - x.mean(dim=1, keepdim=True)).pow(2).sum(dim=-1)


def select_pivotal(x: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Indices (B, num_keep) of each row's highest-scoring tokens, best first."""
    return token_scores(x).topk(num_keep, dim=1, sorted=True).indices


def select_random(x: torch.Tensor, num_keep: int, generator: torch.Generator) -> torch.Tensor:
    """Indices (B, num_keep) of tokens drawn uniformly without replacement, per row: the ablation of
    ``select_pivotal``."""
    B, L, _ = x.shape
    return torch.rand(B, L, generator=generator, device=generator.device).topk(num_keep, dim=1).indices.to(x.device)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The tokens ``idx`` (B, k) of ``x`` (B, L, C): (B, k, C)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def restore(
    cached: torch.Tensor, cached_shape: tuple[int, ...], fresh: torch.Tensor, idx: torch.Tensor,
    shape: tuple[int, ...],
) -> torch.Tensor:
    """The full (B, L, C) branch output of a map of ``shape`` ((h, w) or (t, h, w), L tokens in raster order):
    the cached map area-resized to ``shape``, with the freshly computed tokens ``fresh`` (B, k, C) written at
    their positions ``idx`` (B, k)."""
    B, _, C = cached.shape
    if tuple(cached_shape) != tuple(shape):
        grid = cached.reshape(B, *cached_shape, C).movedim(-1, 1)
        cached = F.interpolate(grid, size=shape, mode="area").movedim(1, -1).reshape(B, math.prod(shape), C)
    return cached.scatter(1, idx.unsqueeze(-1).expand(-1, -1, C), fresh)


def restore_zeros(fresh: torch.Tensor, idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The full (B, num_tokens, C) branch output with zeros in the pruned slots: the ablation of ``restore``."""
    B, _, C = fresh.shape
    return fresh.new_zeros(B, num_tokens, C).scatter(1, idx.unsqueeze(-1).expand(-1, -1, C), fresh)
