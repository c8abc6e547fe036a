"""patch / unpatch on VAR: exactness where nothing changes, pruning and skipping where it does."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from conftest import attended_keys, tiny_var
from torch import nn

import fastvar
import fastvar.models.var as var_module
from fastvar import FastVARConfig
from fastvar.adapters import find_adapter
from fastvar.adapters.var import VarAdapter

PATCH_NUMS = (1, 2, 3, 4, 6, 8)


def generate(var, B=2, cfg=1.5, seed=0, **kwargs):
    labels = torch.arange(B) * 7 % 1000
    return var.autoregressive_infer_cfg(B=B, label_B=labels, g_seed=seed, cfg=cfg, top_k=0, top_p=0.0, **kwargs)


@pytest.fixture
def var():
    return tiny_var(depth=3, patch_nums=PATCH_NUMS)


@pytest.mark.parametrize("B, cfg", [(1, 0.0), (2, 2.5), (3, 0.0), (4, 2.5)])
@pytest.mark.parametrize("config", ["none", FastVARConfig(), FastVARConfig(layers=[1])])
def test_config_that_prunes_nothing_is_bit_identical(var, B, cfg, config):
    expected = generate(var, B=B, cfg=cfg)
    fastvar.patch(var, config)
    assert torch.equal(generate(var, B=B, cfg=cfg), expected)


@pytest.mark.parametrize("shared_aln", [False, True])
def test_unpatch_restores_exact_behaviour(shared_aln):
    var = tiny_var(depth=3, patch_nums=PATCH_NUMS, shared_aln=shared_aln)
    classes = [type(m) for m in var.modules()]
    state = {k: v.clone() for k, v in var.state_dict().items()}
    expected = generate(var, more_smooth=True)
    fastvar.patch(var, prune={-2: 0.5, -1: 0.75}, skip_last=0)
    assert var.state_dict().keys() == state.keys()
    assert not torch.equal(generate(var, more_smooth=True), expected)
    fastvar.unpatch(var)
    assert [type(m) for m in var.modules()] == classes
    assert not any("_fastvar" in name for m in var.modules() for name in vars(m))
    assert all(torch.equal(v, state[k]) for k, v in var.state_dict().items())
    assert torch.equal(generate(var, more_smooth=True), expected)


def test_patch_twice_reconfigures_without_stacking(var):
    fastvar.patch(var, prune={-1: 0.5})
    once = generate(var)
    fastvar.patch(var, prune={-1: 0.5})
    assert torch.equal(generate(var), once)
    assert sum(c.__name__.startswith("FastVAR") for c in type(var.blocks[0]).__mro__) == 1
    fastvar.patch(var, FastVARConfig(skip_last=2))
    assert [r.skipped for r in fastvar.summary(var).rows] == [False] * 4 + [True] * 2


def test_deepcopy_is_an_independent_patched_model(var):
    fastvar.patch(var, prune={-2: 0.5, -1: 0.75}, layers=[0, 2])
    expected = generate(var)
    twin = copy.deepcopy(var)
    assert fastvar.is_patched(twin) and twin._fastvar is not var._fastvar
    assert all(b._fastvar is twin._fastvar for b in twin.blocks) and all(b._fastvar is var._fastvar for b in var.blocks)
    assert twin._fastvar.schedule == var._fastvar.schedule
    assert torch.equal(generate(twin), expected)
    fastvar.unpatch(twin)
    assert fastvar.is_patched(var) and all(type(b).__name__ == "FastVARAdaLNSelfAttn" for b in var.blocks)
    assert torch.equal(generate(var), expected)
    unpatched = generate(twin)
    fastvar.patch(twin, FastVARConfig(skip_last=2))
    fastvar.unpatch(var)
    assert torch.equal(generate(var), unpatched) and twin._fastvar.schedule.executed == len(PATCH_NUMS) - 2
    for save in (pickle.dumps, lambda m: torch.save(m, io.BytesIO())):
        with pytest.raises(TypeError, match=r"fastvar-patched VAR cannot be pickled .*call fastvar\.unpatch"):
            save(twin)


def record_attention_calls(var):
    """Per block: (query tokens, cached keys after the call) of every attention call."""
    calls = [[] for _ in var.blocks]
    for layer, block in enumerate(var.blocks):
        block.attn.register_forward_hook(
            lambda m, args, out, layer=layer: calls[layer].append((args[0].shape[1], attended_keys(m, args[0])))
        )
    return calls


def test_pruned_blocks_run_kept_tokens_and_cache_only_their_kv(var):
    fastvar.patch(var, prune={-2: 0.5, -1: 0.75}, layers=[0, 2])
    schedule = var._fastvar.schedule
    calls = record_attention_calls(var)
    generate(var, B=3)
    for layer, per_scale in enumerate(calls):
        run = [schedule.tokens_run(si, layer) for si in range(len(PATCH_NUMS))]
        assert [queries for queries, _ in per_scale] == run
        assert [keys for _, keys in per_scale] == [sum(run[: si + 1]) for si in range(len(run))]
    assert calls[0][-1] == (64 - 48, 1 + 4 + 9 + 16 + 18 + 16) and calls[1][-1] == (64, 130)


def record_tokens(monkeypatch) -> list[torch.Tensor]:
    """The token indices drawn at every scale of the generations that follow."""
    drawn, sample = [], var_module.sample_with_top_k_top_p_

    def recording(*args, **kwargs):
        drawn.append(sample(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(var_module, "sample_with_top_k_top_p_", recording)
    return drawn


def test_scales_up_to_the_cache_scale_are_unchanged(var, monkeypatch):
    def tokens_of(config):
        drawn = record_tokens(monkeypatch)
        if config is not None:
            fastvar.patch(var, config)
        generate(var)
        monkeypatch.undo()
        return drawn

    baseline = tokens_of(None)
    pruned = tokens_of(FastVARConfig(prune={-1: 0.9}))
    assert all(torch.equal(a, b) for a, b in zip(baseline[:-1], pruned[:-1]))
    assert not torch.equal(baseline[-1], pruned[-1])


def accumulated_latent(var, tokens):
    """f_hat of the given scales' tokens, accumulated at the final resolution as the VQVAE does."""
    quant, K, final = var.vae_quant_proxy[0], len(var.patch_nums), var.patch_nums[-1]
    f_hat = torch.zeros(tokens[0].shape[0], var.Cvae, final, final)
    for si, idx in enumerate(tokens):
        pn = var.patch_nums[si]
        h = quant.embedding(idx).transpose(1, 2).reshape(-1, var.Cvae, pn, pn)
        f_hat += quant.phi(si, K)(nn.functional.interpolate(h, size=(final, final), mode="bicubic"))
    return f_hat


