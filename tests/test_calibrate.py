"""Calibrating KV budgets: on a model whose attention is built local in some blocks and global in others, the
calibration marks exactly the global ones as drafters; the file it writes is the official format."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_var

import fastvar
from fastvar import FastVARConfig, VARPipeline, cli
from fastvar.calibrate import attention_spread, budget_from_spread, calibrate
from fastvar.kv_budget import KVBudget

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8)  # 155 tokens
GLOBAL = (1, 4)  # blocks whose attention spreads evenly over every cached key; the others attend to their scale


def local_and_global() -> VARPipeline:
    """A VAR whose residual stream is the scale's level embedding (large, one axis per scale; the branches add
    little): a block whose queries are its keys' projection attends within its scale, a block with no queries
    attends evenly."""
    var = tiny_var(depth=6, patch_nums=PATCH_NUMS)
    C = var.C
    with torch.no_grad():
        var.lvl_embed.weight.copy_(30 * torch.eye(C)[: len(PATCH_NUMS)])
        for layer, block in enumerate(var.blocks):
            weight = block.attn.mat_qkv.weight
            weight[:C] = 0 if layer in GLOBAL else weight[C : 2 * C]
            block.attn.proj.weight.mul_(0.01)
            block.ffn.fc2.weight.mul_(0.01)
    return VARPipeline(var)


def test_the_calibration_marks_exactly_the_blocks_whose_attention_spreads_across_scales():
    pipe = local_and_global()
    spread, tokens = attention_spread(pipe, [1, 2], seeds=(0, 1), cfg=2.0)
    assert tokens == [p * p for p in PATCH_NUMS] and spread[[0, -1]].isnan().all()
    for si in range(1, len(PATCH_NUMS) - 1):
        even = sum(tokens[:si]) / sum(tokens[: si + 1])  # what even attention puts on earlier scales
        for layer in range(6):
            if layer in GLOBAL:
                assert spread[si, layer].item() == pytest.approx(even, abs=1e-3), (si, layer)
            else:  # mostly its own scale (the stream is not all level embedding)
                assert spread[si, layer] < even - 0.1, (si, layer)
    budget = calibrate(pipe, [1, 2], fraction=0.5, seeds=(0,), cfg=2.0)
    full = [sum(tokens[: si + 1]) for si in range(len(tokens))]
    assert budget.threshold == int(0.5 * full[-2]) == 45
    assert sorted(budget.capacities) == [-3, -2, -1]  # from the first scale past the threshold (5x5: 55 tokens)
    for position, counts in budget.capacities.items():
        drafters = [b for b, c in enumerate(counts) if c == max(counts)]
        assert drafters == list(GLOBAL) and max(counts) == full[position - 1 if position == -1 else position]
        assert sum(counts) <= 0.5 * full[-2] * 6  # the target total


def test_a_budget_is_only_as_large_as_the_target_affords():
    spread = torch.tensor([[float("nan")] * 4] + [[0.9, 0.8, 0.1, 0.0]] * 4 + [[float("nan")] * 4])
    tokens = [1, 4, 16, 36, 64, 144]  # 121 tokens before the last scale
    budget = budget_from_spread(spread, tokens, fraction=0.6)  # 290 tokens in all, 72 per block
    assert budget.threshold == 72 and sorted(budget.capacities) == [-2, -1]
    assert budget.capacities[-2] == (121, 121, 24, 24)  # two drafters keep all: the refiners share what is left
    tight = budget_from_spread(spread, tokens, fraction=0.45)  # 217 tokens, 54 per block: 57 at 6x6 is past it
    assert tight.capacities == {-3: (57, 57, 51, 51), -2: (121, 32, 32, 32), -1: (121, 32, 32, 32)}  # one fits
    assert budget_from_spread(spread, tokens, fraction=0.3).capacities[-2] == (36,) * 4  # none: all refiners
    with pytest.raises(ValueError, match="fraction 0.05 keeps 6 tokens per block, fewer than the window of 16"):
        budget_from_spread(spread, tokens, fraction=0.05)
    with pytest.raises(ValueError, match=r"fraction = 1.5: the share of the KV cache to keep, in \(0, 1\)"):
        budget_from_spread(spread, tokens, fraction=1.5)


def test_calibrated_budgets_are_written_in_the_official_format_and_read_back(tmp_path):
    budget = KVBudget({-3: (100, 20, 20), -2: (200, 200, 30), -1: (200, 200, 30)}, threshold=90, window=4)
    budget.to_file(tmp_path / "b.json")
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["Scale 13"] == {"Block 0": 1, "Block 1": 1, "Block 2": 0, "High": 2, "Max": 200, "Min": 30,
                                "Limit": 200}
    assert data["Scale 12"]["Max"] == 100 and data["fastvar"]["threshold"] == 90
    assert KVBudget.from_file(tmp_path / "b.json") == budget
    with pytest.raises(ValueError, match="scale position -3 cannot be written in the official format"):
        KVBudget({-3: (100, 50, 20), -1: (20, 20, 20)}).to_file(tmp_path / "c.json")


def test_calibrate_command_writes_a_budget_the_model_runs_with(tmp_path, capsys, monkeypatch):
    pipe = local_and_global()
    monkeypatch.setattr(VARPipeline, "random", lambda *a, **k: pipe)
    out = tmp_path / "budget.json"
    cli.main(["calibrate", "var", "--random-weights", "--classes", "1-2", "--fraction", "0.5", "--cfg", "2",
              "--out", str(out)])
    err = capsys.readouterr().err
    assert f"wrote {out}" in err and "drafters 1, 4" in err
    budget = KVBudget.from_file(out)
    assert budget.threshold == int(0.5 * sum(p * p for p in PATCH_NUMS[:-1]))
    pipe(1, preset=FastVARConfig(kv_budget=budget), progress=False)
    summary = fastvar.summary(pipe.transformer)
    assert summary.kv_bytes < summary.baseline_kv_bytes
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["calibrate", "var", "--random-weights", "--classes", "1-2", "--fraction", "2", "--out", str(out)])
    assert "error: --fraction 2.0: the share of the KV cache to keep, in (0, 1)" in capsys.readouterr().err
