"""The fastvar command line, on tiny models standing in for the official ones."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import write_official_files
from PIL import Image

import fastvar
from fastvar import HARTPipeline, InfinityPipeline, VARPipeline, cli


def run_error(capsys, argv) -> str:
    """The CLI's output for a user mistake: exactly one 'error:' line on stderr and exit status 2."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("error: ") == 1 and "Traceback" not in err, err
    line = err.splitlines()[-1].split("\r")[-1]  # after any progress bar that was drawn and cleared
    assert line.startswith("error: "), err
    return line


def test_bare_command_prints_help_and_version(capsys):
    cli.main([])
    assert "usage: fastvar" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"fastvar {fastvar.__version__}\n"


def test_every_option_shows_its_default(capsys):
    for argv in (["generate", "var"], ["bench", "infinity"]):
        with pytest.raises(SystemExit):
            cli.main([*argv, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for option in ("--cfg", "--dtype", "--device", "--top-k"):
            assert f"{option}" in text
        assert text.count("(default:") >= 8


@pytest.mark.parametrize("no_fastvar", [False, True])
def test_generate_var_writes_a_grid_and_each_image(tmp_path, tiny_official, capsys, no_fastvar):
    out = tmp_path / "grid.png"
    argv = ["generate", "var", "--random-weights", "--class", "1", "2", "3", "--seed", "3", "--out", str(out)]
    cli.main(argv + (["--no-fastvar"] if no_fastvar else []))
    expected = VARPipeline.random(16)([1, 2, 3], seed=3, preset=None if no_fastvar else "default", progress=False)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(cli.to_grid(expected)))
    for i, image in enumerate(expected):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"grid-{i}.png")), np.asarray(image))
    assert np.asarray(Image.open(out))[96:, 96:].max() == 0  # the fourth cell of the 2x2 grid is empty
    assert ("ideal FLOP ratio" in capsys.readouterr().err) != no_fastvar


def test_generate_var_num_samples_repeats_each_class(tmp_path, tiny_official):
    cli.main(["generate", "var", "--random-weights", "--class", "4", "--num-samples", "2", "--out",
              str(tmp_path / "x.png")])
    expected = VARPipeline.random(16)([4, 4], seed=0, progress=False)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x-1.png")), np.asarray(expected[1]))


def test_generate_infinity_writes_the_pipelines_images(tmp_path, tiny_official):
    out = tmp_path / "cat.jpg"
    cli.main(["generate", "infinity", "--random-weights", "--prompt", "a red cat", "--size", "256x256", "--seed", "2",
              "--top-k", "2", "--out", str(out)])
    expected = InfinityPipeline.random()("a red cat", seed=2, size=(256, 256), top_k=2, progress=False)[0]
    assert Image.open(out).size == expected.size  # JPEG is lossy: the size is what can be compared
    png = tmp_path / "cat.png"
    cli.main(["generate", "infinity", "--random-weights", "--prompt", "a red cat", "--prompt", "the dog",
              "--aspect-ratio", "0.5", "--pixels", "0.06M", "--negative-prompt", "the moon", "--out", str(png)])
    expected = InfinityPipeline.random()(["a red cat", "the dog"], aspect_ratio=0.5, pixels="0.06M",
                                          negative_prompt="the moon", progress=False)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "cat-1.png")), np.asarray(expected[1]))


def test_generate_loads_official_files_given_by_flags(tmp_path, tiny_official, hub_offline):
    write_official_files(tmp_path)
    out = tmp_path / "dog.png"
    cli.main(["generate", "var", "--weights", str(tmp_path), "--class", "7", "--out", str(out)])
    expected = VARPipeline.from_pretrained(tmp_path, progress=False)(7, progress=False)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    cli.main(["generate", "infinity", "--weights", str(tmp_path), "--text-encoder", str(tmp_path / "flan-t5-xl"),
              "--size", "256x256", "--out", str(out)])


