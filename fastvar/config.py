"""What to prune and skip, and its resolution against one model's scale schedule.

Scales are named by position in the schedule (0 is the 1x1 map, -1 the last), never by width, so one
config serves every resolution and aspect ratio.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fastvar.kv_budget import PACKAGED, KVBudget, KVPlan
from fastvar.pruning import kept_count

SELECTIONS = ("pivotal", "random")
RESTORATIONS = ("cache", "zeros")
PruneRule = Mapping[int, float] | Callable[[int, int], float]
LayerRule = Iterable[int] | Callable[[int, int], bool] | None


@dataclass(frozen=True)
class FastVARConfig:
    """A FastVAR schedule.

    prune: scale position -> ratio of tokens pruned there, or ``fn(scale_index, num_scales) -> ratio``.
        A ratio of 0 runs every token; 1 keeps none (use ``skip_last`` to drop whole scales).
    skip_last: how many final scales are not run at all; the image is decoded from the others.
    cache_scale: position of the scale whose branch outputs fill pruned slots
        (default: the scale before the first pruned one).
    layers: block indices that prune (negative from the last), or ``fn(layer, depth) -> bool``;
        None means every block.
    guidance_off_from: scale position from which the unconditional (CFG) rows are not run: those scales
        sample from the conditional logits alone (guidance weight 0; Infinity's cfg-1 path), at half the
        batch. Changes the output; None (the default) keeps guidance at every scale.
    kv_budget: a KV budget (ScaleKV, ``fastvar.kv_budget``): after each scale a block's KV cache is cut to
        the budget's tokens. A ``KVBudget``, the name of a packaged one (``"scalekv-10"``: the official 10%
        budget of the model's depth), or the path of a file in the official format; None: no budget.
    repetitions: scale position -> at most this many runs of that scale, for models that run a scale
        several times (InfinityStar); fewer runs than the model's change the output. Empty: as the model.

    In a model whose schedule is made of clips (InfinityStar's video: an image clip, then video clips over
    the same list of (h, w)), ``prune``, ``cache_scale`` and ``repetitions`` name positions within a clip and
    apply to every clip; ``skip_last`` and ``guidance_off_from`` count over the whole call.

    Ablations, to see what each half of the method contributes on a model (the defaults are FastVAR's):
    selection: ``"pivotal"`` keeps the tokens farthest from the map's mean; ``"random"`` keeps tokens drawn
        uniformly, per batch row, from a generator seeded with ``selection_seed``, the scale, block and branch.
    restoration: ``"cache"`` fills pruned slots with the cache scale's outputs, resized; ``"zeros"`` leaves
        them at zero (the branch adds nothing there), and caches nothing.
    """

    prune: PruneRule = field(default_factory=dict)
    skip_last: int = 0
    cache_scale: int | None = None
    layers: LayerRule = None
    guidance_off_from: int | None = None
    kv_budget: KVBudget | str | Path | None = None
    selection: str = "pivotal"
    restoration: str = "cache"
    selection_seed: int = 0
    repetitions: Mapping[int, int] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.prune, Mapping):
            for position, ratio in self.prune.items():
                check_ratio(ratio, f"prune[{position}]")
        elif not callable(self.prune):
            raise TypeError(f"prune must be a mapping {{scale position: ratio}} or a callable, got {self.prune!r}")
        if not isinstance(self.skip_last, int) or isinstance(self.skip_last, bool) or self.skip_last < 0:
            raise ValueError(f"skip_last must be a non-negative int, got {self.skip_last!r}")
        if not (self.layers is None or callable(self.layers)):
            layers = self.layers
            if isinstance(layers, str | bytes) or not isinstance(layers, Iterable):
                raise ValueError(f"layers = {layers!r}: give block indices (e.g. range(3, 28) or [0, 2]), "
                                 "fn(layer, depth) -> bool, or None for every block")
            layers = tuple(layers)
            if not layers:
                raise ValueError(f"layers = {self.layers!r} names no block, so nothing would be pruned: give block "
                                 "indices (e.g. range(3, 28) or [0, 2]) or None for every block; to prune nothing, "
                                 "leave prune empty (the 'none' preset)")
            wrong = [i for i in layers if not isinstance(i, int) or isinstance(i, bool)]
            if wrong:
                raise ValueError(f"layers: {wrong[0]!r} is not a block index (an int; negative counts from the last)")
            object.__setattr__(self, "layers", layers)
        for name, value, accepted in (("selection", self.selection, SELECTIONS),
                                      ("restoration", self.restoration, RESTORATIONS)):
            if value not in accepted:
                raise ValueError(f"{name} = {value!r}: accepted are {list(accepted)}")
        if not isinstance(self.selection_seed, int) or isinstance(self.selection_seed, bool):
            raise ValueError(f"selection_seed must be an int, got {self.selection_seed!r}")
        if not isinstance(self.repetitions, Mapping) or any(
                not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in self.repetitions.values()):
            raise ValueError(f"repetitions = {self.repetitions!r}: give {{scale position: runs (an int >= 1)}}")
        budget = self.kv_budget
        if not (budget is None or isinstance(budget, KVBudget | Path) or budget in PACKAGED
                or (isinstance(budget, str) and Path(budget).is_file())):
            raise ValueError(f"kv_budget = {budget!r}: give a KVBudget, a packaged budget ({sorted(PACKAGED)}) or the "
                             "path of a budget file in the official format")

    def replace(self, **overrides) -> FastVARConfig:
        """A copy with some fields changed; unknown names raise ``TypeError`` listing the fields."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown FastVARConfig field(s) {unknown}; accepted: {sorted(names)}")
        return dataclasses.replace(self, **overrides)

    def resolve(self, shapes: Sequence[tuple[int, ...]], depth: int, text_scales: int = 0,
                per_call: bool = False, clip_scales: int | None = None,
                repetitions: Sequence[int] | None = None,
                references: Sequence[Sequence[int]] | None = None) -> Schedule:
        """The per-scale plan for a model with these scale shapes ((h, w), or (t, h, w) maps) and ``depth``
        blocks. The first ``text_scales`` scales hold text tokens (HART's scale 0), not token maps: they are
        never pruned nor cached. ``per_call``: the shapes are only the model's default, each call resolving
        its own (Infinity's): a KV budget is then not checked against the caches of these shapes.
        ``clip_scales``: scales per clip (default: one clip); ``repetitions``: the model's runs per scale
        (default: one each); ``references``: the earlier scales each scale attends to (default: all).

        Raises ``ValueError`` for scales or layers the model does not have and contradictory settings.
        """
        K = len(shapes)
        C = K if clip_scales is None else clip_scales
        if C < 1 or K % C:
            raise ValueError(f"clip_scales={clip_scales} does not divide the {K} scales into clips")
        tokens = tuple(math.prod(shape) for shape in shapes)
        if self.skip_last >= K:
            raise ValueError(f"skip_last={self.skip_last} leaves no scale to run; the model has {K} scales")
        executed = K - self.skip_last
        ratios = self._ratios(C) * (K // C)
        pruned = [si for si, r in enumerate(ratios) if r > 0]
        for si in pruned:
            if si >= executed:
                raise ValueError(f"scale {si} of {K} is both pruned and skipped (skip_last={self.skip_last}); "
                                 "prune earlier scales or skip fewer")
        if pruned and pruned[0] < text_scales:
            raise ValueError(f"scale {pruned[0]} holds the text tokens, not a token map: it cannot be pruned; "
                             f"prune scales {text_scales}..{K - 1}")
        keep = tuple(kept_count(n, r) if r > 0 else None for n, r in zip(tokens, ratios))
        layers = frozenset(self._layers(depth)) if pruned else frozenset()
        cache_scale = self._cache_scale(C, [si for si in pruned if si < C]) if self.restoration == "cache" else None
        if cache_scale is not None and cache_scale < text_scales:
            raise ValueError(f"the cache scale (index {cache_scale}) would be the text stage, whose tokens are not a "
                             f"token map to resize; cache a token map (cache_scale index {text_scales} or later)")
        guided = K
        if self.guidance_off_from is not None:
            guided = scale_index(self.guidance_off_from, K, "guidance_off_from")
            if guided >= executed:
                raise ValueError(f"guidance_off_from={self.guidance_off_from} (index {guided}) is a skipped scale "
                                 f"(skip_last={self.skip_last}); turn guidance off at an executed scale")
        model_runs = tuple(repetitions) if repetitions is not None else (1,) * K
        if len(model_runs) != K:
            raise ValueError(f"repetitions: {len(model_runs)} given for {K} scales")
        caps = [None] * C
        for position, n in self.repetitions.items():
            caps[scale_index(position, C, "repetitions")] = n
        runs = tuple(n if caps[si % C] is None else min(n, caps[si % C]) for si, n in enumerate(model_runs))
        schedule = Schedule(shapes=tuple(tuple(s) for s in shapes), keep=keep, executed=executed,
                            cache_scale=cache_scale, layers=layers, depth=depth, text_scales=text_scales,
                            guided=guided, clip_scales=C, repetitions=runs, model_repetitions=model_runs,
                            references=None if references is None else tuple(tuple(r) for r in references))
        if self.kv_budget is None:
            return schedule
        return dataclasses.replace(schedule, kv=self._kv_budget(depth).plan(schedule, check=not per_call))

    def _kv_budget(self, depth: int) -> KVBudget:
        if isinstance(self.kv_budget, KVBudget):
            return self.kv_budget
        if self.kv_budget in PACKAGED:
            return KVBudget.packaged(self.kv_budget, depth)
        return KVBudget.from_file(self.kv_budget)

    def _ratios(self, K: int) -> list[float]:
        if callable(self.prune):
            return [check_ratio(self.prune(si, K), f"prune({si}, {K})") for si in range(K)]
        ratios, named_by = [0.0] * K, {}
        for position, ratio in self.prune.items():
            si = scale_index(position, K, "prune")
            if si in named_by:
                raise ValueError(f"prune: positions {named_by[si]} and {position} both name scale {si} of {K}; "
                                 "give each scale once")
            ratios[si], named_by[si] = ratio, position
        return ratios

    def _layers(self, depth: int) -> list[int]:
        if self.layers is None:
            return list(range(depth))
        if callable(self.layers):
            return [i for i in range(depth) if self.layers(i, depth)]
        out = []
        for i in self.layers:
            if not -depth <= i < depth:
                raise ValueError(f"layer {i} does not exist: the model has {depth} blocks (0..{depth - 1})")
            out.append(i % depth)
        return out

    def _cache_scale(self, K: int, pruned: list[int]) -> int | None:
        if not pruned:
            return None
        if self.cache_scale is None:
            if pruned[0] == 0:
                raise ValueError("scale 0 is pruned, so no earlier scale can be cached; prune later scales")
            return pruned[0] - 1
        cache = scale_index(self.cache_scale, K, "cache_scale")
        if cache >= pruned[0]:
            raise ValueError(f"cache_scale {self.cache_scale} (index {cache}) must come before the first pruned "
                             f"scale (index {pruned[0]})")
        return cache


@dataclass(frozen=True)
class Schedule:
    """A config resolved against one scale schedule: what every scale and block does."""

    shapes: tuple[tuple[int, ...], ...]  # (h, w), or (t, h, w)
    keep: tuple[int | None, ...]  # tokens run in pruning layers at each scale; None: all of them
    executed: int  # the first `executed` scales run; the rest are skipped
    cache_scale: int | None  # the cache scale of the first clip (the same position in every clip)
    layers: frozenset[int]  # the blocks that prune
    depth: int
    text_scales: int = 0  # leading scales of text tokens rather than token maps
    guided: int | None = None  # scales before this one run both CFG halves, the rest the conditional rows only
    kv: KVPlan | None = None  # the KV budget on this schedule
    clip_scales: int | None = None  # scales per clip (None: one clip)
    repetitions: tuple[int, ...] | None = None  # runs per scale (None: one each)
    model_repetitions: tuple[int, ...] | None = None  # the runs of the unpatched model
    references: tuple[tuple[int, ...], ...] | None = None  # earlier scales each attends to (None: every one)

    def __post_init__(self):
        K = len(self.shapes)
        defaults = dict(guided=K, clip_scales=K, repetitions=(1,) * K)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.model_repetitions is None:
            object.__setattr__(self, "model_repetitions", self.repetitions)

    @property
    def tokens(self) -> tuple[int, ...]:
        return tuple(math.prod(shape) for shape in self.shapes)

    @property
    def is_identity(self) -> bool:
        """Whether the model runs exactly as unpatched."""
        return (self.executed == len(self.shapes) and not self.layers and self.guided == len(self.shapes)
                and self.repetitions == self.model_repetitions)

    def cache_of(self, si: int) -> int | None:
        """The scale whose branch outputs fill the pruned slots of scale ``si`` (None: ``si`` is not pruned):
        the cache scale of its clip."""
        if self.keep[si] is None or self.cache_scale is None:
            return None
        return si - si % self.clip_scales + self.cache_scale

    @property
    def cached_scales(self) -> frozenset[int]:
        """The scales whose branch outputs are kept for later ones."""
        return frozenset(c for si in range(self.executed) if (c := self.cache_of(si)) is not None)

    def last_reader(self, cache: int) -> int:
        """The last executed scale whose pruned slots the cache scale ``cache`` fills."""
        return max(si for si in range(self.executed) if self.cache_of(si) == cache)

    def tokens_run(self, si: int, layer: int) -> int:
        """Tokens block ``layer`` processes at scale ``si`` (0 when the scale is skipped)."""
        if si >= self.executed:
            return 0
        keep = self.keep[si]
        return keep if keep is not None and layer in self.layers else self.tokens[si]

    @property
    def last_pruned(self) -> int | None:
        """The last scale that prunes, after which no cached branch output is read."""
        return max((si for si, keep in enumerate(self.keep) if keep is not None), default=None)

    def kv_tokens(self, layer: int) -> int:
        """Tokens whose keys and values block ``layer`` holds at most in its cache over one generation: those of
        every executed scale but the last, which no later scale reads (under a KV budget, the most it keeps
        between scales: a scale that is cut is attended to with the kept tokens, then cut, as the last is
        attended to without being stored)."""
        if self.kv is None:
            return sum(self.tokens_run(si, layer) for si in range(self.executed - 1))
        return max(held for _, held in self.kv.lengths(self, layer))


def check_ratio(ratio: float, what: str) -> float:
    if not isinstance(ratio, int | float) or isinstance(ratio, bool) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{what} = {ratio!r}: a pruning ratio must be a number in [0, 1]")
    if ratio == 1.0:
        warnings.warn(f"{what} = 1.0 runs no token of that scale (the cache fills it all); skipping the final "
                      "scales (skip_last) drops them at less cost", stacklevel=3)
    return float(ratio)


def scale_index(position: int, num_scales: int, what: str) -> int:
    """Index of scale ``position`` (negative counts from the last)."""
    if not isinstance(position, int) or not -num_scales <= position < num_scales:
        raise ValueError(f"{what}: scale position {position!r} does not exist; this schedule has {num_scales} "
                         f"scales (positions 0..{num_scales - 1} or -{num_scales}..-1)")
    return position % num_scales
