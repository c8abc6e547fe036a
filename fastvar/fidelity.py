"""What a preset changes on the user's own model: time, memory, the sampled tokens, and the images.

Every variant runs the same inputs with the same seeds as the unpatched model. Tokens are compared
draw by draw (``fastvar.models.sampling.recording_draws``): at each scale, the fraction of tokens
(Infinity: of tokens with all their bits) equal to the unpatched run's. Images are compared by PSNR and
SSIM from torchmetrics (the ``compare`` extra); a video by the PSNR of all its frames together and the mean
SSIM of its frames.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import fastvar
from fastvar.adapters import find_adapter
from fastvar.bench import StepClock
from fastvar.extras import install_hint
from fastvar.models.sampling import recording_draws
from fastvar.pipelines.base import Pipeline, Preset, preset_name
from fastvar.video import Output, frames_of

GRID_FRAMES = 4  # a video's cell in the grid: this many of its frames, evenly spaced, side by side


@dataclass(frozen=True)
class VariantReport:
    name: str
    preset: str | None  # the preset name or the config's repr; None: the unpatched model
    totals: tuple[float, ...]  # seconds of every timed call
    scales_seconds: tuple[float, ...]  # seconds of all scales, every timed call
    peak_memory: int | None  # bytes, CUDA only
    flop_ratio: float
    agreement: tuple[float | None, ...]  # per scale; None where the variant skips the scale
    psnr: tuple[float, ...]  # dB per image (video) against the unpatched one (inf: identical)
    ssim: tuple[float, ...]


@dataclass(frozen=True)
class Comparison:
    """The reports, unpatched first, and every variant's images or videos (input-major, then seed)."""

    scales: tuple[str, ...]  # 'h x w' (InfinityStar: 't x h x w') of the token map drawn at every scale
    reports: tuple[VariantReport, ...]
    images: Mapping[str, Sequence[Output]]

    def table(self) -> str:
        base = self.reports[0]
        width = max(12, *(len(r.name) + 2 for r in self.reports))
        rows = [
            ("speedup (min)", [f"{min(base.totals) / min(r.totals):.2f}x" for r in self.reports]),
            ("speedup (median)", [f"{statistics.median(base.totals) / statistics.median(r.totals):.2f}x"
                                  for r in self.reports]),
            ("scales speedup", [f"{statistics.median(base.scales_seconds) / statistics.median(r.scales_seconds):.2f}x"
                                for r in self.reports]),
            ("FLOP ratio", [f"{r.flop_ratio:.3f}" for r in self.reports]),
            ("PSNR mean dB", [f"{statistics.fmean(r.psnr):.2f}" for r in self.reports]),
            ("PSNR worst dB", [f"{min(r.psnr):.2f}" for r in self.reports]),
            ("SSIM mean", [f"{statistics.fmean(r.ssim):.4f}" for r in self.reports]),
            ("SSIM worst", [f"{min(r.ssim):.4f}" for r in self.reports]),
        ]
        if base.peak_memory is not None:
            rows.append(("peak GiB", [f"{r.peak_memory / 2**30:.2f}" for r in self.reports]))
        lines = [f"{'':>16}" + "".join(f"{r.name:>{width}}" for r in self.reports)]
        lines += [f"{label:>16}" + "".join(f"{c:>{width}}" for c in cells) for label, cells in rows]
        if all(a is None for a in base.agreement):
            lines.append("tokens: this model's sampler records no draws to compare")
            return "\n".join(lines)
        lines.append("tokens equal to the unpatched run, per scale:")
        for si, scale in enumerate(self.scales):
            cells = "".join(f"{'skipped':>{width}}" if r.agreement[si] is None else f"{r.agreement[si]:>{width}.4f}"
                            for r in self.reports)
            lines.append(f"{si:>6} {scale:>9}" + cells)
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The reports as JSON-ready data (infinite PSNR as the string 'inf')."""
        def clean(value: Any) -> Any:
            if isinstance(value, float) and math.isinf(value):
                return "inf"
            return [clean(v) for v in value] if isinstance(value, list | tuple) else value

        return {"scales": list(self.scales),
                "variants": [{k: clean(v) for k, v in asdict(r).items()} for r in self.reports]}

    def grid(self) -> Image.Image:
        """One row per image (input, seed), one column per variant, unpatched first, under a strip naming each
        column (a name too long for its column is cut, ending in '...'). A video's cell is a strip of its
        frames (``GRID_FRAMES``, evenly spaced, the first and the last among them)."""
        columns = [[cell(output) for output in self.images[r.name]] for r in self.reports]
        w, h = columns[0][0].size
        font = ImageFont.load_default(size=max(12, w // 20))
        pad = font.size // 3
        top = sum(font.getmetrics()) + 2 * pad
        grid = Image.new("RGB", (len(columns) * w, top + len(columns[0]) * h), "white")
        draw = ImageDraw.Draw(grid)
        for col, (report, images) in enumerate(zip(self.reports, columns)):
            draw.text((col * w + pad, pad), fitted(report.name, font, w - 2 * pad), fill="black", font=font)
            for row, image in enumerate(images):
                grid.paste(image, (col * w, top + row * h))
        return grid

    def save(self, out_dir: str | Path) -> None:
        """``compare.txt``, ``compare.json`` and ``grid.png`` into the folder ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.txt").write_text(self.table() + "\n")
        (out / "compare.json").write_text(json.dumps(self.to_json(), indent=1))
        self.grid().save(out / "grid.png")


def cell(output: Output) -> Image.Image:
    """An image, or a strip of a video's frames, evenly spaced from the first to the last."""
    frames = frames_of(output)
    shown = [frames[round(i * (len(frames) - 1) / (GRID_FRAMES - 1))] for i in range(GRID_FRAMES)] \
        if len(frames) > 1 else frames
    w, h = shown[0].size
    strip = Image.new("RGB", (len(shown) * w, h))
    for i, frame in enumerate(shown):
        strip.paste(frame, (i * w, 0))
    return strip


