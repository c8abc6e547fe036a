"""FastVAR for HART (fastvar.models.hart.HART)."""

from __future__ import annotations

import torch
from torch import nn

from fastvar.adapters.base import Adapter, has_class_named
from fastvar.config import FastVARConfig
from fastvar.models.hart import SelfAttention, generate
from fastvar.models.kv_cache import reserve_kv
from fastvar.summary import CostModel

REQUIRED = ("patch_nums", "blocks", "context_token", "diffloss", "autoregressive_infer_cfg")


def gather_rope(rope: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The rotary rows (2, B, k, D) of the kept tokens ``idx`` (B, k) of each batch row, from a table
    (2, B or 1, L, D) of the whole map."""
    rope = rope.expand(-1, idx.shape[0], -1, -1)
    return rope.gather(2, idx[None, :, :, None].expand(2, -1, -1, rope.shape[-1]))


def make_block_class(parent: type) -> type:
    class FastVARBlock(parent):
        """The HART block with its two branches (attention, FFN) each routed through the FastVAR state;
        each selects its tokens from the residual stream entering it, before the shared RMSNorm.
        Attention gets the rotary rows of the tokens it runs, per batch row."""

        def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
            state, layer = self._fastvar, self._fastvar_layer
            si = state.scale_of(x)
            if si == 0:  # the cache holds only the tokens this block will run
                reserve_kv(self.attn, state.schedule.kv_tokens(layer))
            if si is None or not state.acts_on(si, layer):
                return super().forward(x, rope)

            def attention(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
                return self.attn(self.ln_wo_grad(t), rope if idx is None else gather_rope(rope, idx))

            def ffn(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
                return self.ffn(self.ln_wo_grad(t))

            x = x + state.run_branch(layer, "attn", si, x, attention)
            return x + state.run_branch(layer, "ffn", si, x, ffn)

    return FastVARBlock


def make_root_class(parent: type) -> type:
    class FastVARHART(parent):
        @torch.no_grad()
        def autoregressive_infer_cfg(self, *args, **kwargs) -> torch.Tensor:
            """Sampling as unpatched; skipped final scales are not run (nor the diffusion head, which
            belongs to the last scale) and the image is decoded from what the earlier scales accumulated."""
            state = self._fastvar
            with state.sampling():
                return generate(self, *args, num_scales=state.schedule.executed, guided_scales=state.schedule.guided,
                                on_scale=state.begin_scale, **kwargs)

    return FastVARHART


def diffusion_flops(model: nn.Module) -> float:
    """FLOPs of the diffusion head per last-scale token and CFG row: every linear layer of its MLP once per
    sampling step."""
    head = model.diffloss
    weights = sum(m.weight.numel() for m in head.net.modules() if isinstance(m, nn.Linear))
    return 2 * weights * len(head.sampler.timestep_map)


class HartAdapter(Adapter):
    family = "hart"
    description = "a class named HART with " + ", ".join(REQUIRED)
    default_preset = "paper"
    text_scales = 1  # scale 0 is the prompt's context_token text tokens
    presets = {
        # The official FastVAR HART code: prune 50% of the 48x48 scale and 75% of the 64x64 one (the last two
        # of the 1024 px schedule) in every block, both branches; cache the 36x36 scale's outputs.
        "paper": FastVARConfig(prune={-2: 0.5, -1: 0.75}),
        # Not official: the paper's pruning of the 48x48 scale, and the 64x64 scale (with the diffusion head
        # that refines it) skipped.
        "skip-last": FastVARConfig(prune={-2: 0.5}, skip_last=1),
        # Not official: the paper's pruning, and the 64x64 scale (diffusion head included) without guidance.
        "paper-unguided-last": FastVARConfig(prune={-2: 0.5, -1: 0.75}, guidance_off_from=-1),
        "none": FastVARConfig(),
    }

    @staticmethod
    def matches(model: nn.Module) -> bool:
        return has_class_named(model, "HART") and all(hasattr(model, name) for name in REQUIRED)

    @staticmethod
    def blocks(model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    @staticmethod
    def scale_shapes(model: nn.Module) -> list[tuple[int, int]]:
        return [(1, model.context_token)] + [(pn, pn) for pn in model.patch_nums[1:]]

    @staticmethod
    def cost_model(model: nn.Module) -> CostModel:
        return CostModel(width=model.C, mlp_hidden=model.blocks[0].ffn.up_proj.out_features, head_out=model.V,
                         mlp_matrices=3, last_scale_per_token=diffusion_flops(model))

    block_class = staticmethod(make_block_class)
    root_class = staticmethod(make_root_class)
    attention_module = SelfAttention
    query_projection = "qkv_proj"