@pytest.mark.parametrize("argv, expected", [
    (["generate", "var", "--out", "{tmp}/x.txt"], r"the file name must end in an image format"),
    (["generate", "var", "--out", "{tmp}/missing/x.png"], r"the folder .*missing does not exist"),
    (["generate", "var", "--preset", "paper", "--out", "{tmp}/x.png"], r"unknown var preset\(s\) \['paper'\]"),
    (["generate", "var", "--depth", "7", "--out", "{tmp}/x.png"], r"no official VAR of depth 7"),
    (["generate", "infinity", "--depth", "2", "--out", "{tmp}/x.png"], r"--depth cuts the official model and needs "
                                                                       r"--random-weights"),
    (["generate", "var", "--dtype", "fp64"], r"argument --dtype: invalid choice: 'fp64'"),
    (["generate", "var", "--class", "dog"], r"argument --class: invalid int value: 'dog'"),
    (["bench", "var", "--repeats", "0"], r"argument --repeats: must be >= 1, got 0"),
    (["bench", "var", "--batch", "0"], r"argument --batch: must be >= 1, got 0"),
    (["bench", "var", "--preset", "fast"],
     r"unknown var preset\(s\) \['fast'\]; available: \['default', 'default-unguided-last', 'none'\]"),
    (["generate", "llama"], r"argument family: invalid choice: 'llama'"),
])
def test_mistakes_are_one_error_line_before_anything_is_loaded(tmp_path, capsys, monkeypatch, argv, expected):
    monkeypatch.setattr(VARPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.setattr(VARPipeline, "random", lambda *a, **k: pytest.fail("built a model"))
    err = run_error(capsys, [a.format(tmp=tmp_path) for a in argv])
    assert re.search(expected, err), err


@pytest.mark.parametrize("argv, expected", [
    (["--class", "5000"], r"class id 5000 is out of range: this VAR has classes 0\.\.999"),
    (["--top-p", "2"], r"top_p = 2\.0: must be a number in \[0, 1\]"),
    (["--num-samples", "0"], r"--num-samples must be >= 1, got 0"),
])
def test_bad_generation_values_are_one_error_line(tmp_path, tiny_official, capsys, argv, expected):
    err = run_error(capsys, ["generate", "var", "--random-weights", *argv, "--out", str(tmp_path / "x.png")])
    assert re.search(expected, err), err


def test_missing_corrupt_and_mismatched_weights_are_one_error_line(tmp_path, tiny_official, hub_offline, capsys,
                                                                   monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    out = ["--out", str(tmp_path / "x.png")]
    err = run_error(capsys, ["generate", "var", *out])
    assert "var_d16 (var_d16.safetensors or var_d16.pth) is not in the Hugging Face cache" in err
    assert "pass weights=PATH (CLI: --weights PATH)" in err
    (tmp_path / "var_d16.pth").write_bytes(b"garbage")
    err = run_error(capsys, ["generate", "var", "--weights", str(tmp_path / "var_d16.pth"), *out])
    assert "vae_ch160v4096z32" in err and "--vae-weights" in err  # the VAE is what is missing now
    write_official_files(tmp_path / "official")
    capsys.readouterr()
    err = run_error(capsys, ["generate", "var", "--weights", str(tmp_path / "var_d16.pth"), "--vae-weights",
                             str(tmp_path / "official"), *out])
    assert "var_d16.pth is not a readable torch checkpoint" in err
    err = run_error(capsys, ["generate", "var", "--weights", str(tmp_path / "official" / "infinity_2b_reg.pth"),
                             "--vae-weights", str(tmp_path / "official"), *out])
    assert "checkpoint does not fit VAR: missing keys:" in err


def test_bench_prints_a_line_per_run_and_the_spread(tiny_official, capsys):
    cli.main(["bench", "var", "--random-weights", "--repeats", "2", "--warmup", "0"])
    captured = capsys.readouterr()
    assert captured.err.count("repeat ") == 2 * 4 and "repeat 2/2: default" in captured.err
    out = captured.out
    assert "VAR d2 96px batch 1 fp32 on cpu" in out and "2 alternated runs after 0 warm-up" in out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("scale"))
    assert header.split()[-4:] == ["baseline", "default", "default-unguided-last", "none"]
    assert sum(line.split()[0].isdigit() for line in out.splitlines()[2:]) == 5
    for label in ("total min ms", "total median ms", "speedup (min)", "speedup (median)"):
        assert any(line.strip().startswith(label) for line in out.splitlines()), label
    flops = next(line for line in out.splitlines() if line.strip().startswith("FLOP ratio")).split()
    assert flops[2] == "1.000" and float(flops[3]) < 1
    assert "text encoding + scales + decode" in out


def test_bench_falls_back_to_random_weights_when_none_are_at_hand(tiny_official, hub_offline, capsys, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    cli.main(["bench", "infinity", "--size", "256x256", "--repeats", "1", "--warmup", "0", "--preset", "paper",
              "--batch", "2"])
    captured = capsys.readouterr()
    assert "official weights not at hand" in captured.err and "timing random weights" in captured.err
    assert "batch 2" in captured.out
    header = next(line for line in captured.out.splitlines() if line.lstrip().startswith("scale"))
    assert header.split()[-2:] == ["baseline", "paper"]


def test_cuda_without_a_gpu_is_one_error_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = run_error(capsys, ["bench", "var", "--device", "cuda", "--random-weights"])
    assert "torch sees no CUDA device" in err


def test_generate_and_bench_hart(tmp_path, tiny_official, capsys):
    out = tmp_path / "fox.png"
    cli.main(["generate", "hart", "--random-weights", "--prompt", "a red fox", "--seed", "4", "--no-more-smooth",
              "--out", str(out)])
    expected = HARTPipeline.random()("a red fox", seed=4, more_smooth=False, progress=False)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    capsys.readouterr()
    cli.main(["bench", "hart", "--random-weights", "--repeats", "1", "--warmup", "0", "--batch", "2"])
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("scale"))
    assert header.split()[-5:] == ["baseline", "paper", "skip-last", "paper-unguided-last", "none"]
    assert "HART width 64, 2 blocks, 9 scales batch 2" in out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert len(rows) == 9 and rows[-1][-3] == "skipped"  # skip-last leaves out the last scale


def test_generate_with_offload_makes_the_same_image(tmp_path, tiny_official, monkeypatch):
    enabled = []
    original = VARPipeline.enable_model_cpu_offload
    monkeypatch.setattr(VARPipeline, "enable_model_cpu_offload", lambda self, device: enabled.append(device) or
                        original(self, device))
    cli.main(["generate", "var", "--random-weights", "--offload", "--device", "cpu", "--class", "5", "--out",
              str(tmp_path / "x.png")])
    assert enabled == ["cpu"]
    expected = VARPipeline.random(16)([5], seed=0, progress=False)[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x.png")), np.asarray(expected))


def test_offload_to_a_missing_device_is_refused_before_loading(capsys, monkeypatch):
    monkeypatch.setattr(VARPipeline, "from_arguments", lambda *a, **k: pytest.fail("loaded before the device check"))
    line = run_error(capsys, ["generate", "var", "--random-weights", "--offload", "--device", "cuda"])
    assert "device 'cuda' asked for, but torch sees no CUDA device" in line
