"""The fastvar command line, on tiny models standing in for the official ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_infinity, tiny_text_encoder, tiny_var
from huggingface_hub import errors as hub_errors
from PIL import Image

import fastvar
from fastvar import cli
from fastvar.models.var import VAR
from fastvar.pipeline import InfinityPipeline

PATCH_NUMS = (1, 2, 3, 4, 6)


@pytest.fixture
def tiny_pretrained(monkeypatch):
    """VAR.from_pretrained returns a fresh tiny model and records its arguments."""
    calls = []

    def from_pretrained(depth, weights=None, vae_weights=None, device="cpu"):
        calls.append((depth, weights, vae_weights))
        return tiny_var(patch_nums=PATCH_NUMS)

    monkeypatch.setattr(VAR, "from_pretrained", staticmethod(from_pretrained))
    return calls


def expected_images(patched: bool, classes):
    var = tiny_var(patch_nums=PATCH_NUMS)
    if patched:
        fastvar.patch(var)
    return var.autoregressive_infer_cfg(B=len(classes), label_B=torch.tensor(classes), g_seed=3, **cli.SAMPLING)


@pytest.mark.parametrize("no_fastvar", [False, True])
def test_generate_writes_a_grid_of_the_models_images(tmp_path, tiny_pretrained, no_fastvar):
    out = tmp_path / "grid.png"
    argv = ["generate", "var", "--depth", "20", "--class", "1", "2", "3", "--seed", "3", "--out", str(out)]
    cli.main(argv + (["--no-fastvar"] if no_fastvar else []))
    assert tiny_pretrained == [(20, None, None)]
    pixels = np.asarray(Image.open(out))
    assert pixels.shape == (2 * 96, 2 * 96, 3)
    expected = np.asarray(cli.to_grid(expected_images(not no_fastvar, [1, 2, 3])))
    assert np.array_equal(pixels, expected)
    assert not pixels[96:, 96:].any()  # the fourth cell of the 2x2 grid is empty


def test_generate_explains_when_weights_cannot_be_fetched(tmp_path, monkeypatch):
    def offline(repo_id, filename, **kwargs):
        raise hub_errors.LocalEntryNotFoundError("no connection")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", offline)
    with pytest.raises(SystemExit, match=r"could not fetch vae_ch160v4096z32.safetensors .* pass its path"):
        cli.main(["generate", "var", "--out", str(tmp_path / "x.png")])


def test_bench_prints_every_scale_and_variant(monkeypatch, capsys):
    monkeypatch.setattr(cli, "build", lambda depth, patch_nums: (None, tiny_var(patch_nums=PATCH_NUMS)))
    cli.main(["bench", "var", "--depth", "3", "--random-weights", "--repeats", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert "VAR d3 96px batch 1 fp32 on cpu" in out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("scale"))
    assert header.split()[-3:] == ["baseline", "default", "none"]
    assert sum(line.split()[0].isdigit() for line in out.splitlines()[2:]) == len(PATCH_NUMS)
    flop_row = next(line for line in out.splitlines() if "FLOP ratio" in line and "ideal" not in line)
    assert flop_row.split()[2] == "1.000" and float(flop_row.split()[3]) < 1


def test_bench_refuses_cuda_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="torch sees no CUDA device"):
        cli.main(["bench", "var", "--device", "cuda", "--random-weights"])


def test_generate_infinity_writes_the_pipelines_images(tmp_path, monkeypatch):
    def from_pretrained(name, device="cpu"):
        assert name == "infinity-2b"
        model, vae = tiny_infinity(depth=4)
        return InfinityPipeline(model, vae, *tiny_text_encoder())

    monkeypatch.setattr(InfinityPipeline, "from_pretrained", staticmethod(from_pretrained))
    out = tmp_path / "cat.png"
    cli.main(["generate", "infinity", "--prompt", "a red cat", "--size", "256x256", "--seed", "2", "--out", str(out)])
    expected = from_pretrained("infinity-2b")("a red cat", seed=2, size=(256, 256), progress=False)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    with pytest.raises(SystemExit, match="unsupported size 300x300"):
        cli.main(["generate", "infinity", "--prompt", "a cat", "--size", "300x300", "--out", str(out)])


def test_bench_infinity_times_every_preset(monkeypatch, capsys):
    monkeypatch.setattr(cli, "build_infinity", lambda name, depth: tiny_infinity(depth=4))
    cli.main(["bench", "infinity", "--size", "256x256", "--repeats", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("scale"))
    assert header.split()[4:] == ["baseline", "paper", "prune-only", "skip-only", "none"]
    assert "256x256 batch 1 fp32 on cpu" in out
    assert sum(line.split()[0].isdigit() for line in out.splitlines()[2:]) == 7
