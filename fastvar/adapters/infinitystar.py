"""FastVAR for InfinityStar (fastvar.models.infinitystar.InfinityStar): spacetime pyramids with repetitions.

A scale is a (t, h, w) map; a step is one run of a scale (the model runs most scales several times). The
sampling loop says which scale and run a block is in (``on_step``). Pruning, the cache scale and repetition
caps are positions within a clip, the same in the image clip and each video clip; skipping and guidance-off
count over the whole call, from its end.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fastvar.adapters.base import Adapter, has_class_named
from fastvar.adapters.infinity import official_layers
from fastvar.config import FastVARConfig
from fastvar.models.infinitystar import OFFICIAL, scale_contexts, scale_schedule, scales_per_clip
from fastvar.models.video_vae import VideoVAE
from fastvar.summary import CostModel

REQUIRED = ("unregistered_blocks", "autoregressive_infer", "word_embed", "semantic_head2")
TYPICAL_PROMPT_TOKENS = 128  # text keys every step attends to, for the FLOP estimate (prompts are rewritten, long)
DEFAULT_CALL = ("infinitystar-8b-720p", 9 / 16, 5)  # the schedule until a call brings its own: 720p 16:9, 5 s


def make_block_class(parent: type) -> type:
    class FastVARBlock(parent):
        """The qwen block with its two branches (attention, SwiGLU) routed through the FastVAR state; each
        selects its pivotal tokens from the residual stream entering it. Attention gets the rotary rows of the
        tokens it runs, and only their keys and values enter the cache. The text pass runs unchanged."""

        def forward(self, x: torch.Tensor, rope: torch.Tensor, store_as: Any, context: Sequence[Any],
                    text_groups: Any) -> torch.Tensor:
            state, layer = self._fastvar, self._fastvar_layer
            si = state.scale_of(x)  # None in the text pass, which runs before the first step
            if si is None or not state.acts_on(si, layer):
                return super().forward(x, rope, store_as, context, text_groups)

            def attention(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
                rows = rope if idx is None else rope[:, idx].unsqueeze(2)  # (2, B, 1, k, D/2): per batch row
                return self.attn(self.input_layernorm(t), rows, store_as, context, text_groups)

            def mlp(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
                return self.mlp(self.post_attention_layernorm(t))

            x = x + state.run_branch(layer, "attn", si, x, attention)
            return x + state.run_branch(layer, "mlp", si, x, mlp)

    return FastVARBlock


def make_root_class(parent: type) -> type:
    class FastVARInfinityStar(parent):
        @torch.no_grad()
        def autoregressive_infer(self, *args, **kwargs):
            """Sampling as unpatched, with the config resolved for this call's schedule and repetitions: each
            step tells the blocks its scale and run, capped repetitions run fewer times, skipped final scales
            are cut with ``trunk_scale`` and scales without guidance run the prompt rows only."""
            state = self._fastvar
            call = inspect.signature(super().autoregressive_infer).bind(*args, **kwargs)
            arguments = call.arguments
            schedule = arguments["scale_schedule"]
            runs = arguments.get("repetitions") or arguments["checkpoint"].repetitions(schedule)
            state.set_shapes(schedule, len(self.unregistered_blocks), **layout(schedule, runs))
            plan = state.schedule
            arguments.update(repetitions=list(plan.repetitions), guided_scales=plan.guided,
                             trunk_scale=min(arguments.get("trunk_scale", 1000), plan.executed))
            on_step = arguments.get("on_step")

            def begin_step(si: int, repetition: int) -> None:
                state.begin_scale(si, repetition)
                if on_step is not None:
                    on_step(si, repetition)
            arguments["on_step"] = begin_step
            with state.sampling():
                return super().autoregressive_infer(*call.args, **call.kwargs)

    return FastVARInfinityStar


def layout(schedule: Sequence[tuple[int, int, int]], repetitions: Sequence[int]) -> dict[str, Any]:
    """What ``FastVARConfig.resolve`` needs beyond the shapes: the clips, the runs per scale, and the earlier
    scales each attends to."""
    return dict(clip_scales=scales_per_clip(schedule), repetitions=list(repetitions),
                references=[c.ref_sids for c in scale_contexts(schedule)])




class InfinityStarAdapter(Adapter):
    family = "infinitystar"
    description = "fastvar's InfinityStar (fastvar.models.infinitystar)"
    default_preset = "default"
    schedule_per_call = True
    no_kv_budgets = ("a scale attends to the text, itself and at most the last scale of the clip before, so its "
                     "cache does not grow with the pyramid (the summary's KV rows); there is nothing to cut")
    presets = {
        # No official InfinityStar schedule exists. At 720p 5 s the last two scales of the video clip hold 61%
        # of the FLOPs and run once each: prune them as HART's official schedule prunes its last two (50%,
        # 75%), in the blocks the official Infinity schedule prunes (3..27 of 32, stretched to the depth).
        "default": FastVARConfig(prune={-2: 0.5, -1: 0.75}, layers=official_layers),
        # Also the third-last scale (14% at 720p, two runs: its second is filled from its first), at 40%.
        "default-prune-3": FastVARConfig(prune={-3: 0.4, -2: 0.5, -1: 0.75}, layers=official_layers),
        # The last scale not run at all (48% at 720p 5 s), the one before pruned.
        "skip-last": FastVARConfig(prune={-2: 0.5}, skip_last=1, layers=official_layers),
        # Fewer repetitions alone: the fourth- and third-last scales run once instead of 3 and 2 times.
        "fewer-repetitions": FastVARConfig(repetitions={-4: 1, -3: 1}),
        "default-fewer-repetitions": FastVARConfig(prune={-2: 0.5, -1: 0.75}, layers=official_layers,
                                                   repetitions={-4: 1, -3: 1}),
        # The default with its last scale run without guidance (the prompt rows only).
        "default-unguided-last": FastVARConfig(prune={-2: 0.5, -1: 0.75}, layers=official_layers,
                                               guidance_off_from=-1),
        "none": FastVARConfig(),
    }

    @staticmethod
    def matches(model: nn.Module) -> bool:
        return has_class_named(model, "InfinityStar") and all(hasattr(model, name) for name in REQUIRED)

    @staticmethod
    def refusal(model: nn.Module) -> str | None:
        """Upstream InfinityStar's model is a class named Infinity with InfinityStar's semantic head."""
        if has_class_named(model, "Infinity") and hasattr(model, "semantic_head2"):
            return ("it is upstream InfinityStar's model, which fastvar does not patch; load the same checkpoint "
                    "into fastvar's key-compatible model (InfinityStarPipeline.from_pretrained, or "
                    "fastvar.models.infinitystar.build() and fastvar.hub.load_checkpoint) and patch that")
        return None

    @staticmethod
    def blocks(model: nn.Module) -> list[nn.Module]:
        return list(model.unregistered_blocks)

    @staticmethod
    def scale_shapes(model: nn.Module) -> list[tuple[int, int, int]]:
        name, h_div_w, duration = DEFAULT_CALL
        return scale_schedule(h_div_w, OFFICIAL[name].size, duration)

    @staticmethod
    def layout(shapes: Sequence[tuple[int, ...]]) -> dict[str, Any]:
        """The clips of ``shapes``, with the repetitions of the official checkpoint whose clips have that many
        scales (one run each otherwise): each call brings its own."""
        schedule = [tuple(s) for s in shapes]
        per_clip = scales_per_clip(schedule)
        official = [o.checkpoint for o in OFFICIAL.values() if len(o.checkpoint.image_scale_repetition) == per_clip]
        return layout(schedule, official[0].repetitions(schedule) if official else [1] * len(schedule))

    @staticmethod
    def cost_model(model: nn.Module) -> CostModel:
        attn = model.unregistered_blocks[0].attn
        return CostModel(width=model.C, mlp_hidden=model.unregistered_blocks[0].mlp.gate_proj.out_features,
                         head_out=2 * model.codebook_dim, mlp_matrices=3, prefix=TYPICAL_PROMPT_TOKENS,
                         kv_width=attn.num_key_value_heads * attn.head_dim)

    @staticmethod
    def decoder(model: nn.Module) -> nn.Module | None:
        return None  # the video VAE is the pipeline's, not the model's

    @classmethod
    def decoder_flops(cls, model: nn.Module, decoder: nn.Module, shapes: Sequence[tuple[int, ...]]) -> float:
        """FLOPs of ``VideoVAE.decode`` on the call's latent (every clip's frames at the last (h, w)), counted on
        a copy built on the meta device (shapes only, nothing computed)."""
        if not isinstance(decoder, VideoVAE):
            raise ValueError(f"the decoder must be the pipeline's VideoVAE (pipe.vae), got a {type(decoder).__name__}")
        per_clip = scales_per_clip(shapes)
        frames = sum(shapes[end - 1][0] for end in range(per_clip, len(shapes) + 1, per_clip))
        with torch.device("meta"):
            meta = VideoVAE(decoder.config)
            latent = torch.empty(1, decoder.config.code_channels, frames, *shapes[-1][1:])
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            meta.decode(latent)
        return float(counter.get_total_flops())

    block_class = staticmethod(make_block_class)
    root_class = staticmethod(make_root_class)
