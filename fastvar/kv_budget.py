"""KV budgets (ScaleKV, arXiv 2505.19602): after a block's self-attention at a scale, its KV cache is cut to a
budget, keeping a window of the current scale's tokens and the cached positions those window queries attend to
most. Blocks whose attention spreads over earlier scales ("drafters") get large budgets, the others
("refiners") small ones.

A budget gives, per scale position (negative: from the last) and block, the tokens the block's cache keeps
after that scale. Caches are left alone while they hold at most ``threshold`` tokens; once a block's cache has
passed it (the official ``max_capacity``), it is cut at every later scale to that scale's budget. The window is
a grid of ``window`` tokens of the current (h, w) map, one at the centre-left of each cell; the others are
scored by the bias-free query projection of the window tokens against the cached keys, summed over the window
queries, max-pooled along the cache (``kernel_size``), and the best kept, per CFG row and head, in cache order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from fastvar.config import Schedule

POOLINGS = ("max", "avg")
# Packaged official budgets (fastvar/budgets, README there): the file for each model depth.
PACKAGED = {"scalekv-10": {32: "scalekv_2b_10.json", 40: "scalekv_8b_10.json"}}
# The official format: "Scale k" for k in 9..13 of the 13-scale (1M) schedule is read at scale index k - 2
# (ScaleKV's loader and look-up), i.e. position k - 15 from the end; "Scale 13" also serves the last scale.
OFFICIAL_SCALES = 13
OFFICIAL_OFFSET = 2
SETTINGS_KEY = "fastvar"  # the other fields, in files fastvar writes (ScaleKV's loader reads only "Scale k")


@dataclass(frozen=True)
class KVBudget:
    """Tokens each block's KV cache keeps after a scale: ``capacities`` maps a scale position to one count per
    block. The other fields are ScaleKV's settings, the official values as defaults."""

    capacities: Mapping[int, tuple[int, ...]]
    window: int = 16
    threshold: int = 650
    kernel_size: int = 5
    pooling: str = "max"
    name: str | None = field(default=None, compare=False)

    def __post_init__(self):
        if not isinstance(self.capacities, Mapping) or not self.capacities:
            raise ValueError("capacities must be a non-empty mapping {scale position: tokens kept per block}")
        capacities = {}
        for position, counts in self.capacities.items():
            if not isinstance(position, int) or isinstance(position, bool):
                raise ValueError(f"capacities: {position!r} is not a scale position (an int, negative from the last)")
            counts = tuple(counts) if isinstance(counts, Sequence) and not isinstance(counts, str) else None
            if not counts or not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
                raise ValueError(f"capacities[{position}] must be a list of token counts, one per block")
            low = [c for c in counts if c < self.window]
            if low:
                raise ValueError(f"capacities[{position}]: block {counts.index(low[0])} keeps {low[0]} tokens, fewer "
                                 f"than the window of {self.window} that every cut keeps")
            capacities[position] = counts
        object.__setattr__(self, "capacities", capacities)
        side = math.isqrt(self.window) if isinstance(self.window, int) and self.window > 0 else 0
        if side * side != self.window:
            raise ValueError(f"window = {self.window!r}: must be a square number of tokens (16: a 4x4 grid)")
        for what, value in (("threshold", self.threshold), ("kernel_size", self.kernel_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{what} = {value!r}: must be an int >= 1")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size = {self.kernel_size}: must be odd (the pooling keeps the cache's length)")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling = {self.pooling!r}: accepted are {list(POOLINGS)}")

    @classmethod
    def from_file(cls, path: str | Path, blocks: int | None = None, **settings) -> KVBudget:
        """A budget file in the official format: ``{"Scale k": {"Block b": 1 (a drafter: "Max" tokens) or 0
        ("Min" tokens), "Max": ..., "Min": ...}}`` for scales k of the 13-scale schedule, read as ScaleKV
        reads it (see ``OFFICIAL_OFFSET``). ``blocks``: how many blocks to read (default: all the file has);
        ``settings``: the other fields."""
        path = Path(path)
        try:
            scales = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"KV budget file {path}: cannot read it as JSON ({err})") from None
        if not isinstance(scales, dict) or not scales:
            raise ValueError(f"KV budget file {path}: expected {{'Scale k': {{'Block b': 0 or 1, 'Max': ..., "
                             "'Min': ...}}}}")
        capacities = {}
        settings = {**scales.pop(SETTINGS_KEY, {}), **settings}  # what to_file adds, which ScaleKV does not read
        for key, entry in scales.items():
            k = int(key.removeprefix("Scale ")) if key.startswith("Scale ") and key[6:].isdigit() else None
            if k is None or not OFFICIAL_OFFSET <= k <= OFFICIAL_SCALES or not isinstance(entry, dict):
                raise ValueError(f"KV budget file {path}: {key!r} is not a scale of the official format "
                                 f"('Scale {OFFICIAL_OFFSET}' ... 'Scale {OFFICIAL_SCALES}')")
            count = blocks if blocks is not None else sum(1 for name in entry if name.startswith("Block "))
            missing = [b for b in range(count) if entry.get(f"Block {b}") not in (0, 1)]
            if missing or not {"Max", "Min"} <= set(entry):
                what = f"'Block {missing[0]}' (0 or 1)" if missing else "'Max' and 'Min'"
                raise ValueError(f"KV budget file {path}: {key} lacks {what} for {count} blocks")
            counts = tuple(entry["Max"] if entry[f"Block {b}"] == 1 else entry["Min"] for b in range(count))
            position = k - OFFICIAL_OFFSET - OFFICIAL_SCALES
            capacities[position] = counts
            if k == OFFICIAL_SCALES:  # the official look-up clamps the last scale to this one
                capacities[-1] = counts
        return cls(capacities, name=settings.pop("name", path.stem), **settings)

    def to_file(self, path: str | Path) -> None:
        """Write the budget in the official format, which ScaleKV's loader reads too: per scale position from
        -13 to -2 ("Scale k", k = position + 15), its largest count for the blocks that keep it ("Block b": 1,
        "Max") and its other count for the rest ("Min"); the last scale is read as -2's (ScaleKV's look-up).
        The other fields go under "fastvar", which ``from_file`` reads back."""
        scales = {}
        for position, counts in sorted(self.capacities.items()):
            if position == -1:
                continue
            k = position + OFFICIAL_OFFSET + OFFICIAL_SCALES
            values = sorted(set(counts))
            if not OFFICIAL_OFFSET <= k <= OFFICIAL_SCALES or len(values) > 2:
                raise ValueError(f"scale position {position} cannot be written in the official format, which has "
                                 "positions -13..-2 with at most two counts each (drafters' and refiners')")
            high, low = values[-1], values[0]
            drafters = [int(c == high and high != low) for c in counts]
            scales[f"Scale {k}"] = {**{f"Block {b}": d for b, d in enumerate(drafters)}, "High": sum(drafters),
                                    "Max": high, "Min": low, "Limit": high}
        settings = dict(window=self.window, threshold=self.threshold, kernel_size=self.kernel_size,
                        pooling=self.pooling)
        Path(path).write_text(json.dumps({**scales, SETTINGS_KEY: settings}, indent=2))

    @classmethod
    def packaged(cls, name: str, depth: int) -> KVBudget:
        """A budget shipped with fastvar (``PACKAGED``), in the file made for a model of ``depth`` blocks."""
        files = PACKAGED[name]
        if depth not in files:
            raise ValueError(f"the {name} budgets are made for {sorted(files)} blocks (Infinity-2B, -8B); this model "
                             f"has {depth}: load a file of its own with KVBudget.from_file, or calibrate one")
        with resources.as_file(resources.files("fastvar") / "budgets" / files[depth]) as path:
            return cls.from_file(path, name=name)

    def plan(self, schedule: Schedule, check: bool = True) -> KVPlan:
        """The budget on a resolved schedule: each block's capacity at each scale (``ValueError`` naming the
        expected shape for a budget that does not fit), with ``check`` verified as the cut will run (that no
        cache passes the threshold at a scale the budget leaves out)."""
        K, depth = len(schedule.tokens), schedule.depth
        capacity: list[tuple[int, ...] | None] = [None] * K
        for position, counts in sorted(self.capacities.items()):
            if not -K <= position < K:
                raise ValueError(f"KV budget {self.name or ''}: scale position {position} does not exist; this "
                                 f"schedule has {K} scales (positions 0..{K - 1} or -{K}..-1)")
            if position % K < schedule.text_scales:
                raise ValueError(f"KV budget {self.name or ''}: scale position {position} is the text stage, not a "
                                 f"token map to window; budget scales {schedule.text_scales}..{K - 1}")
            if len(counts) != depth:
                raise ValueError(f"KV budget {self.name or ''}: scale position {position} has {len(counts)} block "
                                 f"capacities; the model has {depth} blocks")
            capacity[position % K] = counts
        plan = KVPlan(self, tuple(capacity))
        for layer in range(depth if check else 0):
            plan.lengths(schedule, layer)  # raises where a cache passes the threshold at an unbudgeted scale
        return plan


