"""Side-by-side latency of a model unpatched and under FastVAR configs, in one process.

Runs are alternated between variants after a warm-up, so drift (clocks, other load) hits all of them;
each number is the median over repeats. Per-scale times come from hooks on the first block (one call
per scale) and on the decoder.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

import fastvar
from fastvar.adapters import find_adapter
from fastvar.config import FastVARConfig


@dataclass(frozen=True)
class VariantResult:
    name: str
    total: float  # seconds, median
    per_scale: tuple[float, ...]  # seconds per scale (0 when skipped), median
    decode: float
    peak_memory: int | None  # bytes, CUDA only
    flop_ratio: float  # ideal, against the unpatched model


class _StepClock:
    """Timestamps at the start of every scale (first block called) and of decoding."""

    def __init__(self, first_block: nn.Module, decoder: nn.Module, device: torch.device):
        self.device, self.marks, self.decode_mark = device, [], None
        self._hooks = [first_block.register_forward_pre_hook(lambda *_: self.marks.append(self._now())),
                       decoder.register_forward_pre_hook(lambda *_: setattr(self, "decode_mark", self._now()))]

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def run(self, fn: Callable[[], object], num_scales: int) -> tuple[float, list[float], float]:
        self.marks, self.decode_mark = [], None
        start = self._now()
        fn()
        end = self._now()
        bounds = [start, *self.marks[1:], self.decode_mark]
        per_scale = [b - a for a, b in zip(bounds, bounds[1:])]
        return end - start, per_scale + [0.0] * (num_scales - len(per_scale)), end - self.decode_mark

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def benchmark(
    model: nn.Module, run: Callable[[], object], variants: Mapping[str, FastVARConfig | str | None],
    decoder: nn.Module, device: torch.device, num_scales: int, repeats: int = 5, warmup: int = 1,
) -> list[VariantResult]:
    """Time ``run()`` (``num_scales`` scales) on ``model`` unpatched ("baseline") and patched with each
    variant's config."""
    names = ["baseline", *variants]
    adapter = find_adapter(model)
    flop_ratio = {"baseline": 1.0}
    samples: dict[str, list[tuple[float, list[float], float]]] = {n: [] for n in names}
    peaks: dict[str, int | None] = dict.fromkeys(names)
    clock = _StepClock(adapter.blocks(model)[0], decoder, device)
    try:
        for i in range(warmup + repeats):
            for name in names:
                if name == "baseline":
                    if fastvar.is_patched(model):
                        fastvar.unpatch(model)
                else:
                    fastvar.patch(model, variants[name])
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                sample = clock.run(run, num_scales)
                if name != "baseline":  # after the run: the schedule is the one the call used
                    flop_ratio[name] = fastvar.summary(model).flop_ratio
                if device.type == "cuda":
                    peaks[name] = torch.cuda.max_memory_allocated(device)
                if i >= warmup:
                    samples[name].append(sample)
    finally:
        clock.close()
        if fastvar.is_patched(model):
            fastvar.unpatch(model)
    return [
        VariantResult(
            name,
            statistics.median(s[0] for s in samples[name]),
            tuple(statistics.median(s[1][si] for s in samples[name]) for si in range(num_scales)),
            statistics.median(s[2] for s in samples[name]),
            peaks[name],
            flop_ratio[name],
        )
        for name in names
    ]


def format_results(results: list[VariantResult], shapes: list[tuple[int, int]], title: str) -> str:
    """A per-scale latency table (ms) with totals, speedups and the ideal FLOP ratio."""
    base = results[0]
    width = max(12, *(len(r.name) + 2 for r in results))
    head = f"{'scale':>5} {'h x w':>9} " + "".join(f"{r.name:>{width}}" for r in results)
    lines = [title, head]
    for si, (h, w) in enumerate(shapes):
        cells = "".join(f"{r.per_scale[si] * 1e3:>{width}.1f}" if r.per_scale[si] else f"{'skipped':>{width}}"
                        for r in results)
        lines.append(f"{si:>5} {h:>4}x{w:<4} {cells}")
    rows = [
        ("scales ms", [f"{sum(r.per_scale) * 1e3:.1f}" for r in results]),
        ("scales speedup", [f"{sum(base.per_scale) / sum(r.per_scale):.2f}x" for r in results]),
        ("decode", [f"{r.decode * 1e3:.1f}" for r in results]),
        ("total ms", [f"{r.total * 1e3:.1f}" for r in results]),
        ("speedup", [f"{base.total / r.total:.2f}x" for r in results]),
        ("time ratio", [f"{r.total / base.total:.3f}" for r in results]),
        ("FLOP ratio", [f"{r.flop_ratio:.3f}" for r in results]),
    ]
    if base.peak_memory is not None:
        rows.append(("peak GiB", [f"{r.peak_memory / 2**30:.2f}" for r in results]))
    lines += [f"{label:>15} " + "".join(f"{c:>{width}}" for c in cells) for label, cells in rows]
    lines.append("scales: transformer, head and sampling of every scale; decode: the VAE decoder.\n"
                 "FLOP ratio: ideal, transformer blocks and head (no decoder); time ratio: measured, whole call.")
    return "\n".join(lines)
