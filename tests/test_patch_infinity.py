"""patch on Infinity: every aspect ratio and size prunes, any batch size, kept K/V only, exact identity."""

from __future__ import annotations

import pytest
import torch
from conftest import attended_keys, random_text, tiny_infinity

import fastvar
import fastvar.models.infinity as infinity_module
from fastvar import FastVARConfig
from fastvar.adapters import find_adapter
from fastvar.adapters.infinity import InfinityAdapter, make_any_block_class, official_layers
from fastvar.models.infinity import scale_schedule


def sample(model, vae, schedule, text, B, **kwargs):
    K = len(schedule)
    return model.autoregressive_infer_cfg(vae, schedule, text, B=B, g_seed=3, cfg_list=[3.0] * K, tau_list=[0.5] * K,
                                          top_k=900, top_p=0.97, vae_type=vae.codebook_dim, **kwargs)


@pytest.mark.parametrize("config", ["none", FastVARConfig(), FastVARConfig(layers=[0])])
def test_config_that_prunes_nothing_is_bit_identical(config):
    model, vae = tiny_infinity()
    schedule, text = scale_schedule(1.333, "0.25M"), random_text([5, 9])
    _, bits, summed = sample(model, vae, schedule, text, B=2)
    fastvar.patch(model, config)
    _, bits_patched, summed_patched = sample(model, vae, schedule, text, B=2)
    assert all(torch.equal(a, b) for a, b in zip(bits, bits_patched)) and torch.equal(summed, summed_patched)


def record_branch_tokens(model):
    """Per block: the token count entering sa, ca and ffn at every call, and the KV cache length after sa."""
    seen = {}
    for layer, block in enumerate(model.unregistered_blocks):
        for name in ("sa", "ca", "ffn"):
            getattr(block, name).register_forward_hook(
                lambda m, args, out, key=(layer, name): seen.setdefault(key, []).append(args[0].shape[1]))
        block.sa.register_forward_hook(
            lambda m, args, out, layer=layer: seen.setdefault((layer, "kv"), []).append(attended_keys(m, args[0])))
    return seen


@pytest.mark.parametrize("h_div_w", [0.5, 1.333])
def test_paper_preset_prunes_and_skips_at_other_aspect_ratios(h_div_w):
    model, vae = tiny_infinity(depth=4)
    schedule = scale_schedule(h_div_w, "1M")
    fastvar.patch(model, "paper")
    seen = record_branch_tokens(model)
    _, bits, _ = sample(model, vae, schedule, random_text([7]), B=1)
    tokens = [h * w for _, h, w in schedule]
    assert len(bits) == len(schedule) - 2
    kept = {9: tokens[9] - int(tokens[9] * 0.4), 10: tokens[10] - int(tokens[10] * 0.5)}
    for layer in range(4):
        run = [kept.get(si, n) if layer == 3 else n for si, n in enumerate(tokens[:11])]
        for name in ("sa", "ca", "ffn"):
            assert seen[layer, name] == run, (layer, name)
        assert seen[layer, "kv"] == [sum(run[: si + 1]) for si in range(11)]
    assert fastvar.summary(model).rows[9].kept == kept[9]


def teacher_forced_logits(model, vae, schedule, text, bits) -> dict[int, torch.Tensor]:
    logits = {}
    sample(model, vae, schedule, text, B=bits[0].shape[0], gt_leak=len(schedule), gt_ls_Bl=bits,
           on_scale_logits=lambda si, lg: logits.__setitem__(si, lg.clone()))
    return logits


def float32_varlen_attention(q, kv, cu_seqlens_k, scale):
    """The official cross-attention without its bf16 rounding, which magnifies the 1e-7 differences of
    batched and single matmuls into near-ties of the pruning scores."""
    bounds, outs = cu_seqlens_k.tolist(), []
    for b in range(q.shape[0]):
        k, v = kv[bounds[b] : bounds[b + 1]].unbind(1)
        outs.append(torch.einsum("hqk,khc->qhc", torch.einsum("qhc,khc->hqk", q[b], k).mul(scale).softmax(-1), v))
    return torch.stack(outs)