@dataclass(frozen=True)
class KVPlan:
    """A budget resolved on one schedule: ``capacity[si][layer]``, None where a scale has no budget."""

    budget: KVBudget
    capacity: tuple[tuple[int, ...] | None, ...]

    def cuts(self, si: int, layer: int, length: int, passed: bool) -> int | None:
        """The length block ``layer``'s cache is cut to after scale ``si``, where it holds ``length`` tokens and
        ``passed`` says whether it passed the threshold before; None when it is left as it is."""
        if length <= self.budget.threshold and not passed:
            return None
        counts = self.capacity[si]
        if counts is None:
            raise ValueError(f"KV budget {self.budget.name or ''}: block {layer}'s cache holds {length} tokens at "
                             f"scale {si}, past the threshold of {self.budget.threshold}, and the budget has no "
                             f"capacities for that scale: budget it, or raise the threshold to at least {length}")
        return counts[layer] if length > counts[layer] else None

    def lengths(self, schedule: Schedule, layer: int) -> list[tuple[int, int]]:
        """Per executed scale of block ``layer``: (keys its queries attend to, tokens cached after it). The last
        executed scale is attended to, not stored nor cut: no later scale reads it."""
        out, length, passed = [], 0, False
        for si in range(schedule.executed - 1):
            length += schedule.tokens_run(si, layer)
            cut = self.cuts(si, layer, length, passed)
            passed = passed or length > self.budget.threshold
            out.append((length, length if cut is None else cut))
            length = out[-1][1]
        return [*out, (length + schedule.tokens_run(schedule.executed - 1, layer), length)]


