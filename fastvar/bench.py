"""Side-by-side latency of a pipeline unpatched and under FastVAR presets, in one process.

Runs alternate between the variants after a warm-up, so drift (clocks, other load) hits all of them.
Whole calls are reported by their minimum and median over the repeats (on a shared machine medians
swing by tens of percent); per-scale times are medians. Per-scale times come from hooks on the first
block (one call per run of a scale) and on the image decoder.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import fastvar
from fastvar.adapters import find_adapter
from fastvar.config import FastVARConfig
from fastvar.pipelines.base import Pipeline


@dataclass(frozen=True)
class VariantResult:
    name: str
    totals: tuple[float, ...]  # seconds of each repeat of the whole call; none if it ran out of memory
    per_scale: tuple[float, ...]  # seconds per scale (0 when skipped), median
    decode: float  # seconds, median
    peak_memory: int | None  # bytes, CUDA only (out of memory: the most allocated before it failed)
    flop_ratio: float  # ideal, against the unpatched model
    scales: tuple[str, ...]  # every scale of the schedule run: 'h x w' (InfinityStar: 't x h x w'), or 'text'
    images: int = 1  # per call (videos, for a video pipeline)

    @property
    def out_of_memory(self) -> bool:
        return not self.totals

    @property
    def total_min(self) -> float:
        return min(self.totals, default=math.nan)

    @property
    def total_median(self) -> float:
        return statistics.median(self.totals) if self.totals else math.nan


class StepClock:
    """Timestamps at every call of the first block (a scale's run; InfinityStar's text pass too) and at the
    start of decoding (the decoder's first call: a video decoder runs chunk by chunk)."""

    def __init__(self, first_block: nn.Module, decoder: nn.Module, device: torch.device):
        self.device, self.marks, self.decode_mark = device, [], None
        self._hooks = [first_block.register_forward_pre_hook(lambda *_: self.marks.append(self._now())),
                       decoder.register_forward_pre_hook(lambda *_: self._decoding())]

    def _decoding(self) -> None:
        if self.decode_mark is None:
            self.decode_mark = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def run(self, fn: Callable[[], Any]) -> tuple[tuple[float, list[float], float], Any]:
        """(whole call, seconds of every first-block call up to decoding, decoding) of one call of ``fn``, and
        what it returned."""
        self.marks, self.decode_mark = [], None
        start = self._now()
        result = fn()
        end = self._now()
        bounds = [*self.marks, self.decode_mark]
        return (end - start, [b - a for a, b in zip(bounds, bounds[1:])], end - self.decode_mark), result

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def scale_seconds(steps: Sequence[float], runs: Sequence[int] | None) -> list[float]:
    """Seconds per scale from those of every first-block call: scale ``si`` is ``runs[si]`` calls (0: skipped),
    and calls before the scales' (InfinityStar's text pass) count to the first. Without ``runs``: a call each."""
    if runs is None:
        return list(steps)
    counts = [n + (len(steps) - sum(runs) if si == 0 else 0) for si, n in enumerate(runs)]
    ends = [sum(counts[: si + 1]) for si in range(len(counts))]
    return [sum(steps[end - n:end]) for n, end in zip(counts, ends)]


def benchmark(
    pipe: Pipeline, inputs: dict[str, Any], variants: Sequence[str | FastVARConfig], repeats: int = 2,
    warmup: int = 1, report: Callable[[str], None] | None = None,
) -> list[VariantResult]:
    """Time ``pipe(**inputs)`` unpatched ("baseline") and under each variant (a preset name or config);
    ``report`` gets one line per run. A variant that runs out of CUDA memory is reported so and not run again
    (a KV budget may let a batch fit that the unpatched model cannot). The pipeline's model is left
    unpatched."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    named = {"baseline": None, **{v if isinstance(v, str) else f"config{i}": v for i, v in enumerate(variants)}}
    samples: dict[str, list[tuple[float, list[float], float]]] = {n: [] for n in named}
    peaks: dict[str, int | None] = dict.fromkeys(named)
    ratios, scales, runs = {"baseline": 1.0}, {}, {}
    device = pipe.device
    clock = StepClock(find_adapter(pipe.transformer).blocks(pipe.transformer)[0], pipe.vae.decoder, device)
    rounds, failed = warmup + repeats, set()
    try:
        for i in range(rounds):
            for name, variant in named.items():
                if name in failed:
                    continue
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    sample, _ = clock.run(lambda variant=variant: pipe(**inputs, seed=0, preset=variant,
                                                                      progress=False))
                except torch.cuda.OutOfMemoryError:
                    failed.add(name)
                    if device.type == "cuda":
                        peaks[name] = torch.cuda.max_memory_allocated(device)
                        torch.cuda.empty_cache()
                    if report is not None:
                        report(f"{name}: out of memory; not run again")
                    continue
                if variant is not None:  # after the run: the schedule is the one the call used
                    summary = fastvar.summary(pipe.transformer)
                    ratios[name] = summary.flop_ratio
                    scales[name] = tuple("text" if r.text else "x".join(map(str, r.shape)) for r in summary.rows)
                    runs[name] = tuple(0 if r.skipped else r.runs for r in summary.rows)
                    runs["baseline"] = tuple(r.model_runs for r in summary.rows)
                if device.type == "cuda":
                    peaks[name] = torch.cuda.max_memory_allocated(device)
                if i >= warmup:
                    samples[name].append(sample)
                if report is not None:
                    kind = "warm-up" if i < warmup else f"repeat {i - warmup + 1}/{repeats}"
                    report(f"{kind}: {name} {sample[0]:.2f} s")
    finally:
        clock.close()
        if fastvar.is_patched(pipe.transformer):
            fastvar.unpatch(pipe.transformer)
    per_scale = {name: [scale_seconds(s[1], runs.get(name)) for s in samples[name]] for name in named}
    num_scales = max((len(s) for seconds in per_scale.values() for s in seconds), default=0)
    schedule = next(iter(scales.values()), ())
    images = len(inputs[pipe.batch_argument])
    return [
        VariantResult(
            name,
            tuple(s[0] for s in samples[name]),
            tuple(statistics.median((s + [0.0] * num_scales)[si] for s in per_scale[name]) if samples[name] else 0.0
                  for si in range(num_scales)),
            statistics.median(s[2] for s in samples[name]) if samples[name] else 0.0,
            peaks[name],
            ratios.get(name, math.nan),
            scales.get(name, schedule),
            images,
        )
        for name in named
    ]


def format_results(results: list[VariantResult], title: str) -> str:
    """A per-scale latency table (ms) with whole-call min and median, speedups from both, and the ideal
    FLOP ratio beside the measured time ratio."""
    base = results[0]
    width = max(12, *(len(r.name) + 2 for r in results))
    head = f"{'scale':>5} {'h x w':>9} " + "".join(f"{r.name:>{width}}" for r in results)
    lines = [title, head]
    for si in range(len(base.per_scale)):
        scale = base.scales[si] if si < len(base.scales) else ""
        cells = "".join(f"{'OOM':>{width}}" if r.out_of_memory else f"{r.per_scale[si] * 1e3:>{width}.1f}"
                        if r.per_scale[si] else f"{'skipped':>{width}}" for r in results)
        lines.append(f"{si:>5} {scale:>9} {cells}")

    def row(value: Callable[[VariantResult], float], fmt: str, unit: str = "") -> list[str]:
        """One cell per variant; 'OOM' where it, or the baseline it is compared to, ran out of memory."""
        return ["OOM" if math.isnan(value(r)) else f"{value(r):{fmt}}{unit}" for r in results]

    rows = [
        ("scales ms", row(lambda r: sum(r.per_scale) * 1e3 if r.totals else math.nan, ".1f")),
        ("scales speedup", row(lambda r: sum(base.per_scale) / sum(r.per_scale) if r.totals and base.totals
                               else math.nan, ".2f", "x")),
        ("decode ms", row(lambda r: r.decode * 1e3 if r.totals else math.nan, ".1f")),
        ("total min ms", row(lambda r: r.total_min * 1e3, ".1f")),
        ("total median ms", row(lambda r: r.total_median * 1e3, ".1f")),
        ("speedup (min)", row(lambda r: base.total_min / r.total_min, ".2f", "x")),
        ("speedup (median)", row(lambda r: base.total_median / r.total_median, ".2f", "x")),
        ("images/s (min)", row(lambda r: r.images / r.total_min, ".3f")),
        ("FLOP ratio", row(lambda r: r.flop_ratio, ".3f")),
        ("time ratio (min)", row(lambda r: r.total_min / base.total_min, ".3f")),
    ]
    if base.peak_memory is not None:
        rows.append(("peak GiB", [f"{r.peak_memory / 2**30:.2f}" for r in results]))
    lines += [f"{label:>16}" + "".join(f"{c:>{width}}" for c in cells) for label, cells in rows]
    lines.append("scales: transformer, head and sampling of every scale (medians); decode: the image decoder;\n"
                 "total: the whole call = text encoding + scales + decode + conversion to PIL.\n"
                 "FLOP ratio: ideal, transformer blocks and head (no decoder); time ratio: measured, whole call.")
    return "\n".join(lines)


def results_json(results: list[VariantResult], **about: object) -> dict[str, object]:
    """The results as JSON-ready data, with speedups from the minimum and the median, and ``about`` (the
    machine, model, dtype ...)."""
    base = results[0]
    variants = []
    def finite(value: float) -> float | None:  # JSON has no NaN: a variant or the baseline out of memory is null
        return None if math.isnan(value) else value

    for r in results:
        variants.append(dict(
            name=r.name, out_of_memory=r.out_of_memory, total_min_s=finite(r.total_min),
            total_median_s=finite(r.total_median), totals_s=list(r.totals), scales_s=sum(r.per_scale),
            per_scale_s=list(r.per_scale), decode_s=r.decode, peak_memory_bytes=r.peak_memory,
            speedup_min=finite(base.total_min / r.total_min), speedup_median=finite(base.total_median / r.total_median),
            images_per_second=finite(r.images / r.total_min), flop_ratio=finite(r.flop_ratio),
            scales=list(r.scales)))
    return {**about, "variants": variants}