@pytest.mark.parametrize("skip", [1, 2])
def test_skipping_decodes_what_earlier_scales_accumulated(var, monkeypatch, skip):
    drawn = record_tokens(monkeypatch)
    fastvar.patch(var, FastVARConfig(skip_last=skip))
    image = generate(var, B=2)
    assert len(drawn) == len(PATCH_NUMS) - skip
    expected = var.vae_proxy[0].fhat_to_img(accumulated_latent(var, drawn)).add(1).mul(0.5)
    torch.testing.assert_close(image, expected, atol=1e-6, rtol=0)
    assert image.shape[-1] == 16 * PATCH_NUMS[-1]


def test_teacher_forced_forward_is_untouched(var):
    labels, x = torch.tensor([3, 4]), torch.randn(2, var.L - 1, var.Cvae)
    var.cond_drop_rate = 0.0
    expected = var(labels, x)
    fastvar.patch(var, prune={-1: 0.5})
    assert torch.equal(var(labels, x), expected)


def test_hooks_survive_patching(var):
    seen = []
    var.blocks[1].register_forward_hook(lambda m, a, kwargs, out: seen.append(kwargs["x"].shape[1]), with_kwargs=True)
    fastvar.patch(var)
    generate(var, B=1)
    fastvar.unpatch(var)
    generate(var, B=1)
    assert seen == [pn * pn for pn in PATCH_NUMS] * 2


