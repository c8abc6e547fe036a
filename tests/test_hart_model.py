"""fastvar's HART on small random models: the upstream behaviour beyond the public reference case
(batch rows, guidance and sampler schedules, rotary layout, option paths), the block interface the
FastVAR adapter relies on, checkpoint adaptation and refusals."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HART_PATCH_NUMS as PATCH_NUMS
from conftest import HART_TEXT_DIM as TEXT_DIM
from conftest import HART_TEXT_TOKENS as TEXT_TOKENS
from conftest import LLAMA, hart_text, tiny_hart
from conftest import tiny_hart_tokenizer as tiny_tokenizer

import fastvar.models.diffusion as diffusion_module
import fastvar.models.hart as hart_module
from fastvar.hub import load_checkpoint
from fastvar.models.diffusion import DiffusionHead, respaced_timesteps
from fastvar.models.hart import HART, HARTTokenizer, RMSNorm, apply_rope, build, image_rope

text = hart_text


def argmax_sampler(logits, top_k, top_p, rng):
    return logits.argmax(dim=-1)


# ----------------------------------------------------------------------------- sampling behaviour


def test_batch_rows_are_independent(monkeypatch):
    """With deterministic draws every row of a batch is the image its prompt gives alone: per-row
    image positions (prompts of different lengths), CFG halves and diffusion conditions line up."""
    model = tiny_hart()
    monkeypatch.setattr(hart_module, "sample_with_top_k_top_p_", argmax_sampler)
    monkeypatch.setattr(diffusion_module, "draw_normal", lambda shape, device, generator: torch.zeros(shape))
    prompts = text([2, 6], seed=1)
    batch = model.autoregressive_infer_cfg(**prompts, cfg=3.0)
    for b in range(2):
        alone = {k: v[b : b + 1] if torch.is_tensor(v) else 1 for k, v in prompts.items()}
        torch.testing.assert_close(model.autoregressive_infer_cfg(**alone, cfg=3.0), batch[b : b + 1],
                                   atol=1e-5, rtol=0)


def test_guidance_and_sampler_schedules(monkeypatch):
    """Guidance cfg*si/(K-1) with the last scale reusing scale K-2's; scale 0 from the last text row;
    the sampler keeps 600 logits for scales 0..6 and 300 after, whatever top_k says."""
    model, cfg, B = tiny_hart(), 2.5, 2
    raw, handed, kwargs = [], [], []
    get_logits = model.get_logits

    def record_logits(h, cond):
        raw.append(get_logits(h, cond))
        return raw[-1]

    def record_sampler(logits, **kw):
        handed.append(logits.clone())
        kwargs.append(kw)
        return argmax_sampler(logits, **kw)

    monkeypatch.setattr(model, "get_logits", record_logits)
    monkeypatch.setattr(hart_module, "sample_with_top_k_top_p_", record_sampler)
    model.autoregressive_infer_cfg(**text([3, 5]), cfg=cfg, top_k=17, top_p=0.9, g_seed=4, final_stage=1)
    K = len(PATCH_NUMS)
    for si in range(K):
        t = cfg * (min(si, K - 2) / (K - 1))
        expected = (1 + t) * raw[si][:B] - t * raw[si][B:]
        assert torch.equal(handed[si], expected[:, [-1]] if si == 0 else expected), f"guidance at scale {si}"
    assert [kw["top_k"] for kw in kwargs] == [600] * 7 + [300] * (K - 7)
    assert all(kw["top_p"] == 0.9 and kw["rng"] is model.rng for kw in kwargs)


def test_gumbel_draws_follow_each_token_draw_on_the_same_generator(monkeypatch):
    model, calls = tiny_hart(), []
    sample, gumbel = hart_module.sample_with_top_k_top_p_, hart_module.gumbel_softmax

    def record_sample(logits, **kw):
        calls.append(("sample", kw["rng"]))
        return sample(logits, **kw)

    def record_gumbel(logits, tau, rng):
        calls.append(("gumbel", rng, tau))
        return gumbel(logits, tau, rng)

    monkeypatch.setattr(hart_module, "sample_with_top_k_top_p_", record_sample)
    monkeypatch.setattr(hart_module, "gumbel_softmax", record_gumbel)
    model.autoregressive_infer_cfg(**text([4]), g_seed=3, more_smooth=True, final_stage=1)
    K = len(PATCH_NUMS)
    assert [c[0] for c in calls] == ["sample", "gumbel"] * K
    assert all(c[1] is model.rng for c in calls)
    taus = [c[2] for c in calls[1::2]]
    assert taus == [max(0.27 * (1 - min(si, K - 2) / (K - 1) * 0.95), 0.005) for si in range(K)]


def test_more_smooth_off_builds_the_image_from_codebook_rows(monkeypatch):
    model = tiny_hart()
    quant = model.vae_quant_proxy[0]
    idx, maps = [], []
    sample, next_input = hart_module.sample_with_top_k_top_p_, quant.get_next_autoregressive_input

    def record_sample(logits, **kw):
        idx.append(sample(logits, **kw))
        return idx[-1]

    def record_next_input(si, SN, f_hat, h, patch_nums=None):
        maps.append(h.clone())
        return next_input(si, SN, f_hat, h, patch_nums)

    def no_gumbel(*args):
        raise AssertionError("the Gumbel mix is only for more_smooth")

    monkeypatch.setattr(hart_module, "sample_with_top_k_top_p_", record_sample)
    monkeypatch.setattr(hart_module, "gumbel_softmax", no_gumbel)
    monkeypatch.setattr(quant, "get_next_autoregressive_input", record_next_input)
    model.autoregressive_infer_cfg(**text([4, 2]), g_seed=5, more_smooth=False, final_stage=1)
    for si, pn in enumerate(PATCH_NUMS):
        rows = quant.embedding(idx[si]).transpose(1, 2).reshape(2, model.Cvae, pn, pn)
        assert torch.equal(maps[si], rows), f"scale {si}"


def test_final_stage_1_leaves_the_diffusion_head_out(monkeypatch):
    model = tiny_hart()

    def no_diffusion(*args, **kwargs):
        raise AssertionError("final_stage=1 must not run the diffusion head")

    monkeypatch.setattr(model.diffloss, "sample", no_diffusion)
    state = torch.get_rng_state()
    image = model.autoregressive_infer_cfg(**text([3]), g_seed=1, final_stage=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert image.shape == (1, 3, 2 * PATCH_NUMS[-1], 2 * PATCH_NUMS[-1])


def test_diffusion_noise_generator():
    """The diffusion noise comes from torch's global generator unless one is given; the token
    draws from g_seed's generator only."""
    model, prompt = tiny_hart(), text([5])
    torch.manual_seed(11)
    by_global = model.autoregressive_infer_cfg(**prompt, g_seed=2)
    state = torch.get_rng_state()
    by_generator = model.autoregressive_infer_cfg(**prompt, g_seed=2, generator=torch.Generator().manual_seed(11))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(by_global, by_generator)
    torch.manual_seed(12)
    assert not torch.equal(model.autoregressive_infer_cfg(**prompt, g_seed=2), by_global)


