"""A patched generation equals FastVAR written out here from the ``fastvar.pruning`` primitives, and every
pruned branch module receives exactly the kept tokens (hooks on the branch modules).

The oracle replaces each family's block forward on an *unpatched* model: per branch it scores the
residual stream entering the branch, gathers the top tokens, runs the branch on them, and fills the
rest from the cache scale's output, area-resized.
"""

from __future__ import annotations

import pytest
import torch
from conftest import hart_text, random_text, tiny_hart, tiny_infinity, tiny_var

import fastvar
from fastvar import FastVARConfig
from fastvar.models.hart import Block
from fastvar.models.infinity import CrossAttnBlock, ada_layer_norm, scale_schedule
from fastvar.models.var import AdaLNSelfAttn
from fastvar.pruning import gather_tokens, restore, select_pivotal


class Oracle:
    """FastVAR's per-branch rule for one resolved schedule and one generation, from the primitives. The
    scale is counted: every scale runs the blocks in order, so the first block starts the next scale."""

    def __init__(self, schedule, blocks):
        self.schedule, self.cache, self.scale = schedule, {}, -1
        self.layer = {id(b): i for i, b in enumerate(blocks)}

    def block_starts(self, block) -> None:
        if self.layer[id(block)] == 0:
            self.scale += 1

    def branch(self, block, name, x, run):
        """``run(tokens, idx)`` is the branch; returns its output over the whole map."""
        s, layer, si = self.schedule, self.layer[id(block)], self.scale
        if layer not in s.layers or s.keep[si] is None:
            out = run(x, None)
            if layer in s.layers and si == s.cache_scale:
                self.cache[layer, name] = out
            return out
        idx = select_pivotal(x, s.keep[si])
        fresh = run(gather_tokens(x, idx), idx)
        return restore(self.cache[layer, name], s.shapes[s.cache_scale], fresh, idx, s.shapes[si])


def record_branch_inputs(blocks, names):
    """Every call's input to the branch modules ``names`` of every block, in call order."""
    seen = []
    for layer, block in enumerate(blocks):
        for name in names:
            getattr(block, name).register_forward_pre_hook(
                lambda m, args, key=(layer, name): seen.append((key, args[0].clone())))
    return seen


def assert_same_calls(patched, oracle, schedule, names):
    """The patched branches got the oracle's inputs call by call, and each call exactly the tokens the
    schedule runs there: the kept count in pruning blocks at pruned scales, all tokens elsewhere."""
    assert [k for k, _ in patched] == [k for k, _ in oracle]
    for (key, a), (_, b) in zip(patched, oracle):
        assert torch.equal(a, b), key
    expected = [schedule.tokens_run(si, layer) for si in range(schedule.executed) for layer in range(schedule.depth)
                for _ in names]
    assert [t.shape[1] for _, t in patched] == expected
    assert any(n < schedule.tokens[-1] for n in expected[-len(names) * schedule.depth:])


# ----------------------------------------------------------------------------- VAR


def var_oracle_forward(oracle):
    def forward(self, x, cond_BD, attn_bias):
        oracle.block_starts(self)
        if self.shared_aln:
            g1, g2, s1, s2, b1, b2 = (self.ada_gss + cond_BD).unbind(2)
        else:
            g1, g2, s1, s2, b1, b2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        x = x + oracle.branch(self, "attn", x, lambda t, idx: self.attn(
            self.ln_wo_grad(t).mul(s1.add(1)).add_(b1), attn_bias=None).mul_(g1))
        return x + oracle.branch(self, "ffn", x, lambda t, idx: self.ffn(
            self.ln_wo_grad(t).mul(s2.add(1)).add_(b2)).mul(g2))
    return forward


@pytest.mark.parametrize("shared_aln", [False, True])
@pytest.mark.parametrize("config", [FastVARConfig(prune={-2: 0.5, -1: 0.75}, layers=[0, 2]),
                                    FastVARConfig(prune={-1: 0.6}, cache_scale=-4)])
def test_var_matches_the_oracle_branch_by_branch(monkeypatch, shared_aln, config):
    patch_nums = (1, 2, 3, 4, 6, 8)
    var = tiny_var(depth=3, patch_nums=patch_nums, shared_aln=shared_aln)

    def generate():
        return var.autoregressive_infer_cfg(B=2, label_B=torch.tensor([3, 9]), g_seed=1, cfg=2.0, top_k=0, top_p=0.0)

    fastvar.patch(var, config)
    schedule = var._fastvar.schedule
    patched_calls = record_branch_inputs(var.blocks, ("attn", "ffn"))
    image = generate()
    fastvar.unpatch(var)
    for block in var.blocks:
        block.attn._forward_pre_hooks.clear()
        block.ffn._forward_pre_hooks.clear()
    monkeypatch.setattr(AdaLNSelfAttn, "forward", var_oracle_forward(Oracle(schedule, var.blocks)))
    oracle_calls = record_branch_inputs(var.blocks, ("attn", "ffn"))
    assert torch.equal(generate(), image)
    assert_same_calls(patched_calls, oracle_calls, schedule, ("attn", "ffn"))


# ----------------------------------------------------------------------------- Infinity


