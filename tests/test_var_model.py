"""fastvar's VAR definition: the official architectures' layout, encoding, sampling edge cases."""

from __future__ import annotations

import pytest
import torch
from conftest import VarReference, load_reference, reference_root, tiny_var

from fastvar.models.var import PATCH_NUMS_512, build, sample_with_top_k_top_p_


def shapes(state_dict):
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def test_build_matches_the_reference_state_dict_layout():
    """build(2) is the public reference's depth-2 VAR (width 128, 2 heads): same keys, shapes and dtypes."""
    with torch.device("meta"):
        _, var = build(2)
    reference = load_reference(VarReference, reference_root() / "var" / "tiny").var_state
    assert shapes(var.state_dict()) == shapes(reference)
    assert all(var.state_dict()[k].dtype == reference[k].dtype for k in reference)


@pytest.mark.parametrize("depth, params", [(16, 310e6), (30, 2.0e9), (36, 2.3e9)])
def test_official_depths_have_the_published_sizes(depth, params):
    with torch.device("meta"):
        vae, var = build(depth)
    count = sum(p.numel() for p in var.parameters())
    assert abs(count - params) / params < 0.05
    assert var.C == 64 * depth and len(var.blocks) == depth
    assert (depth == 36) == hasattr(var.blocks[0], "ada_gss") == ("shared_ada_lin.1.weight" in var.state_dict())
    assert var.patch_nums == (PATCH_NUMS_512 if depth == 36 else (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    assert sum(p.numel() for p in vae.parameters()) > 0


def test_encoder_maps_images_to_the_last_scale_latent():
    var = tiny_var(patch_nums=(1, 2, 4))
    vae = var.vae_proxy[0]
    assert vae.img_to_f(torch.zeros(2, 3, 64, 64)).shape == (2, vae.Cvae, 4, 4)


def test_top_k_of_the_whole_vocabulary_filters_nothing():
    logits = torch.randn(2, 3, 50)
    drawn = [sample_with_top_k_top_p_(logits.clone(), top_k=k, top_p=0.0, rng=torch.Generator().manual_seed(1))
             for k in (0, 50, 900)]
    assert torch.equal(drawn[0], drawn[1]) and torch.equal(drawn[0], drawn[2])


def test_moving_the_var_moves_its_vqvae():
    var = tiny_var().to(torch.float64)
    assert var.vae_proxy[0].decoder.conv_in.weight.dtype == torch.float64
