"""The pruning tensor functions against brute-force loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_var

import fastvar
import fastvar.state
from fastvar.pruning import gather_tokens, kept_count, restore, select_pivotal, token_scores


def test_scores_are_squared_distance_to_the_spatial_mean():
    x = torch.randn(3, 12, 5, dtype=torch.float64)
    scores = token_scores(x)
    for b in range(3):
        mean = sum(x[b, i] for i in range(12)) / 12
        for i in range(12):
            assert scores[b, i].item() == pytest.approx(((x[b, i] - mean) ** 2).sum().item(), rel=1e-12)


def test_selection_keeps_each_rows_top_scores_best_first():
    x = torch.randn(4, 30, 8)
    idx = select_pivotal(x, 11)
    scores = token_scores(x)
    for b in range(4):
        expected = sorted(range(30), key=lambda i: -scores[b, i].item())[:11]
        assert idx[b].tolist() == expected


def test_rows_select_independently():
    x = torch.randn(1, 16, 4).repeat(2, 1, 1)
    x[1] = x[1].flip(0)
    idx = select_pivotal(x, 5)
    assert sorted(idx[1].tolist()) == sorted(15 - i for i in idx[0].tolist())


def test_gather_picks_rows_tokens():
    x = torch.randn(2, 9, 3)
    idx = torch.tensor([[4, 0], [8, 7]])
    out = gather_tokens(x, idx)
    for b in range(2):
        for j in range(2):
            assert torch.equal(out[b, j], x[b, idx[b, j]])


def brute_force_area_resize(grid: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Adaptive average pooling written out: output cell (i, j) averages rows floor(i*H/h)..ceil((i+1)*H/h)."""
    B, C, H, W = grid.shape
    out = torch.empty(B, C, h, w, dtype=grid.dtype)
    for i in range(h):
        r0, r1 = (i * H) // h, -((-(i + 1) * H) // h)
        for j in range(w):
            c0, c1 = (j * W) // w, -((-(j + 1) * W) // w)
            out[:, :, i, j] = grid[:, :, r0:r1, c0:c1].mean(dim=(2, 3))
    return out


@pytest.mark.parametrize("cached_hw, hw", [((4, 4), (6, 6)), ((3, 5), (4, 7)), ((5, 5), (5, 5))])
def test_restore_resizes_cache_and_writes_fresh_tokens(cached_hw, hw):
    B, C = 2, 3
    cached = torch.randn(B, cached_hw[0] * cached_hw[1], C, dtype=torch.float64)
    num = hw[0] * hw[1]
    idx = torch.stack([torch.randperm(num)[:5] for _ in range(B)])
    fresh = torch.randn(B, 5, C, dtype=torch.float64)
    out = restore(cached, cached_hw, fresh, idx, hw)

    grid = cached.view(B, *cached_hw, C).permute(0, 3, 1, 2)
    expected = brute_force_area_resize(grid, *hw).permute(0, 2, 3, 1).reshape(B, num, C)
    for b in range(B):
        for j in range(5):
            expected[b, idx[b, j]] = fresh[b, j]
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(brute_force_area_resize(grid, *hw), F.interpolate(grid, size=hw, mode="area"))


def area_restored(cached, cached_hw, fresh, idx, hw) -> torch.Tensor:
    """The full map as the unpatched path's precision gives it: the cached map area-resized in its own dtype,
    the fresh tokens written at their positions."""
    B, _, C = cached.shape
    grid = cached.reshape(B, *cached_hw, C).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=hw, mode="area").permute(0, 2, 3, 1).reshape(B, hw[0] * hw[1], C).clone()
    out[torch.arange(B)[:, None], idx] = fresh
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_restore_stays_in_half_precision(dtype):
    cached, fresh = torch.randn(2, 16, 8).to(dtype), torch.randn(2, 10, 8).to(dtype)
    idx = torch.stack([torch.randperm(36)[:10] for _ in range(2)])
    out = restore(cached, (4, 4), fresh, idx, (6, 6))
    assert out.dtype == dtype
    assert torch.equal(out, area_restored(cached, (4, 4), fresh, idx, (6, 6)))


def test_restore_in_a_model_under_bfloat16_autocast(monkeypatch):
    original, calls = fastvar.state.restore, []

    def recording(*args):
        calls.append((args, out := original(*args)))
        return out

    monkeypatch.setattr(fastvar.state, "restore", recording)
    var = fastvar.patch(tiny_var(depth=2, patch_nums=(1, 2, 3, 4, 6)), prune={-2: 0.5, -1: 0.75})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        var.autoregressive_infer_cfg(B=2, label_B=torch.tensor([3, 9]), g_seed=1, cfg=2.0, top_k=0, top_p=0.0)
    assert len(calls) == 2 * 2 * 2  # 2 pruned scales x 2 blocks x 2 branches
    for (cached, cached_hw, fresh, idx, hw), out in calls:
        assert cached.dtype == fresh.dtype == out.dtype == torch.bfloat16  # the branch's own output dtype
        assert torch.equal(out, area_restored(cached, cached_hw, fresh, idx, hw))


@pytest.mark.parametrize("n, ratio, kept", [(1024, 0.4, 615), (1600, 0.5, 800), (256, 0.0, 256), (256, 1.0, 0),
                                            (169, 0.4, 102)])
def test_kept_count_uses_the_official_rounding(n, ratio, kept):
    assert kept_count(n, ratio) == kept
