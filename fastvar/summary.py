"""What a patched model does at each scale, and the ideal FLOP ratio of its schedule."""

from __future__ import annotations

from dataclasses import dataclass

from fastvar.config import Schedule


@dataclass(frozen=True)
class CostModel:
    """FLOPs of one transformer block and of the logits head, per CFG row.

    context: keys of a cross-attention (text tokens), 0 when the blocks have none.
    mlp_matrices: weight matrices of the FFN, 2 (fc1, fc2) or 3 (SwiGLU's gate, up, down).
    last_scale_per_token: FLOPs per token of the last scale that no schedule prunes (HART's diffusion
        head, run on every token); spent only when the last scale runs.
    """

    width: int
    mlp_hidden: int
    head_out: int
    context: int = 0
    mlp_matrices: int = 2
    last_scale_per_token: float = 0.0

    def block(self, queries: int, keys: int) -> float:
        C = self.width
        self_attn = 2 * queries * 4 * C * C + 4 * queries * keys * C  # q,k,v,out projections; QK^T and AV
        cross = 2 * queries * 2 * C * C + 4 * queries * self.context * C if self.context else 0
        return self_attn + cross + 2 * self.mlp_matrices * queries * C * self.mlp_hidden

    def head(self, tokens: int) -> float:
        return 2 * tokens * self.width * self.head_out

    def schedule_flops(self, schedule: Schedule, patched: bool) -> list[float]:
        """FLOPs per scale of the blocks and head, with the schedule applied or not."""
        flops, keys = [], [0] * schedule.depth
        for si, tokens in enumerate(schedule.tokens):
            total = 0.0
            if not patched or si < schedule.executed:
                for layer in range(schedule.depth):
                    run = schedule.tokens_run(si, layer) if patched else tokens
                    keys[layer] += run  # only tokens that ran leave K/V in the cache
                    total += self.block(run, keys[layer])
                total += self.head(tokens)
                if si == len(schedule.tokens) - 1:
                    total += self.last_scale_per_token * tokens
            flops.append(total)
        return flops


@dataclass(frozen=True)
class ScaleRow:
    index: int
    shape: tuple[int, int]
    tokens: int
    kept: int | None  # tokens run in each pruning block; None when the scale is not pruned
    pruning_blocks: int
    skipped: bool
    cached: bool
    flops: float
    baseline_flops: float
    text: bool = False  # the scale holds text tokens, not a token map


@dataclass(frozen=True)
class Summary:
    """``str()`` gives a table; ``flop_ratio`` is patched / unpatched FLOPs of the transformer blocks and its
    heads (the logits head, HART's diffusion head), without the image decoder."""

    family: str
    preset: str | None
    depth: int
    rows: tuple[ScaleRow, ...]

    @property
    def flop_ratio(self) -> float:
        return sum(r.flops for r in self.rows) / sum(r.baseline_flops for r in self.rows)

    @classmethod
    def of(cls, family: str, preset: str | None, schedule: Schedule, cost: CostModel) -> Summary:
        patched, baseline = cost.schedule_flops(schedule, True), cost.schedule_flops(schedule, False)
        rows = tuple(
            ScaleRow(si, schedule.shapes[si], n, schedule.keep[si] if schedule.layers else None,
                     len(schedule.layers) if schedule.keep[si] is not None else 0, si >= schedule.executed,
                     si == schedule.cache_scale, patched[si], baseline[si], si < schedule.text_scales)
            for si, n in enumerate(schedule.tokens)
        )
        return cls(family, preset, schedule.depth, rows)

    def __str__(self) -> str:
        name = f" preset {self.preset!r}" if self.preset else ""
        lines = [f"fastvar {self.family}{name}: {self.depth} blocks, ideal FLOP ratio {self.flop_ratio:.3f} "
                 f"({1 / self.flop_ratio:.2f}x fewer FLOPs)",
                 f"{'scale':>5} {'h x w':>9} {'tokens':>7}  {'tokens run per block':<46} {'FLOPs':>6}"]
        for r in self.rows:
            if r.skipped:
                run = "skipped"
            elif r.kept is not None:
                run = f"{r.kept} in {r.pruning_blocks} pruning blocks"
                if r.pruning_blocks < self.depth:
                    run += f", {r.tokens} in the other {self.depth - r.pruning_blocks}"
            else:
                run = f"{r.tokens} (all)" + (", cached" if r.cached else "")
            shape = f"{'text':>9}" if r.text else f"{r.shape[0]:>4}x{r.shape[1]:<4}"
            lines.append(f"{r.index:>5} {shape} {r.tokens:>7}  {run:<46} "
                         f"{r.flops / max(r.baseline_flops, 1):>6.2f}")
        return "\n".join(lines)
