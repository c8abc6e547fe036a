"""Token sampling shared by the model families: the official top-k / top-p sampler and its generator."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn


def sample_with_top_k_top_p_(
    logits_BlV: torch.Tensor, top_k: int, top_p: float, rng: torch.Generator | None
) -> torch.Tensor:
    """Mask ``logits_BlV`` (B, l, V) in place to its top-k / top-p set and draw one index per row: (B, l).

    The draw is ``torch.multinomial`` on the softmax, so it consumes the generator exactly as upstream.
    """
    B, l, V = logits_BlV.shape
    if 0 < top_k < V:  # a k of V or more removes nothing
        kth_largest = logits_BlV.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth_largest, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False  # the most likely entry always survives
        logits_BlV.masked_fill_(remove.scatter(-1, sorted_idx, remove), -torch.inf)
    probs = logits_BlV.softmax(dim=-1).view(-1, V)
    drawn = torch.multinomial(probs, num_samples=1, replacement=True, generator=rng).view(B, l)
    record_draws(drawn)
    return drawn


_recorders: list[list[torch.Tensor]] = []


def record_draws(drawn: torch.Tensor) -> None:
    """Hand a scale's draws to every ``recording_draws`` block that is open."""
    for draws in _recorders:
        draws.append(drawn.clone())


@contextlib.contextmanager
def recording_draws() -> Iterator[list[torch.Tensor]]:
    """Collect every token draw made inside the block, one (B, l) tensor per scale (Infinity draws l = tokens x
    bits; InfinityStar hands the final run's bits of each scale, (B, t, h, w, bits)), to compare runs token by
    token."""
    draws: list[torch.Tensor] = []
    _recorders.append(draws)
    try:
        yield draws
    finally:
        _recorders.remove(draws)


def generator_on(model: nn.Module, device: torch.device) -> torch.Generator:
    """The model's sampling generator (``model.rng``), recreated on ``device`` if the model moved."""
    if model.rng.device != device:
        model.rng = torch.Generator(device=device)
    return model.rng


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


SEEDS = (-2**63, 2**64)  # what torch's generators take (a negative seed s is s + 2**64)


def check_seed(seed: object, what: str = "seed") -> None:
    """Refuse a seed torch's generators would not take (None: unseeded, allowed)."""
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not SEEDS[0] <= seed < SEEDS[1]):
        raise ValueError(f"{what} = {seed!r}: must be an int from -2**63 to 2**64 - 1, what torch's generators take")


def check_sampling(B: int, top_k: int, top_p: float, cfg: float | Sequence[float] = (),
                   tau: float | Sequence[float] = ()) -> None:
    """Refuse, before any compute, sampling arguments outside their meaning.

    ``top_k = 0`` and ``top_p = 0`` mean no filtering (every entry of the vocabulary can be drawn).
    """
    if not isinstance(B, int) or isinstance(B, bool) or B < 1:
        raise ValueError(f"B = {B!r}: the batch size must be an int >= 1")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k = {top_k!r}: must be an int >= 0 (0 keeps every entry)")
    if not _is_number(top_p) or not 0 <= top_p <= 1:
        raise ValueError(f"top_p = {top_p!r}: must be a number in [0, 1] (0 keeps every entry)")
    for value in cfg if isinstance(cfg, list | tuple) else [cfg]:
        if not _is_number(value) or value < 0:
            raise ValueError(f"cfg = {value!r}: the guidance scale must be a number >= 0")
    for value in tau if isinstance(tau, list | tuple) else [tau]:
        if not _is_number(value) or value <= 0:
            raise ValueError(f"tau = {value!r}: the temperature must be a number > 0")