def test_summary_reports_pruning_skipping_and_flops(var):
    with pytest.raises(ValueError, match="not patched"):
        fastvar.summary(var)
    fastvar.patch(var, prune={-2: 0.5}, skip_last=1, layers=[0])
    s = fastvar.summary(var)
    assert [r.tokens for r in s.rows] == [pn * pn for pn in PATCH_NUMS]
    assert [r.kept for r in s.rows] == [None] * 4 + [18, None]
    assert [r.skipped for r in s.rows] == [False] * 5 + [True]
    assert s.rows[3].cached and s.rows[4].pruning_blocks == 1 and 0 < s.flop_ratio < 1
    text = str(s)
    assert "18 in 1 pruning block, 36 in the other 2 " in text and "skipped" in text
    assert ": 3 blocks," in text and "for 1 image with guidance" in text
    fastvar.patch(var, prune={-2: 0.5}, layers=[0, 2])
    assert "18 in 2 pruning blocks, 36 in the other 1 " in str(fastvar.summary(var, batch=2))
    assert "for 2 images with guidance" in str(fastvar.summary(var, batch=2))
    assert ": 1 block," in str(fastvar.summary(fastvar.patch(tiny_var(depth=1), "none")))
    fastvar.patch(var, "none")
    assert fastvar.summary(var).flop_ratio == 1.0


def test_unsupported_models_and_configs_raise(var):
    with pytest.raises(TypeError, match=r"cannot patch this Linear: supported families are var \(a class named VAR"):
        fastvar.patch(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"unknown var preset 'paper'; available: "
                                         r"\['default', 'default-unguided-last', 'none'\]"):
        fastvar.patch(var, "paper")
    with pytest.raises(ValueError, match="layer 3 does not exist: the model has 3 blocks"):
        fastvar.patch(var, layers=[3])
    with pytest.raises(ValueError, match="scale position -7 does not exist; this schedule has 6 scales"):
        fastvar.patch(var, prune={-7: 0.5})
    assert not fastvar.is_patched(var)
    with pytest.warns(UserWarning, match="not patched by fastvar"):
        fastvar.unpatch(var)


def test_upstream_shaped_objects_are_recognised_by_name_and_attributes():
    class VAR(nn.Module):  # noqa: N801 - the upstream class name is what is recognised
        patch_nums, vae_proxy = (1, 2), ()
        blocks = nn.ModuleList()

        def autoregressive_infer_cfg(self):
            pass

    assert find_adapter(VAR()) is VarAdapter
    del VAR.vae_proxy
    with pytest.raises(TypeError, match="cannot patch this VAR"):
        find_adapter(VAR())


def upstream_shaped(var: nn.Module) -> nn.Module:
    """An object of the upstream interface sharing ``var``'s modules: a class named VAR (not fastvar's) whose
    own sampling loop, like upstream's, does not say which scale runs."""

    class VAR(nn.Module):  # noqa: N801 - the upstream class name is what is recognised
        get_logits = var_module.VAR.get_logits

        def autoregressive_infer_cfg(self, B, label_B, g_seed=None, cfg=1.5, top_k=0, top_p=0.0, more_smooth=False):
            return var_module.generate(self, B, label_B, g_seed, cfg, top_k, top_p, more_smooth)

    upstream = VAR.__new__(VAR)
    upstream.__dict__.update(var.__dict__)
    return upstream


@pytest.mark.parametrize("config", ["default", FastVARConfig(prune={-3: 0.3, -1: 0.6}, cache_scale=1, layers=[0, 2])])
def test_upstream_loops_scales_are_counted(var, config):
    """The upstream loop does not say which scale runs: the patched root counts its first block's calls.
    (The two objects share their blocks, so one is patched at a time.)"""
    skipping = FastVARConfig(prune={-2: 0.5}, skip_last=1)  # runs fastvar's loop on the upstream object
    expected = [generate(fastvar.patch(var, c)) for c in (config, skipping)]
    fastvar.unpatch(var)
    upstream = fastvar.patch(upstream_shaped(var), config)
    assert type(upstream).__name__ == "FastVARVAR" and upstream._fastvar.scale is None
    assert torch.equal(generate(upstream), expected[0])
    assert upstream._fastvar.scale is None  # forgotten after the call
    assert torch.equal(generate(fastvar.patch(upstream, skipping)), expected[1])
