"""FastVAR for VAR (fastvar.models.var.VAR or the upstream repo's VAR object)."""

from __future__ import annotations

import torch
from torch import nn

from fastvar.adapters.base import Adapter, has_class_named
from fastvar.config import FastVARConfig
from fastvar.models.kv_cache import reserve_kv
from fastvar.models.var import VAR, SelfAttention, generate
from fastvar.summary import CostModel

REQUIRED = ("patch_nums", "blocks", "autoregressive_infer_cfg", "vae_proxy")


def ada_ln_chunks(block: nn.Module, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """gamma1, gamma2, scale1, scale2, shift1, shift2 of an AdaLN block, as upstream computes them."""
    if block.shared_aln:
        return (block.ada_gss + cond).unbind(2)
    return block.ada_lin(cond).view(-1, 1, 6, block.C).unbind(2)


def make_block_class(parent: type) -> type:
    class FastVARBlock(parent):
        """The VAR block with each branch routed through the FastVAR state. Calls outside sampling (the
        teacher-forced pass) and scales the schedule leaves alone run the original forward."""

        def forward(self, x: torch.Tensor, cond_BD: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
            state, layer = self._fastvar, self._fastvar_layer
            si = state.scale_of(x)
            if si == 0:  # the cache holds only the tokens this block will run
                reserve_kv(self.attn, state.schedule.kv_tokens(layer))
            if si is None or not state.acts_on(si, layer):
                return super().forward(x, cond_BD, attn_bias)
            gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_ln_chunks(self, cond_BD)

            def attention(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
                return self.attn(self.ln_wo_grad(t).mul(scale1.add(1)).add_(shift1), attn_bias=None).mul_(gamma1)

            def ffn(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
                return self.ffn(self.ln_wo_grad(t).mul(scale2.add(1)).add_(shift2)).mul(gamma2)

            x = x + state.run_branch(layer, "attn", si, x, attention)
            return x + state.run_branch(layer, "ffn", si, x, ffn)

    return FastVARBlock


def make_root_class(parent: type) -> type:
    class FastVARVAR(parent):
        @torch.no_grad()
        def autoregressive_infer_cfg(self, *args, **kwargs) -> torch.Tensor:
            """Sampling as unpatched; skipped final scales are not run and the image is decoded
            from what the earlier scales accumulated; scales without guidance run the conditional rows.
            An upstream object that needs neither runs its own loop, whose scales are counted."""
            state, schedule, K = self._fastvar, self._fastvar.schedule, len(self.patch_nums)
            if not isinstance(self, VAR) and schedule.executed == K and schedule.guided == K:
                with state.sampling(count_calls_of=self.blocks[0]):
                    return super().autoregressive_infer_cfg(*args, **kwargs)
            with state.sampling():
                return generate(self, *args, num_scales=schedule.executed, guided_scales=schedule.guided,
                                on_scale=state.begin_scale, **kwargs)

    return FastVARVAR


class VarAdapter(Adapter):
    family = "var"
    description = "a class named VAR with " + ", ".join(REQUIRED)
    presets = {
        # No official VAR schedule exists: prune the last two scales as the official Infinity
        # schedule prunes its last two executed ones (40% and 50%), keep every scale.
        "default": FastVARConfig(prune={-2: 0.4, -1: 0.5}),
        # Not official: the same pruning, and the last scale run without guidance (the conditional rows only).
        "default-unguided-last": FastVARConfig(prune={-2: 0.4, -1: 0.5}, guidance_off_from=-1),
        "none": FastVARConfig(),
    }

    @staticmethod
    def matches(model: nn.Module) -> bool:
        return has_class_named(model, "VAR") and all(hasattr(model, name) for name in REQUIRED)

    @staticmethod
    def blocks(model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    @staticmethod
    def scale_shapes(model: nn.Module) -> list[tuple[int, int]]:
        return [(pn, pn) for pn in model.patch_nums]

    @staticmethod
    def cost_model(model: nn.Module) -> CostModel:
        return CostModel(width=model.C, mlp_hidden=model.blocks[0].ffn.fc1.out_features, head_out=model.V)

    block_class = staticmethod(make_block_class)
    root_class = staticmethod(make_root_class)
    attention_module = SelfAttention