def test_text_and_image_positions_per_row(monkeypatch):
    """Image positions start at the last text position id of the row; the unconditional rows (null
    text, all at position 0) start at 0."""
    model, seen = tiny_hart(), {}
    context_rope, rope = hart_module.context_rope, hart_module.image_rope

    def record_context(position_ids, head_dim):
        seen["text"] = position_ids.clone()
        return context_rope(position_ids, head_dim)

    def record_image(pn, final_pn, offsets, head_dim):
        seen["image"] = offsets.clone()
        return rope(pn, final_pn, offsets, head_dim)

    monkeypatch.setattr(hart_module, "context_rope", record_context)
    monkeypatch.setattr(hart_module, "image_rope", record_image)
    prompts = text([2, 5])
    model.autoregressive_infer_cfg(**prompts, final_stage=1)
    ids = prompts["context_position_ids"]
    assert torch.equal(seen["text"], torch.cat((ids, torch.zeros_like(ids))))
    assert seen["image"].tolist() == [1, 4, 0, 0]


def test_image_rope_layout():
    """Unrounded float positions (i, j) / pn * final_pn + offset; the first half of the head holds
    the row angles twice over, the second half the column angles."""
    head_dim, pn, final = 16, 3, 64
    rope = image_rope(pn, final, torch.tensor([8, 0]), head_dim).double()
    freqs = 1.0 / 10000 ** (torch.arange(0, head_dim, 4, dtype=torch.float64) / head_dim)
    for b, offset in enumerate((8, 0)):
        for token in range(pn * pn):
            row, col = token // pn / pn * final + offset, token % pn / pn * final + offset
            angles = torch.cat((row * freqs, row * freqs, col * freqs, col * freqs))
            torch.testing.assert_close(rope[0, b, token], angles.cos(), atol=1e-5, rtol=0)
            torch.testing.assert_close(rope[1, b, token], angles.sin(), atol=1e-5, rtol=0)


