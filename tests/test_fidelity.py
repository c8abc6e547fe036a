"""What presets change (fastvar.compare / `fastvar compare`), and the ablation controls it is meant for."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_var
from PIL import Image, ImageDraw, ImageFont

import fastvar
import fastvar.state
from fastvar import FastVARConfig, HARTPipeline, InfinityPipeline, VARPipeline, cli
from fastvar.fidelity import Comparison, VariantReport, token_agreement
from fastvar.pruning import select_pivotal


@pytest.fixture
def var_pipe(tiny_official):
    return VARPipeline.random(16)


def test_identical_configs_agree_everywhere_and_pruning_only_from_its_first_pruned_scale(var_pipe):
    variants = {"none": "none", "last": FastVARConfig(prune={-1: 0.5}), "skip": FastVARConfig(skip_last=1)}
    result = fastvar.compare(var_pipe, [1, 2, 3], variants, seeds=[0, 1], batch_size=2, warmup=0, cfg=2.0)
    reports = {r.name: r for r in result.reports}
    assert list(reports) == ["unpatched", "none", "last", "skip"]
    assert result.scales == ("1x1", "2x2", "3x3", "4x4", "6x6")
    for name in ("unpatched", "none"):
        assert reports[name].agreement == (1.0,) * 5
        assert all(math.isinf(p) for p in reports[name].psnr) and reports[name].ssim == pytest.approx([1.0] * 6)
    assert reports["last"].agreement[:4] == (1.0,) * 4 and reports["last"].agreement[4] < 1
    assert min(reports["last"].psnr) < 100 and reports["last"].flop_ratio < 1
    assert reports["skip"].agreement[-1] is None and reports["skip"].agreement[:4] == (1.0,) * 4
    assert len(reports["last"].totals) == 4 and len(reports["last"].psnr) == 6  # 2 batches x 2 seeds; 6 images
    assert not fastvar.is_patched(var_pipe.transformer)
    unpatched = var_pipe([3], seed=1, cfg=2.0, preset=None, progress=False)[0]
    grid = result.grid()
    assert grid_layout(grid) == (4, 6)  # columns: unpatched and 3 variants; rows: 3 inputs x 2 seeds
    assert np.array_equal(np.asarray(grid)[-96:, :96], np.asarray(unpatched))  # input-major, then seed


def test_agreement_counts_tokens_per_scale_on_infinity_and_hart(tiny_official):
    pipe = InfinityPipeline.random()
    result = fastvar.compare(pipe, ["a cat"], ["none", "paper"], warmup=0, size=(256, 256), top_k=2)
    assert len(result.scales) == 7 and result.scales[-1] == "16x16"
    assert result.reports[1].agreement == (1.0,) * 7
    pipe(["a cat"], size=(256, 256), top_k=2, preset="paper", progress=False)
    first_pruned = next(r.index for r in fastvar.summary(pipe.transformer).rows if r.kept is not None)
    assert first_pruned > 0 and set(result.reports[2].agreement[:first_pruned]) == {1.0}
    hart = fastvar.compare(HARTPipeline.random(), ["a cat"], ["none"], warmup=0, more_smooth=False)
    assert hart.scales[:2] == ("1x1", "2x2") and len(hart.scales) == len(hart.reports[0].agreement)
    assert hart.reports[1].agreement == (1.0,) * len(hart.scales)  # the text stage draws the 1x1 map


def test_a_multi_bit_token_agrees_only_when_all_its_bits_do():
    reference = [torch.zeros(2, 1, 1, 4, dtype=torch.long), torch.zeros(2, 2, 2, 4, dtype=torch.long),
                 torch.zeros(2, 2, 2, 4, dtype=torch.long)]  # (B, h, w, bits) per scale, as Infinity draws
    run = [t.clone() for t in reference]
    run[1][0, 0, 1, 2] = 1  # one bit of a token differs
    run[1][1, 1, 0, :3] = 1  # three of another's four
    run[2][:] = 1  # every bit of every token
    assert token_agreement([run], [reference], [1, 4, 4, 16]) == (1.0, 6 / 8, 0.0, None)  # scale 3: skipped


def test_reports_save_as_text_json_and_grid(var_pipe, tmp_path):
    result = fastvar.compare(var_pipe, [4], ["none", "default"], warmup=0)
    result.save(tmp_path)
    table = (tmp_path / "compare.txt").read_text()
    assert "speedup (median)" in table and "PSNR worst dB" in table and "tokens equal" in table
    data = json.loads((tmp_path / "compare.json").read_text())
    assert [v["name"] for v in data["variants"]] == ["unpatched", "none", "default"]
    assert data["variants"][1]["psnr"] == ["inf"] and data["scales"] == list(result.scales)
    assert grid_layout(Image.open(tmp_path / "grid.png")) == (3, 1)


HEADER = 23  # the strip of names above 96-pixel columns: the 12-pixel default font's line, 4 pixels above and below


def grid_layout(grid: Image.Image) -> tuple[int, int]:
    """(columns, rows) of a grid of 96 x 96 images under the header."""
    assert grid.width % 96 == 0 and (grid.height - HEADER) % 96 == 0, grid.size
    return grid.width // 96, (grid.height - HEADER) // 96


def ink(pixels: np.ndarray) -> np.ndarray:
    """The smallest crop holding every pixel that is not white."""
    rows, cols = np.nonzero((pixels < 255).any(axis=-1))
    assert rows.size, "blank"
    return pixels[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def label(text: str) -> np.ndarray:
    """``text`` as the default font draws it, black on white, cropped to its ink."""
    image = Image.new("RGB", (400, 40), "white")
    ImageDraw.Draw(image).text((5, 5), text, fill="black", font=ImageFont.load_default(size=12))
    return ink(np.asarray(image))


def test_grid_names_each_column_in_a_header():
    names = ["unpatched", "a-name-too-long-for-a-column", "none"]
    images = {n: [Image.new("RGB", (96, 96), (80 * i, 120, 200 - i)), Image.new("RGB", (96, 96), (i, 0, 9))]
              for i, n in enumerate(names)}
    reports = tuple(VariantReport(n, None, (1.0,), (1.0,), None, 1.0, (1.0,), (math.inf,), (1.0,)) for n in names)
    grid = Comparison(("1x1",), reports, images).grid()
    assert grid_layout(grid) == (3, 2)
    pixels = np.asarray(grid)
    for col, name in enumerate(names):
        column = pixels[:, col * 96:(col + 1) * 96]
        for row, image in enumerate(images[name]):
            assert np.array_equal(column[HEADER + row * 96:HEADER + (row + 1) * 96], np.asarray(image))
        written = ink(column[:HEADER])
        if name != names[1]:
            assert np.array_equal(written, label(name))
        else:  # cut to fit its column, not spilling into the next
            assert any(np.array_equal(written, label(name[:k] + "...")) for k in range(5, len(name)))


def test_compare_refuses_what_it_cannot_compare(var_pipe):
    for variants, expected in [({}, "at least one variant"), (["fast"], "unknown var preset 'fast'"),
                               ({"unpatched": "none"}, "none of them named 'unpatched'")]:
        with pytest.raises(ValueError, match=expected):
            fastvar.compare(var_pipe, [1], variants)


def test_compare_command(tmp_path, tiny_official, capsys):
    config = json.dumps({"name": "zeros", "preset": "default", "restoration": "zeros"})
    cli.main(["compare", "var", "--random-weights", "--classes", "1-2", "--presets", "none,default", "--config",
              config, "--seeds", "0,3", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "zeros" in out and "tokens equal" in out
    assert grid_layout(Image.open(tmp_path / "grid.png")) == (4, 4)
    assert [v["name"] for v in json.loads((tmp_path / "compare.json").read_text())["variants"]] == [
        "unpatched", "none", "default", "zeros"]


@pytest.mark.parametrize("argv, expected", [
    (["--presets", "fast"], "unknown var preset(s) ['fast']"),
    (["--config", "{nope"], "is not JSON"),
    (["--config", '{"preset": "default"}'], "a JSON object with a 'name'"),
    (["--config", '{"name": "x", "ratio": 1}'], "unknown FastVARConfig field(s) ['ratio']"),
    (["--config", '{"name": "x", "selection": "best"}'], "selection = 'best': accepted are ['pivotal', 'random']"),
    ([], "give --presets NAME[,NAME...] or --config JSON"),
    (["--presets", "none", "--seeds", "a"], "give seeds as ints"),
])
def test_compare_mistakes_are_one_error_line(tmp_path, capsys, argv, expected):
    from test_cli import run_error

    line = run_error(capsys, ["compare", "var", "--random-weights", "--classes", "1", "--out", str(tmp_path), *argv])
    assert expected in line


# ----------------------------------------------------------------------------- the ablation controls


def generate(var, config):
    fastvar.patch(var, config)
    image = var.autoregressive_infer_cfg(B=2, label_B=torch.tensor([3, 9]), g_seed=1, cfg=2.0, top_k=0, top_p=0.0)
    fastvar.unpatch(var)
    return image


def test_random_selection_draws_seeded_uniform_tokens_per_row(monkeypatch):
    var = tiny_var(depth=2, patch_nums=(1, 2, 3, 4, 6, 8))
    picked = []
    original = fastvar.state.select_random
    monkeypatch.setattr(fastvar.state, "select_random", lambda x, k, g: picked.append(
        (x.clone(), idx := original(x, k, g))) or idx)
    config = FastVARConfig(prune={-1: 0.75}, selection="random")
    first = generate(var, config)
    assert len(picked) == 2 * 2  # 2 blocks x 2 branches at the one pruned scale
    for x, idx in picked:
        assert idx.shape == (4, 16) and all(len(set(row.tolist())) == 16 for row in idx)
        assert not torch.equal(idx, select_pivotal(x, 16))
    assert not torch.equal(picked[0][1][0], picked[0][1][1])  # each batch row draws its own
    assert torch.equal(generate(var, config), first)  # seeded: the same every call
    assert not torch.equal(generate(var, config.replace(selection_seed=1)), first)
    assert not torch.equal(generate(var, config.replace(selection="pivotal")), first)


def test_zero_restoration_adds_nothing_at_pruned_slots_and_caches_nothing():
    var = tiny_var(depth=2, patch_nums=(1, 2, 3, 4, 6, 8))
    config = FastVARConfig(prune={-1: 0.75}, restoration="zeros")
    fastvar.patch(var, config)
    schedule = var._fastvar.schedule
    summary = fastvar.summary(var)
    assert schedule.cache_scale is None and not any(r.cached for r in summary.rows) and summary.branch_bytes == 0
    updates = []
    for block in var.blocks:  # the residual update of the whole block at the last scale
        block.register_forward_hook(lambda m, args, kwargs, out: updates.append(out - kwargs["x"])
                                    if out.shape[1] == 64 else None, with_kwargs=True)
    var.autoregressive_infer_cfg(B=1, label_B=torch.tensor([3]), g_seed=1, cfg=2.0, top_k=0, top_p=0.0)
    assert not var._fastvar._cache
    for update in updates:  # two branches ran on 16 tokens each: at most 32 of 64 slots moved per row
        moved = update.abs().amax(dim=-1) > 0
        assert 16 <= int(moved[0].sum()) <= 32 and int(moved[0].sum()) < 64
    fastvar.unpatch(var)
    assert not torch.equal(generate(var, config), generate(var, config.replace(restoration="cache")))