def infinity_oracle_forward(oracle):
    def forward(self, x, cond_BD, ca_kv, rope):
        oracle.block_starts(self)
        g1, g2, s1, s2, b1, b2 = (self.ada_gss + cond_BD).unbind(2)

        def rows(idx):  # each batch row's rotary rows at its kept positions: (2, B, 1, k, D/2)
            return rope if idx is None else torch.stack([rope[:, i] for i in idx], dim=1).unsqueeze(2)

        x = x + oracle.branch(self, "sa", x, lambda t, idx: self.sa(
            ada_layer_norm(t, s1, b1, self.norm_eps), rows(idx)).mul_(g1))
        x = x + oracle.branch(self, "ca", x, lambda t, idx: self.ca(self.ca_norm(t), ca_kv).float())
        return x + oracle.branch(self, "ffn", x, lambda t, idx: self.ffn(
            ada_layer_norm(t, s2, b2, self.norm_eps)).mul(g2))
    return forward


def test_infinity_matches_the_oracle_branch_by_branch(monkeypatch):
    model, vae = tiny_infinity(depth=4)
    schedule, text = scale_schedule(0.5, "0.25M"), random_text([4, 7], seed=2)
    K = len(schedule)

    def generate():
        return model.autoregressive_infer_cfg(vae, schedule, text, B=2, g_seed=3, cfg_list=[3.0] * K,
                                              tau_list=[0.5] * K, top_k=900, top_p=0.97, vae_type=vae.codebook_dim)

    fastvar.patch(model, FastVARConfig(prune={-3: 0.4, -2: 0.5, -1: 0.7}, layers=[1, 3]))
    patched_calls = record_branch_inputs(model.unregistered_blocks, ("sa", "ca", "ffn"))
    _, bits, codes = generate()
    resolved = model._fastvar.schedule
    fastvar.unpatch(model)
    for block in model.unregistered_blocks:
        for name in ("sa", "ca", "ffn"):
            getattr(block, name)._forward_pre_hooks.clear()
    monkeypatch.setattr(CrossAttnBlock, "forward", infinity_oracle_forward(Oracle(resolved, model.unregistered_blocks)))
    oracle_calls = record_branch_inputs(model.unregistered_blocks, ("sa", "ca", "ffn"))
    _, oracle_bits, oracle_codes = generate()
    assert all(torch.equal(a, b) for a, b in zip(bits, oracle_bits)) and torch.equal(codes, oracle_codes)
    assert_same_calls(patched_calls, oracle_calls, resolved, ("sa", "ca", "ffn"))


# ----------------------------------------------------------------------------- HART


def hart_oracle_forward(oracle):
    def forward(self, x, rope):
        oracle.block_starts(self)

        def rows(idx):  # each batch row's rotary rows at its kept positions: (2, B, k, D)
            return rope if idx is None else torch.stack([rope.expand(-1, len(idx), -1, -1)[:, b, i]
                                                         for b, i in enumerate(idx)], dim=1)

        x = x + oracle.branch(self, "attn", x, lambda t, idx: self.attn(self.ln_wo_grad(t), rows(idx)))
        return x + oracle.branch(self, "ffn", x, lambda t, idx: self.ffn(self.ln_wo_grad(t)))
    return forward


@pytest.mark.parametrize("context, config", [
    (6, FastVARConfig(prune={-3: 0.3, -2: 0.5, -1: 0.75}, layers=[1])),
    (1, FastVARConfig(prune={-2: 0.5, -1: 0.75})),  # as many text tokens as the 1x1 map the text stands in for
    (4, FastVARConfig(prune={2: 0.5, -1: 0.75}, cache_scale=1)),  # the text has the cache scale's (2x2) count
    (16, FastVARConfig(prune={3: 0.5, -1: 0.6})),  # the text has the count of the pruned 4x4 scale
], ids=["context-6", "context-1", "context-4", "context-16"])
def test_hart_matches_the_oracle_branch_by_branch(monkeypatch, context, config):
    """Whatever the prompt's token count, the text stage is the text: never pruned nor cached."""
    model = tiny_hart(context_token=context)
    prompt = hart_text([min(2, context), context], seed=1, tokens=context)

    def generate():
        torch.manual_seed(0)  # the diffusion noise
        return model.autoregressive_infer_cfg(**prompt, g_seed=3, cfg=2.5, more_smooth=True)

    unpatched = generate()
    fastvar.patch(model, "none")
    assert torch.equal(generate(), unpatched)
    fastvar.patch(model, config)
    schedule = model._fastvar.schedule
    patched_calls = record_branch_inputs(model.blocks, ("attn", "ffn"))
    image = generate()
    fastvar.unpatch(model)
    for block in model.blocks:
        block.attn._forward_pre_hooks.clear()
        block.ffn._forward_pre_hooks.clear()
    monkeypatch.setattr(Block, "forward", hart_oracle_forward(Oracle(schedule, model.blocks)))
    oracle_calls = record_branch_inputs(model.blocks, ("attn", "ffn"))
    assert torch.equal(generate(), image)
    assert_same_calls(patched_calls, oracle_calls, schedule, ("attn", "ffn"))
    assert schedule.tokens[0] == context and schedule.tokens_run(0, 0) == context
