"""fastvar's VideoVAE decodes as the unmodified upstream InfinityStar video VAE does (``vae.decode(z, slice=True)``).

Every reference set holds the full upstream state dict (encoder included), a random latent with its decoding
(``vae_check``) and, per case, the summed codes of a generation with the frames upstream decoded from them.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from conftest import NAMESPACE_SOURCES, InfinityStarReference, load_reference, reference_cases, reference_sets

from fastvar.hub import load_checkpoint, parameters_on_meta
from fastvar.models.video_vae import VideoVAE, VideoVAEConfig

TOL = 1e-5

@pytest.fixture(params=reference_sets("infinitystar"))
def reference(request) -> InfinityStarReference:
    return load_reference(InfinityStarReference, request.param)


def expected_shape(z: torch.Tensor) -> tuple[int, ...]:
    b, _, t, h, w = z.shape
    return b, 3, 1 + 4 * (t - 1), 16 * h, 16 * w


def test_vae_check_decodes_like_upstream(reference):
    z, decoded = reference.outputs["vae_check.z"], reference.outputs["vae_check.decoded"]
    frames = reference.vae.decode(z)
    assert frames.shape == decoded.shape == expected_shape(z)
    torch.testing.assert_close(frames, decoded, atol=TOL, rtol=0)


@pytest.mark.parametrize("set_dir, case", reference_cases("infinitystar", where=lambda c: c.get("store_frames", True)))
def test_summed_codes_decode_to_the_upstream_frames(set_dir, case):
    reference = load_reference(InfinityStarReference, set_dir)
    name = case["name"]
    z, expected = reference.outputs[f"{name}.summed_codes"], reference.outputs[f"{name}.frames"]
    frames = reference.vae.decode(z)
    assert frames.shape == expected.shape == expected_shape(z)
    torch.testing.assert_close(frames, expected, atol=TOL, rtol=0, msg=lambda m: f"{set_dir.name}/{name}: {m}")


def test_loads_the_full_upstream_state_dict(reference):
    vae = VideoVAE(reference.config)
    load_checkpoint(vae, reference.vae_state)
    decoding = {k: v for k, v in reference.vae_state.items() if not k.startswith(VideoVAE.encoder_side_prefixes)}
    own = vae.state_dict()
    assert own.keys() == decoding.keys()
    for key, value in decoding.items():
        torch.testing.assert_close(own[key], value, atol=0, rtol=0)
    # Each dropped prefix names something the official model has: the list is not stale.
    for prefix in VideoVAE.encoder_side_prefixes:
        assert any(k.startswith(prefix) for k in reference.vae_state), prefix
    VideoVAE(reference.config).load_state_dict(vae.adapt_state_dict(reference.vae_state), strict=True)


@pytest.mark.parametrize("extra", ["post_quant_conv.weight", "decoder.up_blocks.0.temb_proj.weight"])
def test_unknown_key_is_named(reference, extra):
    state = {**reference.vae_state, extra: torch.zeros(1)}
    with pytest.raises(ValueError, match=rf"unexpected keys: .*{re.escape(extra)}"):
        load_checkpoint(VideoVAE(reference.config), state)


def test_missing_key_is_named(reference):
    missing = "decoder.up_blocks.3.upsamplers.0.conv.norm.gamma"
    state = {k: v for k, v in reference.vae_state.items() if k != missing}
    with pytest.raises(ValueError, match=rf"missing keys: .*{re.escape(missing)}"):
        load_checkpoint(VideoVAE(reference.config), state)


def test_batch_rows_decode_as_alone(reference):
    z = reference.outputs["vae_check.z"]
    other = torch.randn(z.shape, generator=torch.Generator().manual_seed(0)) * 0.125
    batch = reference.vae.decode(torch.cat([z, other]))
    assert torch.equal(batch[:1], reference.vae.decode(z))
    assert torch.equal(batch[1:], reference.vae.decode(other))


@pytest.mark.parametrize("frames", [1, 2, 3, 4, 5, 6])
def test_frame_counts(reference, frames):
    """Every latent length decodes to 1 + 4(T-1) frames, T = 2 included (upstream fails on it)."""
    z = torch.randn(1, reference.config.code_channels, frames, 1, 2, generator=torch.Generator().manual_seed(frames))
    assert reference.vae.decode(z).shape == expected_shape(z)


def test_rejects_other_latent_widths(reference):
    with pytest.raises(ValueError, match="expected z"):
        reference.vae.decode(torch.zeros(1, 16, 1, 2, 2))


def test_defaults_are_the_official_sizes(reference):
    """The config defaults equal the namespace of ``video_vae_model()`` in every field the set did not shrink."""
    overridden = set(reference.vae_config["namespace_overrides"])
    for field in dataclasses.fields(VideoVAEConfig):
        if NAMESPACE_SOURCES[field.name] not in overridden:
            assert getattr(reference.config, field.name) == field.default, field.name


def test_official_architecture_builds_on_meta(reference):
    with parameters_on_meta():
        official = VideoVAE()
    assert official.config.block_out_channels == (96, 192, 384, 384, 384) and official.config.layers_per_block == 2
    assert all(p.is_meta for p in official.parameters())
    state = official.state_dict()

    def names(keys):  # key names up to the number of residual blocks per up block
        return {re.sub(r"resnets\.\d+", "resnets.*", k) for k in keys}

    assert names(state) == names(reference.vae.state_dict())
    shapes = {
        "proj_up.weight": (64, 64),
        "decoder.conv_in.conv.weight": (384, 16, 3, 3, 3),
        "decoder.up_blocks.0.resnets.2.conv2.conv.weight": (384, 384, 3, 3, 3),
        "decoder.up_blocks.1.upsamplers.0.conv.conv.conv.weight": (384 * 4, 384, 3, 3, 3),  # space x2
        "decoder.up_blocks.2.upsamplers.0.conv.conv.conv.weight": (192 * 8, 384, 3, 3, 3),  # space and time x2
        "decoder.up_blocks.3.upsamplers.0.conv.conv.conv.weight": (96 * 8, 192, 3, 3, 3),
        "decoder.up_blocks.3.resnets.2.norm2.conv_y.conv.weight": (192, 16, 1, 1, 1),
        "decoder.norm_out.norm_layer.gamma": (96, 1, 1, 1),
        "decoder.conv_out.conv.weight": (3, 96, 3, 3, 3),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert "decoder.up_blocks.0.upsamplers.0.conv.norm.gamma" not in state  # the deepest block keeps its size
