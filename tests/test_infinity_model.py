"""fastvar's Infinity definition: schedules, rotary positions, official layouts, extended sizes."""

from __future__ import annotations

import pytest
import torch
from conftest import InfinityReference, load_reference, random_text, reference_root, tiny_infinity

from fastvar.models.infinity import TEMPLATE_SCALES, Infinity, build, rope_table, scale_schedule


def test_schedules_follow_the_templates_and_sizes():
    assert scale_schedule(1.0, "0.25M")[-1] == (1, 32, 32) and len(scale_schedule(1.0, "0.06M")) == 7
    assert scale_schedule(0.5)[-1] == (1, 45, 90) and scale_schedule(2.0)[-1] == (1, 90, 45)
    assert scale_schedule(0.52) == scale_schedule(0.5)  # nearest template
    assert scale_schedule(0.75)[-1] == (1, 54, 72)
    with pytest.raises(ValueError, match=r"unknown size '2M'; supported: \['0.06M', '0.25M', '0.60M', '1M'"):
        scale_schedule(1.0, "2M")
    with pytest.raises(ValueError, match="no extended schedule for aspect ratio 3.0"):
        scale_schedule(3.0, "extended")


def brute_force_rope(h, w, anchor, head_dim):
    """cos/sin for one scale written out position by position."""
    quarter = head_dim // 4
    inv = [1 / 10000 ** (2 * i / (head_dim // 2)) for i in range(quarter)]
    out = torch.empty(2, h * w, 2 * quarter, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            row, col = round(i * anchor[0] / h), round(j * anchor[1] / w)  # no .5 ties on these grids
            angles = [row * f for f in inv] + [col * f for f in inv]
            out[0, i * w + j] = torch.tensor(angles, dtype=torch.float64).cos()
            out[1, i * w + j] = torch.tensor(angles, dtype=torch.float64).sin()
    return out


@pytest.mark.parametrize("schedule", [scale_schedule(1.0, "0.25M"), scale_schedule(1.0, "extended"),
                                      scale_schedule(0.5, "extended")])
def test_rotary_positions_sit_on_the_anchor_grid(schedule):
    anchor = TEMPLATE_SCALES[1.0 if schedule[-1][1] == schedule[-1][2] else 0.5][-1]
    table = rope_table(schedule, 64, anchor)
    start = sum(h * w for _, h, w in schedule[:-1])
    _, h, w = schedule[-1]
    torch.testing.assert_close(table[:, start:].double(), brute_force_rope(h, w, anchor, 64), atol=1e-5, rtol=0)
    assert table.shape == (2, start + h * w, 32)


def test_extended_schedule_generates():
    model, vae = tiny_infinity(depth=2)
    schedule = scale_schedule(2.0, "extended")
    K = len(schedule)
    _, bits, summed = model.autoregressive_infer_cfg(vae, schedule, random_text([4]), B=1, g_seed=0,
                                                     cfg_list=[3.0] * K, tau_list=[1.0] * K, vae_type=4)
    assert bits[-1].shape == (1, 120, 60, 4) and summed.shape == (1, 4, 1, 120, 60)


def test_build_matches_the_reference_layout_and_official_sizes():
    reference = load_reference(InfinityReference, reference_root() / "infinity" / "tiny")  # the public set
    with torch.device("meta"):
        model, _ = build("infinity-2b", depth=6)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref = {k: tuple(v.shape) for k, v in reference.infinity_state.items()}
    assert own.keys() == ref.keys()  # same keys at another width: chunks, buffers, names
    with torch.device("meta"):
        two_b, _ = build("infinity-2b")
        eight_b, vae = build("infinity-8b")
    assert abs(sum(p.numel() for p in two_b.parameters()) - 2.2e9) < 0.1e9
    assert len(eight_b.unregistered_blocks) == 40 and eight_b.C == 3584 and eight_b.d_vae == 56
    assert vae.bits_per_token == 56
    with pytest.raises(ValueError, match=r"unknown Infinity model 'infinity-3b'; available: \['infinity-2b'"):
        build("infinity-3b")
    with pytest.raises(ValueError, match="depth must be in 1..32"):
        build("infinity-2b", depth=33)


def test_unknown_constructor_arguments_are_refused():
    vae = tiny_infinity(depth=2)[1]
    with pytest.raises(TypeError, match=r"unknown Infinity argument\(s\) \['embed_dims'\]"):
        Infinity(vae, embed_dims=64)
