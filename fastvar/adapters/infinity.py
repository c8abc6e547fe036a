"""FastVAR for Infinity: fastvar.models.infinity.Infinity, or the upstream repo's Infinity object."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from fastvar.adapters.base import Adapter, has_class_named
from fastvar.config import FastVARConfig
from fastvar.models.infinity import TEMPLATE_SCALES, Infinity, SelfAttention, ada_layer_norm
from fastvar.models.kv_cache import reserve_kv
from fastvar.summary import CostModel

REQUIRED = ("unregistered_blocks", "autoregressive_infer_cfg", "lvl_embed", "word_embed")
TYPICAL_PROMPT_TOKENS = 64  # cross-attention keys assumed by the FLOP estimate


def official_layers(layer: int, depth: int) -> bool:
    """The official schedule prunes blocks 3..27 (of Infinity-2B's 32); deeper models scale the range."""
    stretch = max(1.0, depth / 32)
    return 3 * stretch <= layer <= 27 * stretch


def make_block_class(parent: type) -> type:
    class FastVARBlock(parent):
        """The Infinity block with its three branches (self-attention, cross-attention, FFN) each
        routed through the FastVAR state; each selects its own pivotal tokens from the residual stream
        entering it. Self-attention gets the rotary rows of the tokens it runs."""

        def forward(self, x: torch.Tensor, cond_BD: torch.Tensor, ca_kv: tuple, rope: torch.Tensor) -> torch.Tensor:
            state, layer = self._fastvar, self._fastvar_layer
            si = state.scale_of(x)
            if si == 0:  # the cache holds only the tokens this block will run
                reserve_kv(self.sa, state.schedule.kv_tokens(layer))
            if si is None or not state.acts_on(si, layer):
                return super().forward(x, cond_BD, ca_kv, rope)
            gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + cond_BD).unbind(2)

            def self_attention(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
                rows = rope if idx is None else rope[:, idx].unsqueeze(2)  # (2, B, 1, k, D/2): per batch row
                return self.sa(ada_layer_norm(t, scale1, shift1, self.norm_eps), rows).mul_(gamma1)

            def cross_attention(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
                return self.ca(self.ca_norm(t), ca_kv).float()

            def ffn(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
                return self.ffn(ada_layer_norm(t, scale2, shift2, self.norm_eps)).mul(gamma2)

            x = x + state.run_branch(layer, "sa", si, x, self_attention)
            x = x + state.run_branch(layer, "ca", si, x, cross_attention)
            return x + state.run_branch(layer, "ffn", si, x, ffn)

    return FastVARBlock


def make_upstream_block_class(parent: type) -> type:
    class FastVARUpstreamBlock(parent):
        """The upstream repo's CrossAttnBlock, routed like ``FastVARBlock``. Its self-attention slices
        rotary rows from a table keyed by the schedule; for the kept tokens it is handed a table of
        just their rows, one per batch row, read from position 0."""

        def forward(self, x, cond_BD, ca_kv, attn_bias_or_two_vector, attn_fn=None, scale_schedule=None,
                    rope2d_freqs_grid=None, scale_ind=0):
            state, layer = self._fastvar, self._fastvar_layer
            si = state.scale_of(x)
            if si is None or not state.acts_on(si, layer):
                return super().forward(x, cond_BD, ca_kv, attn_bias_or_two_vector, attn_fn, scale_schedule,
                                       rope2d_freqs_grid, scale_ind)
            gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + cond_BD).unbind(2)
            norm = self.fused_norm_func or (lambda C, eps, x, scale, shift: ada_layer_norm(x, scale, shift, eps))
            key = str(tuple(scale_schedule))
            start = sum(t * h * w for t, h, w in scale_schedule[:scale_ind])

            def self_attention(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
                t = norm(C=self.C, eps=self.norm_eps, x=t, scale=scale1, shift=shift1)
                if idx is None:
                    return self.sa(t, None, attn_fn, scale_schedule, rope2d_freqs_grid, scale_ind=scale_ind).mul_(
                        gamma1)
                rows = rope2d_freqs_grid[key].to(t.device)[:, 0, 0, 0, start:][:, idx]  # (2, B, k, D/2)
                return self.sa(t, None, attn_fn, scale_schedule, {key: rows[:, None, :, None]}, scale_ind=0).mul_(
                    gamma1)

            def cross_attention(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
                return self.ca(self.ca_norm(t), ca_kv).float().mul_(self.ca_gamma)

            def ffn(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
                return self.ffn(norm(C=self.C, eps=self.norm_eps, x=t, scale=scale2, shift=shift2)).mul(gamma2)

            x = x + state.run_branch(layer, "sa", si, x, self_attention)
            x = x + state.run_branch(layer, "ca", si, x, cross_attention)
            return x + state.run_branch(layer, "ffn", si, x, ffn)

    return FastVARUpstreamBlock


def make_any_block_class(parent: type) -> type:
    """The upstream block takes the schedule and a rotary table; fastvar's takes its rotary rows."""
    upstream = "rope2d_freqs_grid" in inspect.signature(parent.forward).parameters
    return (make_upstream_block_class if upstream else make_block_class)(parent)


def make_root_class(parent: type) -> type:
    class FastVARInfinity(parent):
        @torch.no_grad()
        def autoregressive_infer_cfg(self, *args, **kwargs):
            """Sampling as unpatched, with the config resolved for this call's schedule. Skipped final
            scales are cut with the official ``trunk_scale``: the image is decoded from the codes the
            earlier scales accumulated. fastvar's Infinity says which scale runs; the upstream object's
            scales are counted."""
            state, own = self._fastvar, isinstance(self, Infinity)
            call = inspect.signature(super().autoregressive_infer_cfg).bind(*args, **kwargs)
            schedule = call.arguments["scale_schedule"]
            state.set_shapes([(h, w) for _, h, w in schedule], len(self.unregistered_blocks))
            call.arguments["trunk_scale"] = min(call.arguments.get("trunk_scale", 1000), state.schedule.executed)
            if state.schedule.guided < len(schedule):
                if not own:
                    raise ValueError("turning guidance off at late scales needs fastvar's Infinity "
                                     "(fastvar.models.infinity); the upstream object cannot drop the CFG rows")
                call.arguments["guided_scales"] = state.schedule.guided
            if own:
                call.arguments["on_scale"] = state.begin_scale
            with state.sampling(count_calls_of=None if own else self.unregistered_blocks[0]):
                return super().autoregressive_infer_cfg(*call.args, **call.kwargs)

    return FastVARInfinity


class InfinityAdapter(Adapter):
    family = "infinity"
    description = "a class named Infinity with " + ", ".join(REQUIRED)
    default_preset = "paper"
    schedule_per_call = True
    presets = {
        # The official FastVAR Infinity code, on the 13-scale (1M) schedules: prune 40% / 50% at the
        # 32x32 and 40x40 scales of the square template in blocks 3..27, cache 24x24, skip 48x48 and 64x64.
        "paper": FastVARConfig(prune={-4: 0.4, -3: 0.5}, skip_last=2, layers=official_layers),
        # Its pruning alone: every scale runs, so the gain is the pruning's only.
        "prune-only": FastVARConfig(prune={-4: 0.4, -3: 0.5}, layers=official_layers),
        # Its skipping alone ("100% pruning" of the last two scales).
        "skip-only": FastVARConfig(skip_last=2),
        # Not official: the paper's schedule with its last executed scale (40x40) run without guidance.
        "paper-unguided-last": FastVARConfig(prune={-4: 0.4, -3: 0.5}, skip_last=2, layers=official_layers,
                                             guidance_off_from=-3),
        # The official ScaleKV budget (10% of the cache) of the model's depth: Infinity-2B's or -8B's file.
        "scalekv-10": FastVARConfig(kv_budget="scalekv-10"),
        # Not official: the paper's schedule with that budget on its KV cache.
        "paper-scalekv-10": FastVARConfig(prune={-4: 0.4, -3: 0.5}, skip_last=2, layers=official_layers,
                                          kv_budget="scalekv-10"),
        "none": FastVARConfig(),
    }

    @staticmethod
    def matches(model: nn.Module) -> bool:
        return has_class_named(model, "Infinity") and all(hasattr(model, name) for name in REQUIRED)

    @staticmethod
    def blocks(model: nn.Module) -> list[nn.Module]:
        return list(model.unregistered_blocks)

    @staticmethod
    def scale_shapes(model: nn.Module) -> list[tuple[int, int]]:
        return list(TEMPLATE_SCALES[1.0])  # until a call brings its own schedule: the square 1M one

    @staticmethod
    def cost_model(model: nn.Module) -> CostModel:
        block = model.unregistered_blocks[0]
        return CostModel(width=model.C, mlp_hidden=block.ffn.fc1.out_features, head_out=model.V,
                         context=TYPICAL_PROMPT_TOKENS, branches=3)

    @staticmethod
    def decoder(model: nn.Module) -> nn.Module | None:
        return None  # the VAE is passed to each sampling call, not held by the model

    @staticmethod
    def latent_shape(model: nn.Module, last_scale: tuple[int, int]) -> tuple[int, int]:
        factor = 2 if getattr(model, "apply_spatial_patchify", 0) else 1  # the 8B's tokens are 2x2 latent pixels
        return last_scale[0] * factor, last_scale[1] * factor

    @staticmethod
    def attention(block: nn.Module) -> nn.Module:
        return block.sa

    block_class = staticmethod(make_any_block_class)
    root_class = staticmethod(make_root_class)
    attention_module = SelfAttention
