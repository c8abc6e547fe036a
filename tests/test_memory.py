"""Exact memory savings: the planned KV cache and the early freeing of cached branch outputs leave every
output bit-identical, and hold what the schedule says."""

from __future__ import annotations

import pytest
import torch
from conftest import hart_text, random_text, tiny_hart, tiny_infinity, tiny_var

import fastvar
from fastvar import FastVARConfig
from fastvar.adapters import find_adapter
from fastvar.models.infinity import scale_schedule
from fastvar.models.kv_cache import KVCache


def var_case():
    var = tiny_var(depth=3, patch_nums=(1, 2, 3, 4, 6, 8))
    return var, [b.attn for b in var.blocks], lambda: var.autoregressive_infer_cfg(
        B=2, label_B=torch.tensor([3, 9]), g_seed=1, cfg=2.0, top_k=0, top_p=0.0), find_adapter(var).scale_shapes(var)


def infinity_case():
    model, vae = tiny_infinity(depth=4)
    schedule, text = scale_schedule(1.0, "0.06M"), random_text([4, 7], seed=2)
    K = len(schedule)
    return model, [b.sa for b in model.unregistered_blocks], lambda: model.autoregressive_infer_cfg(
        vae, schedule, text, B=2, g_seed=3, cfg_list=[3.0] * K, tau_list=[0.5] * K, top_k=900, top_p=0.97,
        vae_type=vae.codebook_dim)[1:], [(h, w) for _, h, w in schedule]


def hart_case():
    model = tiny_hart()

    def generate():
        torch.manual_seed(0)  # the diffusion noise
        return model.autoregressive_infer_cfg(**hart_text([2, 5], seed=1), g_seed=3, cfg=2.5, more_smooth=True)
    return model, [b.attn for b in model.blocks], generate, find_adapter(model).scale_shapes(model)


CASES = {"var": var_case, "infinity": infinity_case, "hart": hart_case}
CUSTOM = FastVARConfig(prune={-3: 0.3, -2: 0.5, -1: 0.75}, layers=[0])


def concatenating_append(self, k, v):
    """The cache as it was: a new concatenation at every scale."""
    if self.k is not None:  # guidance off: the leading rows go on
        k, v = torch.cat((self.k[: k.shape[0]], k), dim=2), torch.cat((self.v[: v.shape[0]], v), dim=2)
    self.k, self.v, self.length = k, v, k.shape[2]
    return k, v


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("family", CASES)
def test_outputs_are_bit_identical_to_the_concatenating_cache_for_every_preset(family, monkeypatch):
    model, _, generate, _ = CASES[family]()
    configs = [None, *fastvar.presets(model), CUSTOM]
    planned = []
    for config in configs:
        if config is not None:
            fastvar.patch(model, config)
        planned.append(generate())
        if config is not None:
            fastvar.unpatch(model)
    monkeypatch.setattr(KVCache, "append", concatenating_append)
    for config, out in zip(configs, planned):
        if config is not None:
            fastvar.patch(model, config)
        assert same(generate(), out), config
        if config is not None:
            fastvar.unpatch(model)


@pytest.mark.parametrize("family", CASES)
@pytest.mark.parametrize("config", [None, CUSTOM, FastVARConfig(prune={-2: 0.5}, skip_last=1)])
def test_each_block_allocates_its_cache_once_for_the_tokens_it_runs(family, config):
    model, attentions, generate, shapes = CASES[family]()
    if config is not None:
        fastvar.patch(model, config)
    buffers = {i: set() for i in range(len(attentions))}
    for i, attn in enumerate(attentions):
        attn.register_forward_hook(lambda m, a, out, i=i: buffers[i].add(
            (m.kv_cache.k.data_ptr(), m.kv_cache.k.shape[2], m.kv_cache.length)))
    generate()
    if config is None:  # every scale but the last, which no later scale reads
        expected = [sum(h * w for h, w in shapes[:-1])] * len(attentions)
    else:
        schedule = model._fastvar.schedule
        expected = [schedule.kv_tokens(layer) for layer in range(len(attentions))]
        assert len(set(expected)) > 1 or config.skip_last  # pruning blocks cache fewer tokens than the others
    for i, attn in enumerate(attentions):
        sizes = {(ptr, size) for ptr, size, _ in buffers[i]}
        assert sizes == {(next(iter(sizes))[0], expected[i])}  # one buffer, sized as planned
        assert max(length for _, _, length in buffers[i]) == expected[i]  # full, and the last scale not stored
        assert attn.kv_cache is None  # freed at the end of the call


def test_cached_branch_outputs_are_freed_after_the_last_pruned_scale():
    var, _, generate, _ = var_case()
    fastvar.patch(var, FastVARConfig(prune={-3: 0.5, -2: 0.5}))
    held = []
    var.blocks[0].register_forward_pre_hook(lambda m, a, kw: held.append(len(var._fastvar._cache)), with_kwargs=True)
    generate()
    cached = 2 * len(var.blocks)  # attention and FFN of every block, stored at the 3x3 scale
    assert held == [0, 0, 0, cached, cached, 0]  # read at 4x4 and 6x6, gone before 8x8


# ----------------------------------------------------------------------------- what summary reports


