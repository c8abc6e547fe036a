"""fastvar's BSQ-VAE reproduces the unmodified upstream Infinity tokenizer on the reference set."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import InfinityReference, load_reference, reference_cases, reference_sets

from fastvar.hub import load_checkpoint
from fastvar.models.bsq_vae import BSQVAE, official_vae


@pytest.fixture(params=reference_sets("infinity"))
def reference(request) -> InfinityReference:
    return load_reference(InfinityReference, request.param)


def summed_codes_from_bits(vae: BSQVAE, outputs: dict[str, torch.Tensor], case: dict) -> torch.Tensor:
    """Accumulate the stored bits of every scale as upstream's sampling loop does, in scale order."""
    final = case["vae_scale_schedule"][-1]
    summed = 0
    for si, (_, h, w) in enumerate(case["vae_scale_schedule"]):
        codes = vae.bits_to_codes(outputs[f"{case['name']}.bits.{si}"])
        assert codes.shape == (case["B"], vae.codebook_dim, 1, h, w)
        summed = summed + (codes if si == len(case["vae_scale_schedule"]) - 1
                           else F.interpolate(codes, size=final, mode="trilinear"))
    return summed


def test_loads_the_upstream_state_dict_strictly(reference):
    vae = reference.build_vae()
    own = vae.state_dict()
    assert own.keys() == reference.vae_state.keys()
    for key, value in reference.vae_state.items():
        assert own[key].shape == value.shape and own[key].dtype == value.dtype, key
        torch.testing.assert_close(own[key], value, atol=0, rtol=0)
    d = vae.codebook_dim
    assert torch.equal(vae.quantize.lfq.mask, 2 ** torch.arange(d - 1, -1, -1))

    vae.load_state_dict(reference.vae_state, strict=True)  # plain torch agrees
    without_masks = {k: v for k, v in reference.vae_state.items() if k not in BSQVAE.derived_buffers}
    load_checkpoint(vae, without_masks)  # the masks are rebuilt, not required


def test_missing_key_is_named(reference):
    state = dict(reference.vae_state)
    del state["decoder.up.3.block.0.nin_shortcut.conv.weight"]
    with pytest.raises(ValueError, match=r"missing keys: .*decoder\.up\.3\.block\.0\.nin_shortcut\.conv\.weight"):
        load_checkpoint(reference.build_vae(), state)


@pytest.mark.parametrize("set_dir, case", reference_cases("infinity"))
def test_summed_codes_from_bits_match_upstream_exactly(set_dir, case):
    reference = load_reference(InfinityReference, set_dir)
    vae = reference.build_vae()
    summed = summed_codes_from_bits(vae, reference.outputs, case)
    torch.testing.assert_close(summed.squeeze(2), reference.outputs[f"{case['name']}.summed_codes"], atol=0, rtol=0)


def test_decode_matches_upstream_image(reference):
    vae = reference.build_vae()
    decoded = [case for case in reference.cases if f"{case['name']}.image" in reference.outputs]
    for case in decoded:
        summed = reference.outputs[f"{case['name']}.summed_codes"]
        image = vae.decode(summed)
        _, h, w = case["vae_scale_schedule"][-1]
        assert image.shape == (case["B"], 3, h * vae.patch_size, w * vae.patch_size)
        torch.testing.assert_close((image + 1) / 2, reference.outputs[f"{case['name']}.image"], atol=1e-5, rtol=0,
                                   msg=lambda m, name=case["name"]: f"case {name}: {m}")
    # The transformer's accumulator keeps the time axis (B, d, 1, H, W); the decoder is convolutional,
    # so a corner of the latent suffices to check that both shapes decode alike.
    corner = reference.outputs[f"{reference.cases[0]['name']}.summed_codes"][..., :4, :4]
    torch.testing.assert_close(vae.decode(corner.unsqueeze(2)), vae.decode(corner), atol=0, rtol=0)


def test_encoder_downsamples_by_patch_size(reference):
    torch.set_num_threads(2)
    vae = reference.build_vae()
    latent = vae.encoder(torch.rand(1, 3, 4 * vae.patch_size, 2 * vae.patch_size) * 2 - 1)
    assert latent.shape == (1, vae.codebook_dim, 4, 2)


@pytest.mark.parametrize("dim", [14, 16, 32])
def test_bits_to_codes_follows_the_upstream_formula(dim):
    vae = BSQVAE(codebook_dim=dim, patch_size=1, base_ch=32, ch_mult=(1,), num_res_blocks=1)
    bits = torch.randint(0, 2, (2, 3, 5, dim), generator=torch.Generator().manual_seed(dim))
    codes = vae.bits_to_codes(bits)
    assert codes.shape == (2, dim, 1, 3, 5) and codes.dtype == torch.float32
    # upstream: bits * s * 2 - s with s = 1/sqrt(d), then an l2 normalization over the bits
    scale = 1 / math.sqrt(dim)
    expected = F.normalize(bits * scale * 2 - scale, dim=-1).permute(0, 3, 1, 2).unsqueeze(2)
    torch.testing.assert_close(codes, expected, atol=0, rtol=0)
    assert torch.equal(codes > 0, bits.permute(0, 3, 1, 2).unsqueeze(2).bool())
    torch.testing.assert_close(codes.abs(), torch.full_like(codes, scale), atol=1e-7, rtol=0)


def test_spatial_patchify_unpacks_2x2_blocks():
    dim = 3
    vae = BSQVAE(codebook_dim=dim, patch_size=1, base_ch=32, ch_mult=(1,), num_res_blocks=1, spatial_patchify=True)
    assert vae.bits_per_token == 4 * dim
    bits = torch.randint(0, 2, (2, 3, 5, 4 * dim), generator=torch.Generator().manual_seed(0))
    codes = vae.bits_to_codes(bits)
    assert codes.shape == (2, dim, 1, 6, 10)
    # token (i, j), bit c*4 + a*2 + b is latent channel c at position (2i + a, 2j + b) (pixel shuffle)
    unpacked = bits.view(2, 3, 5, dim, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, dim, 6, 10)
    assert torch.equal(codes[:, :, 0] > 0, unpacked.bool())
    with pytest.raises(ValueError, match=r"\(B, h, w, 12\)"):
        vae.bits_to_codes(bits[..., :dim])


@pytest.mark.parametrize(
    "codebook_dim, spatial_patchify, bits, patch, keys, params",
    [
        (32, False, 32, 16, 270, 110_118_051),  # Infinity-2B: infinity_vae_d32reg.pth
        (14, True, 56, 8, 226, 81_624_209),  # Infinity-8B: infinity_vae_d56_f8_14_patchify.pth
    ],
)
def test_official_architectures(codebook_dim, spatial_patchify, bits, patch, keys, params):
    # key and parameter counts of upstream's vae_model(...) as load_visual_tokenizer builds it
    with torch.device("meta"):
        vae = official_vae(codebook_dim, spatial_patchify=spatial_patchify)
    assert (vae.bits_per_token, vae.patch_size) == (bits, patch)
    assert len(vae.state_dict()) == keys
    assert sum(p.numel() for p in vae.parameters()) == params


def test_plain_conv_and_norm_key_spelling_is_adapted(reference):
    vae = reference.build_vae()
    plain = {k.replace(".conv.", ".").replace(".norm.", "."): v for k, v in reference.vae_state.items()}
    assert plain.keys() != reference.vae_state.keys()
    fresh = BSQVAE(**vae.config)
    load_checkpoint(fresh, plain)  # load_checkpoint applies adapt_state_dict
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in reference.vae_state.items())