def test_rope_pairs_a_row_angle_with_a_column_angle():
    """Channel c and c + head_dim/2 are rotated together, but by the row and the column angle:
    upstream's rotate-half pairing, not a 2-D rotation."""
    head_dim = 16
    rope = image_rope(3, 64, torch.tensor([0]), head_dim)  # token 5: row 1, column 2
    q = torch.zeros(1, 1, 9, head_dim)
    q[..., 0] = 1.0
    out, _ = apply_rope(q, q, rope)
    row, col = 64 / 3, 128 / 3
    assert math.isclose(out[0, 0, 5, 0].item(), math.cos(row), abs_tol=1e-5)
    assert math.isclose(out[0, 0, 5, head_dim // 2].item(), math.sin(col), abs_tol=1e-5)


def test_l2_norm_attention_and_no_context_norm_build_and_run():
    model = tiny_hart(attn_l2_norm=True, use_context_norm=False)
    keys = set(model.state_dict())
    assert "blocks.0.attn.scale_mul_1H11" in keys and "context_norm.weight" not in keys
    image = model.autoregressive_infer_cfg(**text([6, 1]), g_seed=0, more_smooth=True)
    assert image.shape == (2, 3, 18, 18) and image.isfinite().all()

    attn = model.blocks[0].attn
    x = torch.randn(1, 5, 64)
    identity = torch.stack((torch.ones(1, 5, 32), torch.zeros(1, 5, 32)))  # cos 1, sin 0
    q, k, v = torch.nn.functional.linear(x, attn.qkv_proj.weight, torch.cat(
        (attn.q_bias, attn.zero_k_bias, attn.v_bias))).view(1, 5, 3, 2, 32).permute(2, 0, 3, 1, 4)
    temperature = attn.scale_mul_1H11.clamp_max(math.log(100)).exp()
    weights = (torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).transpose(-1, -2))
    expected = ((weights * temperature).softmax(dim=-1) @ v).transpose(1, 2).reshape(1, 5, 64)
    torch.testing.assert_close(attn(x, identity), attn.proj(expected), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the block interface


def test_block_takes_tokens_gathered_per_row_with_their_rope_rows():
    """What the FastVAR adapter does: gather tokens per batch row and hand the attention their
    rotary rows. Any per-row reordering then gives the same outputs, reordered."""
    model = tiny_hart()
    block, L = model.blocks[0], 16
    x = torch.randn(2, L, 64)
    rope = image_rope(4, 9, torch.tensor([3, 0]), model.head_dim)
    order = torch.stack((torch.randperm(L), torch.randperm(L)))  # a different order per row
    rows = torch.arange(2)[:, None]
    torch.testing.assert_close(block(x[rows, order], rope[:, rows, order]), block(x, rope)[rows, order],
                               atol=1e-5, rtol=1e-5)


def test_attention_caches_the_keys_of_the_tokens_it_ran():
    model = tiny_hart()
    attn = model.blocks[1].attn
    rope = image_rope(4, 9, torch.tensor([2, 0]), model.head_dim)
    x = torch.randn(2, 16, 64)
    first, second = torch.arange(6), torch.tensor([9, 7, 15])
    attn.kv_caching(True)
    attn(x[:, first], rope[:, :, first])
    out = attn(x[:, second], rope[:, :, second])
    assert attn.kv_cache.length == attn.kv_cache.k.shape[2] == len(first) + len(second)
    attn.kv_caching(False)
    assert attn.kv_cache is None
    both = torch.cat((first, second))
    torch.testing.assert_close(out, attn(x[:, both], rope[:, :, both])[:, len(first) :], atol=1e-5, rtol=1e-5)


def test_rms_norm_rounds_to_the_input_dtype_before_the_weight():
    norm = RMSNorm(8, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 8).half()
    xf = x.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).half() * norm.weight.half()
    assert norm(x).dtype == torch.float16 and torch.equal(norm(x), expected)


# ----------------------------------------------------------------------------- diffusion head


def test_respaced_timesteps():
    assert respaced_timesteps(1000, "8") == [0, 143, 285, 428, 571, 714, 856, 999]
    assert respaced_timesteps(100, "3,2") == [0, 24, 49, 50, 99]
    with pytest.raises(ValueError, match="ddim8"):
        respaced_timesteps(1000, "ddim8")


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_diffusion_noise_per_guidance(monkeypatch, cfg):
    """With guidance both halves share their initial noise (only epsilon is guided); without it
    (cfg exactly 1, upstream's branch) every row draws its own. One draw per step, the last unused."""
    head = DiffusionHead(4, 16, 32, 1, "5")
    draws = []
    draw = diffusion_module.draw_normal

    def record(shape, device, generator):
        draws.append(tuple(shape))
        return draw(shape, device, generator)

    monkeypatch.setattr(diffusion_module, "draw_normal", record)
    z = torch.randn(6, 16)
    with torch.no_grad():
        sample = head.sample(z, cfg=cfg, generator=torch.Generator().manual_seed(0))
    assert draws == [(3 if cfg != 1 else 6, 4)] + [(6, 4)] * 5
    assert sample.shape == (6, 4)


# ----------------------------------------------------------------------------- checkpoints and options


def test_adapt_state_dict():
    model = tiny_hart()
    state = dict(model.state_dict(), attn_bias_for_masking=torch.zeros(1, 1, 4, 4))
    load_checkpoint(model, state)
    tokenizer = tiny_tokenizer()
    official = {f"vae.{k}": v for k, v in tokenizer.state_dict().items()}
    official["disc.main.0.weight"] = torch.zeros(2, 3, 4, 4)
    official["vae.quantize.ema_vocab_hit_SV"] = torch.zeros(10, 64)  # recorded over another schedule
    adapted = tokenizer.adapt_state_dict(official)
    assert set(adapted) == set(tokenizer.state_dict())
    load_checkpoint(tokenizer, official)


def test_config_rebuilds_the_model():
    model = tiny_hart(attn_l2_norm=True)
    tokenizer = HARTTokenizer(**model.vae_proxy[0].config)
    tokenizer.load_state_dict(model.vae_proxy[0].state_dict())
    twin = HART(tokenizer, **model.config).eval()
    load_checkpoint(twin, model.state_dict())
    prompt = text([3])
    torch.manual_seed(0)
    image = model.autoregressive_infer_cfg(**prompt, g_seed=1, more_smooth=True)
    torch.manual_seed(0)
    assert torch.equal(twin.autoregressive_infer_cfg(**prompt, g_seed=1, more_smooth=True), image)


def test_official_fields_outside_inference_are_accepted():
    tokenizer = tiny_tokenizer()
    HART(tokenizer, context_token=4, context_dim=8, depth=1, embed_dim=64, num_heads=2, patch_nums=(1, 2),
         vae_path="tokenizer", drop_path_rate=0.1, cond_drop_rate=0.1, fused_if_available=True,
         diffusion_batch_mul=4, diffusion_head_repeats=1, context_norm_scale=1.0, model_type="hart_transformer_t2i",
         architectures=["HARTForT2I"], transformers_version="4.46.3", **LLAMA)
    HARTTokenizer(ch=32, ch_mult=(1, 2), quantizer_type="var_hybrid", hybrid=True, levels=[8, 8, 8, 6, 5],
                  disable_quant_resi=False, freeze_codebook_for_hybrid=True, dropout=0.0, beta=0.25)


@pytest.mark.parametrize("option, value", [
    ("attn_type", "gpt2"), ("mlp_type", "gpt2"), ("disable_aln", False), ("shared_aln", True),
    ("use_cross_attn", True), ("use_timestep_embed", True), ("sep_aln_pooling_mode", "avg"), ("sampler", "ddim"),
])
def test_unimplemented_architectures_are_refused(option, value):
    fields = dict(context_token=4, context_dim=8, depth=1, embed_dim=64, num_heads=2, patch_nums=(1, 2), **LLAMA)
    fields[option] = value
    with pytest.raises(ValueError, match=rf"{option}.*{value!r}.*supported.*'llama'"):
        HART(tiny_tokenizer(), **fields)


def test_unknown_fields_and_tokenizer_variants_are_refused():
    with pytest.raises(TypeError, match="unknown HART argument"):
        HART(tiny_tokenizer(), context_token=4, context_dim=8, depth=1, embed_dim=64, num_heads=2, patch_nums=(1, 2),
             dropout_everywhere=0.5, **LLAMA)
    with pytest.raises(ValueError, match="quantizer_type='var'.*supported: quantizer_type='var_hybrid'"):
        HARTTokenizer(ch=32, ch_mult=(1, 2), quantizer_type="var")
    with pytest.raises(ValueError, match="double_decoder=True"):
        HARTTokenizer(ch=32, ch_mult=(1, 2), quantizer_type="var_hybrid", double_decoder=True)


@pytest.mark.parametrize("change, message", [
    (dict(num_maskgit_iters=4), "num_maskgit_iters=4 .*only the one-pass last scale"),
    (dict(final_stage=2), "final_stage=2"),
    (dict(label_B=torch.zeros(1, TEXT_TOKENS + 1, TEXT_DIM)), r"label_B must be .*\(1, 6, 16\)"),
    (dict(B=2), r"label_B must be .*\(2, 6, 16\)"),
    (dict(context_position_ids=None), "context_position_ids is required"),
    (dict(context_mask=None), "context_mask is required"),
    (dict(context_mask=torch.ones(1, 3, dtype=torch.bool)), r"context_mask must have shape \(1, 6\)"),
])
def test_unimplemented_calls_are_refused(change, message):
    model = tiny_hart()
    with pytest.raises(ValueError, match=message):
        model.autoregressive_infer_cfg(**dict(text([3]), **change))


def test_official_architecture():
    model, tokenizer = build(depth=1)
    state = model.state_dict()
    assert state["blocks.0.attn.qkv_proj.weight"].shape == (3 * 1536, 1536)
    assert state["blocks.0.ffn.gate_proj.weight"].shape == (4096, 1536)
    assert state["context_embed.weight"].shape == (1536, 1536) and state["head.weight"].shape == (4096, 1536)
    assert state["lvl_1L"].shape == (1, 300 + sum(pn * pn for pn in hart_module.PATCH_NUMS_1024[1:]))
    assert "diffloss.net.res_blocks.5.mlp.2.weight" in state
    per_block = sum(p.numel() for p in model.blocks[0].parameters())
    total = sum(p.numel() for p in model.parameters()) + 23 * per_block
    assert 0.7e9 < total < 0.75e9  # "HART-0.7B"; its diffusion head alone about 37M
    assert 36e6 < sum(p.numel() for p in model.diffloss.parameters()) < 38e6
    assert tokenizer.quantize.embedding.weight.shape == (4096, 32)
    with pytest.raises(ValueError, match="depth must be in 1..24"):
        build(depth=25)
