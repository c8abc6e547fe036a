"""Per-model runtime state shared by the patched blocks: the schedule, the scale the sampling loop is
running, and the cached branch outputs (kept from the cache scale until the last pruned scale has read them)."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from fastvar.config import FastVARConfig, Schedule
from fastvar.kv_budget import kept_positions, window_positions, window_queries
from fastvar.models.kv_cache import KVCache
from fastvar.pruning import gather_tokens, restore, restore_zeros, select_pivotal, select_random

Branch = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (tokens, their indices or None)


class FastVARState:
    """Lives on the root module (``_fastvar``); every patched block holds a reference to it."""

    def __init__(self, family: str, preset: str | None, config: FastVARConfig, schedule: Schedule):
        self.family, self.preset, self.config = family, preset, config
        self.schedule = schedule
        self.scale: int | None = None  # the scale the sampling loop runs; None outside a sampling call
        self.repetition = 0  # which run of that scale (InfinityStar runs a scale several times)
        # (block, branch, cache scale or "previous" run of this scale) -> its outputs and map shape
        self._cache: dict[tuple[int, str, int | str], tuple[torch.Tensor, tuple[int, ...]]] = {}
        self._kv_passed: set[int] = set()  # blocks whose KV cache passed the budget's threshold in this call
        self._kv_cut: dict[int, int | None] = {}  # block -> the length its cache is cut to after this scale

    def set_shapes(self, shapes: Sequence[tuple[int, ...]], depth: int, **layout) -> None:
        """Resolve the config for the scale schedule of the coming call (any size or aspect ratio), checked
        as that call will run it (a KV budget against the caches it builds). ``layout``: the clips and
        repetitions of a schedule that has them (``FastVARConfig.resolve``)."""
        self.schedule = self.config.resolve(shapes, depth, self.schedule.text_scales, **layout)

    @contextlib.contextmanager
    def sampling(self, count_calls_of: nn.Module | None = None) -> Iterator[None]:
        """One sampling call. fastvar's loops say which scale runs (``begin_scale``); for a loop that does not
        (an upstream object's), give its first block, which runs once per scale: its calls are counted. Two
        scales may hold as many tokens (HART's text and a map), so a token count never names a scale. The
        caches are freed after the call."""
        hook = None
        if count_calls_of is not None:
            hook = count_calls_of.register_forward_pre_hook(
                lambda *_: self.begin_scale(0 if self.scale is None else self.scale + 1))
        try:
            yield
        finally:
            if hook is not None:
                hook.remove()
            self.release()

    def begin_scale(self, si: int, repetition: int = 0) -> None:
        """The sampling loop is about to run scale ``si`` (its run ``repetition``) through the blocks."""
        self.scale, self.repetition = si, repetition

    def scale_of(self, x: torch.Tensor) -> int | None:
        """The scale of a block input ``x`` (B, L, C): the one the sampling loop runs, None outside a sampling
        call. ``RuntimeError`` if ``x`` has not that scale's token count (the loop and fastvar disagree)."""
        si = self.scale
        if si is not None and x.shape[1] != self.schedule.tokens[si]:
            raise RuntimeError(f"a block got {x.shape[1]} tokens while scale {si} ({self.schedule.tokens[si]} tokens) "
                               "runs: the sampling loop and fastvar's scale count disagree")
        return si

    def acts_on(self, si: int, layer: int) -> bool:
        """Whether block ``layer`` prunes or caches at scale ``si``; if not it runs unchanged."""
        s = self.schedule
        return layer in s.layers and (si in s.cached_scales or s.keep[si] is not None)

    def run_branch(self, layer: int, name: str, si: int, x: torch.Tensor, branch: Branch) -> torch.Tensor:
        """The residual update of one branch (attention, FFN, ...) of block ``layer`` at scale ``si``.

        ``branch(tokens, idx)`` gets the tokens to run and their positions (None: all, in order). At the
        cache scale the output is stored; at a pruned scale the branch runs on the pivotal tokens only
        and the stored output, resized, fills the other positions. A scale run again (a repetition) is
        filled from its previous run's output instead, of the same shape.
        """
        s = self.schedule
        keep = s.keep[si] if layer in s.layers else None
        from_cache = self.config.restoration == "cache"
        last_run = self.repetition == s.repetitions[si] - 1
        if keep is None:
            out = branch(x, None)
            if si in s.cached_scales and layer in s.layers:
                self._cache[layer, name, si] = (out, s.shapes[si])
            return out
        source = "previous" if self.repetition else s.cache_of(si)
        if from_cache and (layer, name, source) not in self._cache:
            raise RuntimeError(f"block {layer} reached pruned scale {si} before its cache scale {s.cache_of(si)} "
                               "ran; run scales in order from the first")
        idx = self._select(x, keep, si, layer, name)
        fresh = branch(gather_tokens(x, idx), idx)
        if not from_cache:
            return restore_zeros(fresh, idx, x.shape[1])
        cached, cached_shape = self._cache.pop((layer, name, source)) if self.repetition else \
            self._cache[layer, name, source]
        if last_run and si == s.last_reader(s.cache_of(si)):  # no later scale reads it
            self._cache.pop((layer, name, s.cache_of(si)), None)
        out = restore(cached[: x.shape[0]], cached_shape, fresh, idx, s.shapes[si])
        if not last_run:
            self._cache[layer, name, "previous"] = (out, s.shapes[si])
        return out

    def _select(self, x: torch.Tensor, keep: int, si: int, layer: int, name: str) -> torch.Tensor:
        if self.config.selection == "pivotal":
            return select_pivotal(x, keep)
        seed = zlib.crc32(f"{self.config.selection_seed}:{si}:{layer}:{name}".encode())
        return select_random(x, keep, torch.Generator(device=x.device).manual_seed(seed))

    def plan_cut(self, layer: int, cache: KVCache | None, tokens: int) -> None:
        """Before block ``layer``'s self-attention adds ``tokens`` to its KV cache: decide, by the budget, whether
        the cache is cut after it, and if so let the cache keep what it cannot store until the cut."""
        plan, si = self.schedule.kv, self.scale
        if plan is None or cache is None or si is None or si == self.schedule.executed - 1:  # none reads the last
            return
        length = cache.length + tokens
        self._kv_cut[layer] = plan.cuts(si, layer, length, layer in self._kv_passed)
        if length > plan.budget.threshold:
            self._kv_passed.add(layer)
        cache.cut_next = self._kv_cut[layer] is not None

    def cut_kv(self, layer: int, cache: KVCache | None, x: torch.Tensor, projection: torch.Tensor) -> None:
        """After block ``layer``'s self-attention ran on ``x`` (its input, the scale's tokens), cut its KV cache
        as ``plan_cut`` decided (``fastvar.kv_budget``). The window's scoring queries are the bias-free query
        projection (the first third of the attention's ``projection`` weight) of its tokens (ScaleKV's),
        computed for those tokens only. Where FastVAR pruned the scale,
        only the kept tokens are in the cache, the most pivotal first: they are the window."""
        capacity = self._kv_cut.pop(layer, None)
        if capacity is None:
            return
        rows, n, _ = x.shape
        keys, _ = cache.keys_and_values(rows)
        h, w = self.schedule.shapes[self.scale]
        budget = self.schedule.kv.budget
        if n < h * w:  # a pruned scale: the most pivotal kept tokens, first in the cache, are the window
            local = torch.arange(min(budget.window, n), device=x.device)
        else:
            local = torch.tensor(window_positions(h, w, budget.window), device=x.device)
        queries = window_queries(x, local, projection, keys.shape[1])
        keep = kept_positions(keys, queries, local + (keys.shape[2] - n), capacity, budget.kernel_size,
                              budget.pooling)
        cache.keep(keep)

    def release(self) -> None:
        """Free the cached branch outputs and forget the scale (after each generation and on unpatch)."""
        self._cache.clear()
        self._kv_passed.clear()
        self._kv_cut.clear()
        self.scale, self.repetition = None, 0
