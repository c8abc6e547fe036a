"""What a patched model does at each scale: tokens run, ideal FLOPs (transformer, and the whole call with
the image decoder), and the memory its caches need."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fastvar.config import Schedule


@dataclass(frozen=True)
class CostModel:
    """FLOPs of one transformer block and of the logits head, per CFG row.

    context: keys of a cross-attention (text tokens), 0 when the blocks have none.
    prefix: keys every scale's self-attention sees besides the scales' (InfinityStar's text tokens).
    kv_width: channels of the keys (and values) per token, below ``width`` with grouped-query attention.
    mlp_matrices: weight matrices of the FFN, 2 (fc1, fc2) or 3 (SwiGLU's gate, up, down).
    last_scale_per_token: FLOPs per token of the last scale that no schedule prunes (HART's diffusion
        head, run on every token); spent only when the last scale runs.
    branches: branches per block whose outputs a schedule caches (attention, FFN; Infinity's
        cross-attention too).
    """

    width: int
    mlp_hidden: int
    head_out: int
    context: int = 0
    mlp_matrices: int = 2
    last_scale_per_token: float = 0.0
    branches: int = 2
    prefix: int = 0
    kv_width: int | None = None

    def __post_init__(self):
        if self.kv_width is None:
            object.__setattr__(self, "kv_width", self.width)

    def block(self, queries: int, keys: int) -> float:
        C = self.width
        projections = 2 * queries * (2 * C * C + 2 * C * self.kv_width)  # q, out; k, v
        self_attn = projections + 4 * queries * keys * C  # and QK^T, AV
        cross = 2 * queries * 2 * C * C + 4 * queries * self.context * C if self.context else 0
        return self_attn + cross + 2 * self.mlp_matrices * queries * C * self.mlp_hidden

    @property
    def working_set(self) -> int:
        """Values per token live inside one block at once, roughly: the residual stream and its norm, q, k, v,
        the attention output, and the FFN's hidden tensors (two for SwiGLU)."""
        return 3 * self.width + 2 * self.kv_width + (self.mlp_matrices - 1) * self.mlp_hidden

    def head(self, tokens: int) -> float:
        return 2 * tokens * self.width * self.head_out

    def schedule_flops(self, schedule: Schedule, patched: bool) -> list[float]:
        """FLOPs per scale (all its runs) of the blocks and head, with the schedule applied or not."""
        flops, keys = [], [self.prefix] * schedule.depth
        budgeted = patched and schedule.kv is not None
        attended = [[a for a, _ in schedule.kv.lengths(schedule, layer)] for layer in range(schedule.depth)] \
            if budgeted else None
        for si, tokens in enumerate(schedule.tokens):
            total = 0.0
            if not patched or si < schedule.executed:
                for layer in range(schedule.depth):
                    run = schedule.tokens_run(si, layer) if patched else tokens
                    if schedule.references is None:
                        keys[layer] += run  # only tokens that ran leave K/V in the cache
                        seen = keys[layer]
                    else:
                        seen = self.prefix + run + sum(schedule.tokens_run(r, layer) if patched else schedule.tokens[r]
                                                       for r in schedule.references[si])
                    total += self.block(run, attended[layer][si] if budgeted else seen)
                total += self.head(tokens)
                if si == len(schedule.tokens) - 1:
                    total += self.last_scale_per_token * tokens
            flops.append(total * (schedule.repetitions if patched else schedule.model_repetitions)[si])
        return flops


def decoder_flops(decoder: nn.Module, height: int, width: int) -> float:
    """FLOPs of the image decoder on one latent of ``height`` x ``width``, counted by torch's
    ``FlopCounterMode`` on meta tensors (shapes only, nothing computed). The latent's channels are those of
    its first Conv2d; ``ValueError`` for a module with none, or one that fails on the latent."""
    what = ("the decoder must be the image decoder that takes the latent (B, C, h, w), e.g. vae.decoder; "
            f"got a {type(decoder).__name__}")
    first_conv = next((m for m in decoder.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is None:
        raise ValueError(f"{what} with no Conv2d")
    latent = torch.empty(1, first_conv.in_channels, height, width, device="meta")
    meta = {name: torch.empty_like(t, device="meta") for name, t in chain(decoder.named_parameters(),
                                                                          decoder.named_buffers())}
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            torch.func.functional_call(decoder, meta, (latent,))
    except Exception as err:  # the user's module, run on a latent it may not take
        raise ValueError(f"{what} that fails on a latent of shape {tuple(latent.shape)}: {err}") from err
    return float(counter.get_total_flops())


@dataclass(frozen=True)
class ScaleRow:
    index: int
    shape: tuple[int, ...]  # (h, w) or (t, h, w)
    tokens: int
    kept: int | None  # tokens run in each pruning block; None when the scale is not pruned
    pruning_blocks: int
    skipped: bool
    cached: bool
    flops: float  # per image: both CFG rows, or the conditional one where guidance is off
    baseline_flops: float
    guided: bool
    kv_bytes: int  # keys and values this scale adds to the cache, every block and row (the last adds none)
    baseline_kv_bytes: int
    branch_bytes: int  # cached branch outputs held while this scale runs
    text: bool = False  # the scale holds text tokens, not a token map
    budget_kv_bytes: int | None = None  # the cache held after this scale under a KV budget, every block and row
    runs: int = 1  # how many times the scale runs (InfinityStar repeats scales)
    model_runs: int = 1  # and unpatched


@dataclass(frozen=True)
class Summary:
    """``str()`` gives a table. ``flop_ratio`` is patched / unpatched FLOPs of the transformer blocks and
    heads (the logits head, HART's diffusion head); ``whole_call_flop_ratio`` adds the image decoder, which
    no schedule changes. Memory is for ``batch`` images with guidance's two rows each, cached in a dtype of
    ``element_size`` bytes."""

    family: str
    preset: str | None
    depth: int
    rows: tuple[ScaleRow, ...]
    batch: int = 1
    element_size: int = 4
    decoder_flops: float | None = None  # per image
    width: int = 0  # channels of a token's keys (or values)

    @property
    def flop_ratio(self) -> float:
        return sum(r.flops for r in self.rows) / sum(r.baseline_flops for r in self.rows)

    @property
    def flop_ratio_with_guidance(self) -> float:
        """``flop_ratio`` were every scale run with both CFG rows: what turning guidance off leaves out."""
        return (sum(r.flops if r.guided else 2 * r.flops for r in self.rows)
                / sum(r.baseline_flops for r in self.rows))

    @property
    def whole_call_flop_ratio(self) -> float | None:
        """(transformer + decoder) patched over unpatched; None without a decoder."""
        if self.decoder_flops is None:
            return None
        return ((sum(r.flops for r in self.rows) + self.decoder_flops)
                / (sum(r.baseline_flops for r in self.rows) + self.decoder_flops))

    kv_peak_tokens: int | None = None  # under a KV budget: the tokens of every block's cache at its largest
    activation_bytes: int = 0  # one block's working set at the step with the most tokens, every row
    baseline_activation_bytes: int = 0

    @property
    def kv_bytes(self) -> int:
        """The KV cache of one call (allocated at its start; under a KV budget, as large as it gets)."""
        if self.kv_peak_tokens is not None:
            return 2 * self.kv_peak_tokens * self.per_token_bytes
        return self.fastvar_kv_bytes

    @property
    def fastvar_kv_bytes(self) -> int:
        """The KV cache without the KV budget: the tokens the schedule runs."""
        return sum(r.kv_bytes for r in self.rows)

    @property
    def per_token_bytes(self) -> int:
        return token_bytes(self.batch, self.width, self.element_size)

    @property
    def baseline_kv_bytes(self) -> int:
        return sum(r.baseline_kv_bytes for r in self.rows)

    @property
    def branch_bytes(self) -> int:
        """The most cached branch outputs held at once."""
        return max(r.branch_bytes for r in self.rows)

    @classmethod
    def of(cls, family: str, preset: str | None, schedule: Schedule, cost: CostModel, batch: int = 1,
           element_size: int = 4, decoder_flops: float | None = None) -> Summary:
        rows = [2 if si < schedule.guided else 1 for si in range(len(schedule.tokens))]  # CFG rows per image
        patched = [f * r for f, r in zip(cost.schedule_flops(schedule, True), rows)]
        baseline = [2 * f for f in cost.schedule_flops(schedule, False)]
        per_token = token_bytes(batch, cost.width, element_size)  # one token's branch output
        kv_token = token_bytes(batch, cost.kv_width, element_size)  # one token's keys (or values)
        K, outputs = len(schedule.tokens), cost.branches * len(schedule.layers)

        def held(si: int) -> int:  # cached branch outputs while scale si runs; a repeated pruned scale's previous run
            tokens = sum(schedule.tokens[c] for c in schedule.cached_scales if c < si <= schedule.last_reader(c))
            if schedule.keep[si] is not None and schedule.cache_scale is not None and schedule.repetitions[si] > 1:
                tokens += schedule.tokens[si]
            return tokens * per_token * outputs

        def stored(si: int, scales: int) -> bool:  # its keys and values stay for a later scale of the first `scales`
            if schedule.references is None:
                return si < scales - 1
            return any(si in schedule.references[later] for later in range(si + 1, scales))

        lengths = None if schedule.kv is None else [schedule.kv.lengths(schedule, layer)
                                                    for layer in range(schedule.depth)]
        rows = tuple(
            ScaleRow(si, schedule.shapes[si], n, schedule.keep[si] if schedule.layers else None,
                     len(schedule.layers) if schedule.keep[si] is not None else 0, si >= schedule.executed,
                     si in schedule.cached_scales, patched[si], baseline[si], si < schedule.guided,
                     2 * kv_token * sum(schedule.tokens_run(si, layer) for layer in range(schedule.depth))
                     if stored(si, schedule.executed) else 0,
                     2 * kv_token * n * schedule.depth if stored(si, K) else 0,
                     held(si),
                     si < schedule.text_scales,
                     None if lengths is None else 2 * kv_token * sum(
                         layer[si][1] for layer in lengths) if si < schedule.executed - 1 else 0,
                     schedule.repetitions[si], schedule.model_repetitions[si])
            for si, n in enumerate(schedule.tokens)
        )
        peak = None if lengths is None else sum(schedule.kv_tokens(layer) for layer in range(schedule.depth))
        live = batch * cost.working_set * element_size
        activations = max(schedule.tokens_run(si, layer) * (2 if si < schedule.guided else 1)
                          for si in range(schedule.executed) for layer in range(schedule.depth)) * live
        return cls(family, preset, schedule.depth, rows, batch, element_size, decoder_flops, cost.kv_width, peak,
                   activations, max(schedule.tokens) * 2 * live)

    def __str__(self) -> str:
        name = f" preset {self.preset!r}" if self.preset else ""
        lines = [f"fastvar {self.family}{name}: {plural(self.depth, 'block')}, ideal FLOP ratio {self.flop_ratio:.3f} "
                 f"({1 / self.flop_ratio:.2f}x fewer FLOPs)"]
        if self.decoder_flops is not None:
            lines.append(f"whole call with the image decoder: ideal FLOP ratio {self.whole_call_flop_ratio:.3f}")
        fewer = [r for r in self.rows if r.runs < r.model_runs and not r.skipped]
        if fewer:
            lines.append("fewer repetitions: " + ", ".join(f"scale {r.index} runs {r.runs} of {r.model_runs}"
                                                          for r in fewer))
        unguided = [r for r in self.rows if not r.guided and not r.skipped]
        if unguided:
            first = unguided[0]
            lines.append(f"guidance off from scale {first.index} ({shape_text(first.shape)}): the conditional "
                         f"rows only, half the FLOPs there; with guidance kept the ratio would be "
                         f"{self.flop_ratio_with_guidance:.3f}")
        mib, budgeted = 2**20, self.kv_peak_tokens is not None
        lines.append(f"KV cache {self.kv_bytes / mib:.1f} MiB (unpatched {self.baseline_kv_bytes / mib:.1f} MiB), "
                     f"cached branch outputs {self.branch_bytes / mib:.1f} MiB, for {plural(self.batch, 'image')} with "
                     f"guidance, {self.element_size}-byte values")
        lines.append(f"activations about {self.activation_bytes / mib:.1f} MiB at the largest step (one block's "
                     f"working set; unpatched {self.baseline_activation_bytes / mib:.1f} MiB)")
        if budgeted:
            lines.append(f"KV budget: the caches as large as they get between scales "
                         f"({self.fastvar_kv_bytes / mib:.1f} MiB without the budget), and while a scale is cut one "
                         "block's kept and new tokens at a time; 'held': what the caches keep after each scale")
        repeats = any(r.model_runs > 1 for r in self.rows)
        lines.append(f"{'scale':>5} {'shape':>12} {'tokens':>7}  {'tokens run per block':<46} {'FLOPs':>6} "
                     f"{'KV MiB':>7}" + (f" {'held MiB':>9}" if budgeted else ""))
        for r in self.rows:
            if r.skipped:
                run = "skipped"
            elif r.kept is not None:
                run = f"{r.kept} in {plural(r.pruning_blocks, 'pruning block')}"
                if r.pruning_blocks < self.depth:
                    run += f", {r.tokens} in the other {self.depth - r.pruning_blocks}"
            else:
                run = f"{r.tokens} (all)" + (", cached" if r.cached else "")
            if not r.guided and not r.skipped:
                run += ", no guidance"
            if repeats and not r.skipped:
                run += f", {plural(r.runs, 'run')}" + (f" of {r.model_runs}" if r.runs < r.model_runs else "")
            shape = "text" if r.text else shape_text(r.shape)
            lines.append(f"{r.index:>5} {shape:>12} {r.tokens:>7}  {run:<46} "
                         f"{r.flops / max(r.baseline_flops, 1):>6.2f} {r.kv_bytes / mib:>7.2f}"
                         + (f" {r.budget_kv_bytes / mib:>9.2f}" if budgeted else ""))
        return "\n".join(lines)


def shape_text(shape: tuple[int, ...]) -> str:
    """(h, w) as 'hxw', (t, h, w) as 'txhxw'."""
    return "x".join(str(n) for n in shape)


def token_bytes(batch: int, width: int, element_size: int) -> int:
    """Keys (or values) of one token in one block's cache, for every image and its guidance row."""
    return 2 * batch * width * element_size


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