def fitted(text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """``text``, or its longest start ending in '...' that ``font`` draws within ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def image_metrics(images: Sequence[Output], references: Sequence[Output]) -> tuple[list[float], list[float]]:
    """PSNR (dB) and SSIM of each image against its reference, both in [0, 1] RGB; of a video (frames of the
    size and number of its reference's), the PSNR of all its frames together and the mean SSIM of its frames."""
    try:
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    except ImportError as err:  # an optional dependency
        raise ImportError(f"image metrics need torchmetrics: {install_hint('compare')}") from err

    def batch(outputs: Sequence[Output]) -> torch.Tensor:  # (N, T, 3, H, W)
        frames = [[np.asarray(f.convert("RGB")) for f in frames_of(o)] for o in outputs]
        return torch.from_numpy(np.stack(frames)).permute(0, 1, 4, 2, 3) / 255

    x, y = batch(images), batch(references)
    psnr = peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3, 4))
    ssim = structural_similarity_index_measure(x.flatten(0, 1), y.flatten(0, 1), data_range=1.0, reduction="none")
    return psnr.tolist(), ssim.reshape(x.shape[:2]).mean(dim=1).tolist()


def compare(
    pipe: Pipeline, inputs: Sequence[str | int], variants: Mapping[str, Preset] | Sequence[str],
    seeds: Sequence[int] = (0,), batch_size: int = 1, repeats: int = 1, warmup: int = 1, **options: Any,
) -> Comparison:
    """Run ``inputs`` (prompts or class ids, ``batch_size`` per call) with every seed unpatched and under each
    variant (preset names, or ``{name: preset name or FastVARConfig}``), alternating variants ``repeats``
    times after ``warmup`` untimed unpatched calls; ``options`` go to every call. The model is left unpatched."""
    named: dict[str, Preset] = dict(variants) if isinstance(variants, Mapping) else {v: v for v in variants}
    if not named or "unpatched" in named:
        raise ValueError("give at least one variant to compare, none of them named 'unpatched'")
    for preset in named.values():
        if preset is None:
            raise ValueError("a variant is None; the unpatched model is always compared, as 'unpatched'")
        pipe.check_preset(preset)
    if not inputs or repeats < 1 or warmup < 0 or batch_size < 1 or not seeds:
        raise ValueError("compare needs inputs, seeds, batch_size >= 1, repeats >= 1 and warmup >= 0")
    named = {"unpatched": None, **named}
    calls = [(list(inputs[i:i + batch_size]), seed) for i in range(0, len(inputs), batch_size) for seed in seeds]
    device = pipe.device
    clock = StepClock(find_adapter(pipe.transformer).blocks(pipe.transformer)[0], pipe.vae.decoder, device)
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in named}
    images: dict[str, list[Output]] = {n: [] for n in named}
    draws: dict[str, list[list[torch.Tensor]]] = {n: [] for n in named}
    peaks: dict[str, int | None] = dict.fromkeys(named)
    summaries: dict[str, fastvar.Summary] = {}
    try:
        for _ in range(warmup):
            pipe(**{pipe.batch_argument: calls[0][0]}, seed=calls[0][1], preset=None, progress=False, **options)
        for repeat in range(repeats):
            for batch, seed in calls:
                for name, preset in named.items():
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    with recording_draws() as drawn:
                        (total, per_scale, _), result = clock.run(lambda preset=preset, batch=batch, seed=seed: pipe(
                            **{pipe.batch_argument: batch}, seed=seed, preset=preset, progress=False, **options))
                    times[name].append((total, sum(per_scale)))
                    if device.type == "cuda":
                        peaks[name] = max(peaks[name] or 0, torch.cuda.max_memory_allocated(device))
                    if preset is not None:
                        summaries[name] = fastvar.summary(pipe.transformer)
                    if repeat == 0:
                        images[name] += result
                        draws[name].append(drawn)
    finally:
        clock.close()
        if fastvar.is_patched(pipe.transformer):
            fastvar.unpatch(pipe.transformer)
    rows = next(iter(summaries.values())).rows
    drawn_maps = [(1, 1) if r.text else r.shape for r in rows]  # HART's text stage draws the first, 1x1 map
    reports = []
    for name, preset in named.items():
        psnr, ssim = image_metrics(images[name], images["unpatched"])
        reports.append(VariantReport(
            name, preset_name(preset),
            tuple(t for t, _ in times[name]), tuple(s for _, s in times[name]), peaks[name],
            summaries[name].flop_ratio if name in summaries else 1.0,
            token_agreement(draws[name], draws["unpatched"], [math.prod(m) for m in drawn_maps]), tuple(psnr),
            tuple(ssim)))
    return Comparison(tuple("x".join(map(str, m)) for m in drawn_maps), tuple(reports), images)


def token_agreement(runs: Sequence[Sequence[torch.Tensor]], references: Sequence[Sequence[torch.Tensor]],
                    tokens: Sequence[int]) -> tuple[float | None, ...]:
    """Per scale, over every call: the fraction of tokens drawn as in the reference run; None where a run
    drew nothing (a skipped scale)."""
    agreement = []
    for si, n in enumerate(tokens):
        equal = count = 0
        for run, reference in zip(runs, references):
            if si >= len(run):
                break
            a, b = run[si].reshape(run[si].shape[0], n, -1), reference[si].reshape(reference[si].shape[0], n, -1)
            equal += int((a == b).all(dim=-1).sum())
            count += a.shape[0] * n
        agreement.append(equal / count if count else None)
    return tuple(agreement)