def test_batched_rows_match_single_prompts(monkeypatch):
    """Each row selects its own tokens and rotary positions: batching changes nothing per prompt."""
    monkeypatch.setattr(infinity_module, "varlen_attention", float32_varlen_attention)
    model, vae = tiny_infinity(depth=4)
    schedule = scale_schedule(1.333, "0.25M")
    fastvar.patch(model, FastVARConfig(prune={-4: 0.4, -3: 0.5, -2: 0.6}, layers=[1, 3]))
    lens = [4, 11, 6]
    text = random_text(lens, seed=5)
    _, bits, _ = sample(model, vae, schedule, text, B=3)
    logits = teacher_forced_logits(model, vae, schedule, text, bits)
    bounds = text[2].tolist()
    for row in range(3):
        single = (text[0][bounds[row] : bounds[row + 1]], [lens[row]], torch.tensor([0, lens[row]], dtype=torch.int32),
                  lens[row])
        single_logits = teacher_forced_logits(model, vae, schedule, single, [b[row : row + 1] for b in bits])
        for si in range(len(schedule)):
            torch.testing.assert_close(single_logits[si][0], logits[si][row], atol=1e-4, rtol=0)


def test_official_layer_range_scales_with_depth():
    assert [i for i in range(32) if official_layers(i, 32)] == list(range(3, 28))
    assert [i for i in range(6) if official_layers(i, 6)] == [3, 4, 5]
    assert [i for i in range(40) if official_layers(i, 40)] == list(range(4, 34))


def test_schedule_without_the_configured_scales_is_refused():
    model, vae = tiny_infinity(depth=4)
    fastvar.patch(model, FastVARConfig(prune={-9: 0.5}))
    with pytest.raises(ValueError, match="scale position -9 does not exist; this schedule has 7 scales"):
        sample(model, vae, scale_schedule(1.0, "0.06M"), random_text([3]), B=1)


def test_upstream_blocks_get_the_upstream_routing():
    class CrossAttnBlock(torch.nn.Module):  # the upstream block's call signature
        def forward(self, x, cond_BD, ca_kv, attn_bias_or_two_vector, attn_fn=None, scale_schedule=None,
                    rope2d_freqs_grid=None, scale_ind=0):
            return x

    patched = make_any_block_class(CrossAttnBlock)
    assert patched.__name__ == "FastVARUpstreamBlock" and issubclass(patched, CrossAttnBlock)
    model, _ = tiny_infinity(depth=2)
    assert make_any_block_class(type(model.unregistered_blocks[0])).__name__ == "FastVARBlock"


def test_infinity_objects_are_recognised_by_name_and_attributes():
    class Infinity(torch.nn.Module):  # the upstream class name is what is recognised
        unregistered_blocks, lvl_embed, word_embed = [], None, None

        def autoregressive_infer_cfg(self):
            pass

    assert find_adapter(Infinity()) is InfinityAdapter
    del Infinity.word_embed
    with pytest.raises(TypeError, match=r"cannot patch this Infinity: supported families are var .*; infinity"):
        find_adapter(Infinity())


def test_negative_prompt_replaces_the_learned_null_text():
    model, vae = tiny_infinity(depth=2)
    schedule, text = scale_schedule(1.0, "0.06M"), random_text([3, 5])
    null = torch.cat([model.cfg_uncond[:n] for n in text[1]])
    same_as_default = (null, text[1], text[2], text[3])
    summed = sample(model, vae, schedule, text, B=2)[2]
    summed_neg = sample(model, vae, schedule, text, B=2, negative_label_B_or_BLT=same_as_default)[2]
    assert torch.equal(summed, summed_neg)
    other = random_text([3, 5], seed=9)
    _, _, summed_other = sample(model, vae, schedule, text, B=2, negative_label_B_or_BLT=other)
    assert not torch.equal(summed, summed_other)
