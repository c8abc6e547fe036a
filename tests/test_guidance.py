"""Guidance off at late scales (``guidance_off_from``): what it means for each family, its draws, and how it
composes with pruning and skipping."""

from __future__ import annotations

import pytest
import torch
from conftest import hart_text, random_text, tiny_hart, tiny_infinity, tiny_var

import fastvar
import fastvar.models.var
from fastvar import FastVARConfig
from fastvar.models.infinity import scale_schedule
from fastvar.models.sampling import recording_draws

PATCH_NUMS = (1, 2, 3, 4, 6, 8)


def var_generate(var, cfg=2.0):
    with recording_draws() as draws:
        image = var.autoregressive_infer_cfg(B=2, label_B=torch.tensor([3, 9]), g_seed=1, cfg=cfg, top_k=0, top_p=0.0,
                                             more_smooth=True)
    return image, draws


def with_config(model, config, run):
    fastvar.patch(model, config)
    try:
        return run()
    finally:
        fastvar.unpatch(model)


def test_var_without_guidance_everywhere_is_guidance_weight_zero():
    var = tiny_var(depth=2, patch_nums=PATCH_NUMS)
    image, draws = with_config(var, FastVARConfig(guidance_off_from=0), lambda: var_generate(var))
    zero_image, zero_draws = var_generate(var, cfg=0.0)
    assert all(torch.equal(a, b) for a, b in zip(draws, zero_draws))
    torch.testing.assert_close(image, zero_image, atol=5e-5, rtol=0)  # a half batch rounds differently


def test_var_guidance_off_late_keeps_the_guided_scales_and_halves_the_rows_after(monkeypatch):
    var = tiny_var(depth=2, patch_nums=PATCH_NUMS)
    guided_image, guided_draws = var_generate(var)
    rows = []
    var.blocks[0].register_forward_pre_hook(lambda m, a, kw: rows.append(kw["x"].shape[0]), with_kwargs=True)
    image, draws = with_config(var, FastVARConfig(guidance_off_from=-2), lambda: var_generate(var))
    assert rows == [4, 4, 4, 4, 2, 2]  # B = 2 with CFG's doubled rows, then the conditional rows alone
    assert all(torch.equal(a, b) for a, b in zip(draws[:4], guided_draws[:4]))
    assert not torch.equal(draws[-1], guided_draws[-1]) and not torch.equal(image, guided_image)


def test_var_upstream_objects_refuse_guidance_off(monkeypatch):
    var = tiny_var(depth=2, patch_nums=PATCH_NUMS)
    monkeypatch.setattr(fastvar.models.var, "SelfAttention", type("UpstreamAttention", (torch.nn.Module,), {}))
    with pytest.raises(ValueError, match="needs fastvar's VAR"):
        with_config(var, FastVARConfig(guidance_off_from=-1), lambda: var_generate(var))


def test_infinity_guidance_off_is_the_official_cfg_one_path_at_those_scales():
    model, vae = tiny_infinity(depth=4)
    schedule, text = scale_schedule(1.0, "0.06M"), random_text([4, 7], seed=2)
    K = len(schedule)

    def generate(cfg_list):
        return model.autoregressive_infer_cfg(vae, schedule, text, B=2, g_seed=3, cfg_list=cfg_list, tau_list=[0.5] * K,
                                              top_k=900, top_p=0.97, vae_type=vae.codebook_dim)

    _, bits, codes = with_config(model, FastVARConfig(guidance_off_from=-3), lambda: generate([3.0] * K))
    _, cfg_one_bits, cfg_one_codes = generate([3.0] * (K - 3) + [1.0] * 3)  # both halves run, cfg 1 late
    assert all(torch.equal(a, b) for a, b in zip(bits, cfg_one_bits))
    torch.testing.assert_close(codes, cfg_one_codes, atol=1e-5, rtol=0)


def hart_generate(model, cfg=2.5):
    torch.manual_seed(0)  # the diffusion noise
    with recording_draws() as draws:
        image = model.autoregressive_infer_cfg(**hart_text([2, 5], seed=1), g_seed=3, cfg=cfg, more_smooth=False)
    return image, draws


def test_hart_without_guidance_draws_what_guidance_weight_zero_draws():
    """The token sampler and the diffusion head consume the generators as with guidance, so turning it off
    everywhere gives the image of guidance weight 0 (diffusion noise included)."""
    model = tiny_hart()
    image, draws = with_config(model, FastVARConfig(guidance_off_from=0), lambda: hart_generate(model))
    zero_image, zero_draws = hart_generate(model, cfg=0.0)
    assert all(torch.equal(a, b) for a, b in zip(draws, zero_draws))
    torch.testing.assert_close(image, zero_image, atol=1e-4, rtol=0)


def test_composes_with_pruning_and_skipping():
    var = tiny_var(depth=3, patch_nums=PATCH_NUMS)
    config = FastVARConfig(prune={-3: 0.5, -2: 0.5}, skip_last=1, guidance_off_from=-3)
    kept = []
    for block in var.blocks:
        block.ffn.register_forward_pre_hook(lambda m, a: kept.append(tuple(a[0].shape[:2])))
    fastvar.patch(var, config)
    summary = fastvar.summary(var)
    var_generate(var)
    assert kept[-6:] == [(2, 8)] * 3 + [(2, 18)] * 3  # kept tokens of the 2 conditional rows at 4x4 and 6x6
    assert [r.guided for r in summary.rows] == [True, True, True, False, False, False]
    assert "guidance off from scale 3" in str(summary) and "no guidance" in str(summary)
    pruned_only = fastvar.summary(fastvar.patch(var, config.replace(guidance_off_from=None)))
    assert summary.flop_ratio < pruned_only.flop_ratio == pytest.approx(summary.flop_ratio_with_guidance)
    assert f"with guidance kept the ratio would be {pruned_only.flop_ratio:.3f}" in str(summary)
    assert [r.flops for r in summary.rows[3:5]] == [r.flops / 2 for r in pruned_only.rows[3:5]]
    fastvar.unpatch(var)


def test_guidance_off_at_a_skipped_scale_is_refused():
    var = tiny_var(depth=2, patch_nums=PATCH_NUMS)
    with pytest.raises(ValueError, match="guidance_off_from=-1 .index 5. is a skipped scale"):
        fastvar.patch(var, FastVARConfig(skip_last=1, guidance_off_from=-1))