def counted_flops(fn) -> float:
    """FLOPs torch counts for ``fn``, attention through the math kernel (whose matmuls it sees)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def infinity_64_token_case():
    """Infinity with prompts of the 64 tokens its cost model assumes for cross-attention."""
    model, vae = tiny_infinity(depth=4)
    schedule, text = scale_schedule(1.0, "0.06M"), random_text([64, 64], seed=2)
    K = len(schedule)
    return model, vae, lambda: model.autoregressive_infer_cfg(
        vae, schedule, text, B=2, g_seed=3, cfg_list=[3.0] * K, tau_list=[0.5] * K, top_k=900, top_p=0.97,
        vae_type=vae.codebook_dim, ret_img=True)


SKIPPING = FastVARConfig(prune={-2: 0.5}, skip_last=1)
UNGUIDED = FastVARConfig(prune={-2: 0.5}, guidance_off_from=-2)


@pytest.mark.parametrize("family, config", [("var", "none"), ("var", CUSTOM), ("var", SKIPPING), ("var", UNGUIDED),
                                            ("hart", "none"), ("hart", CUSTOM), ("hart", SKIPPING), ("hart", UNGUIDED),
                                            ("infinity", CUSTOM), ("infinity", UNGUIDED)])
def test_the_flop_model_matches_torchs_flop_counter(family, config):
    if family == "infinity":
        model, vae, generate = infinity_64_token_case()
        decoder = vae.decoder
    else:
        model, _, generate, _ = CASES[family]()
        decoder = None
    fastvar.patch(model, config)
    summary = fastvar.summary(model, batch=2, decoder=decoder)
    if family == "infinity":  # the call's own schedule
        generate()
        summary = fastvar.summary(model, batch=2, decoder=decoder)
    modelled = 2 * (sum(r.flops for r in summary.rows) + summary.decoder_flops)  # per image, 2 images
    assert counted_flops(generate) == pytest.approx(modelled, rel=0.03)


def test_summary_reports_cache_bytes_for_a_batch_and_dtype():
    var, _, _, _ = var_case()
    fastvar.patch(var, FastVARConfig(prune={-2: 0.5, -1: 0.75}))
    one, four_half = fastvar.summary(var), fastvar.summary(var, batch=4, dtype=torch.bfloat16)
    C, depth = var.C, len(var.blocks)
    per_token = 2 * 2 * C * 4  # keys and values, two CFG rows, float32
    tokens = [1, 4, 9, 16, 36, 64]
    kept = [36 - int(36 * 0.5), 64 - int(64 * 0.75)]
    assert [r.baseline_kv_bytes for r in one.rows] == [n * per_token * depth for n in tokens[:-1]] + [0]
    assert [r.kv_bytes for r in one.rows] == [n * per_token * depth for n in tokens[:4] + kept[:1]] + [0]
    assert [r.branch_bytes for r in one.rows] == [0, 0, 0, 0] + [16 * 2 * C * 4 * 2 * depth] * 2
    assert four_half.kv_bytes == one.kv_bytes * 4 // 2 and four_half.branch_bytes == one.branch_bytes * 2
    assert "KV cache" in str(one) and "whole call with the image decoder" in str(one)
    assert one.whole_call_flop_ratio > one.flop_ratio  # the decoder is not accelerated
    with pytest.raises(ValueError, match="batch = 0: must be an int >= 1"):
        fastvar.summary(var, batch=0)
    by_name = fastvar.summary(var, batch=4, dtype="bf16")
    assert by_name.element_size == 2 and by_name.kv_bytes == four_half.kv_bytes
    assert fastvar.summary(var, dtype="fp16").element_size == 2 and fastvar.summary(var, dtype="fp32") == one
    for dtype in (torch.int8, torch.float64, "bfloat16"):
        with pytest.raises(ValueError, match=rf"dtype {dtype!r} is not supported; supported: fp32 \(torch\.float32\), "
                                             r"bf16 \(torch\.bfloat16\), fp16 \(torch\.float16\)"):
            fastvar.summary(var, dtype=dtype)


@pytest.mark.parametrize("decoder, problem", [
    (torch.nn.Linear(2, 2), "a Linear with no Conv2d"),
    (torch.nn.Sequential(torch.nn.Conv2d(8, 4, 3), torch.nn.Linear(5, 5)),
     r"a Sequential that fails on a latent of shape \(1, 8, 8, 8\): .*reduction dim"),
])
def test_summary_refuses_a_decoder_that_does_not_take_the_latent(decoder, problem):
    var, _, _, _ = var_case()
    fastvar.patch(var, "default")
    with pytest.raises(ValueError, match=r"the decoder must be the image decoder that takes the latent \(B, C, h, w\), "
                                         rf"e\.g\. vae\.decoder; got {problem}"):
        fastvar.summary(var, decoder=decoder)
    assert fastvar.summary(var, decoder=var.vae_proxy[0].decoder).decoder_flops > 0


def test_measured_kv_cache_bytes_are_the_summarys():
    var, attentions, generate, _ = var_case()
    fastvar.patch(var, CUSTOM)
    held = []
    attentions[-1].register_forward_hook(lambda m, a, out: held.append(sum(x.kv_cache.nbytes for x in attentions)))
    generate()
    assert held[-1] == fastvar.summary(var, batch=2).kv_bytes