# ----------------------------------------------------------------------------- the cut


def window_positions(h: int, w: int, window: int) -> list[int]:
    """The window of an (h, w) map, as raster positions: a sqrt(window) x sqrt(window) grid of cells, the
    centre(-left) token of each (ScaleKV's rule for square maps, applied per axis); the last ``window``
    tokens of a map smaller than the grid."""
    side = math.isqrt(window)
    if h < side or w < side:
        return list(range(max(0, h * w - window), h * w))
    rows = [i * (h // side) + (h // side - 1) // 2 for i in range(side)]
    cols = [j * (w // side) + (w // side - 1) // 2 for j in range(side)]
    return sorted({r * w + c for r in rows for c in cols})


def window_queries(x: torch.Tensor, local: torch.Tensor, projection: torch.Tensor, heads: int) -> torch.Tensor:
    """The scoring queries (rows, heads, n, D) of the tokens ``local`` of an attention input ``x`` (rows, L, C):
    the bias-free query projection, the first third of the attention's q, k, v ``projection`` weight (ScaleKV
    projects every token and keeps these rows; a row of a matmul does not depend on the others)."""
    rows, _, C = x.shape
    return F.linear(x[:, local], projection[:C]).view(rows, len(local), heads, C // heads).transpose(1, 2)


def kept_positions(keys: torch.Tensor, window_queries: torch.Tensor, window: torch.Tensor, capacity: int,
                   kernel_size: int, pooling: str) -> torch.Tensor:
    """Positions (rows, H, capacity) of the cached keys (rows, H, L, D) to keep, ascending: the ``window``
    positions (their queries ``window_queries`` (rows, H, n, D)) and the ``capacity - n`` others with the highest
    pooled score. The score of a key is the sum over the window queries of q.k / sqrt(D), no softmax; the
    window's own keys do not count (-inf) nor compete."""
    rows, heads, length, dim = keys.shape
    shape = (rows, heads, window.numel())
    window = window.view(1, 1, -1).expand(shape)
    keep = capacity - window.shape[2]
    if keep <= 0:
        return window
    weights = torch.matmul(window_queries, keys.transpose(2, 3)) / math.sqrt(dim)
    mask = torch.ones(rows, heads, 1, length, dtype=torch.bool, device=keys.device).scatter_(3, window[:, :, None],
                                                                                             False)
    scores = weights.masked_fill(~mask, float("-inf")).sum(dim=2)
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    pooled = pool(scores, kernel_size, padding=kernel_size // 2, stride=1)
    pooled = pooled.scatter(2, window, float("-inf"))
    best = pooled.topk(min(keep, length - window.shape[2]), dim=-1).indices
    return torch.cat((best, window), dim=-1).sort(dim=-1).values
