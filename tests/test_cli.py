"""The fastvar command line, on tiny models standing in for the official ones."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_official_files
from PIL import Image

import fastvar
from fastvar import HARTPipeline, InfinityPipeline, VARPipeline, cli
from fastvar.pipelines import PIPELINES


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


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading or building any pipeline fails the test: what it checks comes before."""
    for family in PIPELINES.values():
        monkeypatch.setattr(family, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
        monkeypatch.setattr(family, "random", lambda *a, **k: pytest.fail("built a model"))


@pytest.mark.parametrize("argv, expected", [
    (["generate", "var", "--out", "{tmp}/x.txt"], r"the file name must end in an image format"),
    (["generate", "var", "--out", "{tmp}/missing/x.png"], r"the folder .*missing does not exist"),
    (["generate", "var", "--out", "{tmp}"], r"--out .*: the file name must end in an image format"),
    (["generate", "var", "--out", "{tmp}/folder.png"], r"folder.png is a folder; give a file name"),
    (["generate", "var", "--preset", "paper", "--out", "{tmp}/x.png"], r"unknown var preset\(s\) \['paper'\]"),
    (["generate", "var", "--depth", "7", "--out", "{tmp}/x.png"], r"no official VAR of depth 7"),
    (["generate", "infinity", "--depth", "2", "--out", "{tmp}/x.png"], r"--depth cuts the official model and needs "
                                                                       r"--random-weights"),
    (["generate", "var", "--dtype", "fp64"], r"argument --dtype: invalid choice: 'fp64'"),
    (["generate", "var", "--class", "dog"], r"argument --class: invalid int value: 'dog'"),
    (["generate", "var", "--class", "1000", "--depth", "30"], r"class id 1000 is out of range: ImageNet class ids "
                                                              r"are 0\.\.999$"),
    (["generate", "var", "--top-p", "2"], r"top_p = 2\.0: must be a number in \[0, 1\]"),
    (["generate", "var", "--cfg", "-1"], r"cfg = -1\.0: the guidance scale must be a number >= 0"),
    (["generate", "var", "--num-samples", "0"], r"--num-samples must be >= 1, got 0"),
    (["generate", "var", "--num-samples", "100000"], r"100000 images asked for; generate makes at most 64 \(one "
                                                     r"batch, one grid\): fastvar sample makes any number"),
    (["generate", "var", "--seed", str(2**70)], r"seed = 1180591620717411303424: must be an int from -2\*\*63 to "
                                                r"2\*\*64 - 1"),
    (["generate", "var", "--resolution", "512"], r"--resolution picks the schedule of random weights"),
    (["generate", "var", "--random-weights", "--weights", "w.pth"], r"--weights gives files to load and "
                                                                    r"--random-weights asks for none: give one or"),
    (["generate", "hart", "--random-weights", "--text-encoder", "q", "--vae-weights", "v"],
     r"--vae-weights and --text-encoder give files to load"),
    (["generate", "infinity", "--size", "1000x1000"], r"unsupported size 1000x1000 \(width x height\); nearest "
                                                      r"supported: 1024x1024"),
    (["generate", "infinity", "--aspect-ratio", "7"], r"unsupported aspect ratio \(height / width\) 7\.0"),
    (["generate", "infinity", "--tau", "0"], r"tau = 0\.0: the temperature must be a number > 0"),
    (["generate", "infinity", "--random-weights", "--depth", "40"], r"--depth must be in 1\.\.32 for infinity-2b"),
    (["bench", "var", "--repeats", "0"], r"argument --repeats: must be >= 1, got 0"),
    (["bench", "var", "--batch", "0"], r"argument --batch: must be >= 1, got 0"),
    (["bench", "var", "--preset", "fast"],
     r"unknown var preset\(s\) \['fast'\]; available: \['default', 'default-unguided-last', 'none'\]"),
    (["bench", "var", "--json", "{tmp}"], r"--json .*: .* is a folder; give a file name"),
    (["bench", "var", "--json", "{tmp}/missing/x.json"], r"--json .*: the folder .*missing does not exist"),
    (["bench", "infinity", "--size", "1000x1000"], r"unsupported size 1000x1000"),
    (["compare", "var", "--classes", "0-1", "--presets", "default", "--config", '{{"name": "default"}}', "--out",
      "{tmp}/c"], r"--config default: the name 'default' is taken"),
    (["compare", "var", "--classes", "0-1", "--config", '{{"name": "deep", "preset": "default", "layers": [99]}}',
      "--out", "{tmp}/c"], r"deep does not fit this model \(16 blocks, 10 scales\): layer 99 does not exist"),
    (["compare", "var", "--classes", "0-1", "--config", '{{"name": "s", "skip_last": 20}}', "--out", "{tmp}/c"],
     r"s does not fit this model .*: skip_last=20 leaves no scale to run"),
    (["compare", "var", "--classes", "0-1", "--config", '{{"name": "s", "prune": {{"-1": 2}}}}', "--out", "{tmp}/c"],
     r"--config s: prune\[-1\] = 2: a pruning ratio must be a number in \[0, 1\]"),
    (["compare", "var", "--classes", "0-1", "--presets", "none", "--seeds", str(2**64), "--out", "{tmp}/c"],
     r"seed = 18446744073709551616: must be an int"),
    (["sample", "var", "--classes", "0-999", "--per-class", "1000000000", "--out", "{tmp}/s"],
     r"1000000000000 images asked for; a run makes at most 10,000,000"),
    (["sample", "infinity", "--prompts", "{tmp}/p.txt", "--size", "1000x1000", "--out", "{tmp}/s"],
     r"unsupported size 1000x1000"),
    (["generate", "llama"], r"argument family: invalid choice: 'llama'"),
])
def test_mistakes_are_one_error_line_before_anything_is_loaded(tmp_path, capsys, nothing_loads, argv, expected):
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "p.txt").write_text("a prompt\n")
    err = run_error(capsys, [a.format(tmp=tmp_path) for a in argv])
    assert re.search(expected, err), err


def test_a_changed_sample_run_is_refused_before_loading(tmp_path, tiny_official, capsys, monkeypatch):
    argv = ["sample", "var", "--random-weights", "--classes", "0-1", "--out", str(tmp_path), "--no-progress"]
    cli.main(argv)
    for family in PIPELINES.values():
        monkeypatch.setattr(family, "random", lambda *a, **k: pytest.fail("built a model"))
    line = run_error(capsys, [*argv, "--batch", "2"])
    assert re.search(r"holds another run, which differs in \['batch_size'\]", line), line
    line = run_error(capsys, [*argv, "--cfg", "1.0"])
    assert "differs in ['options']" in line


def test_an_unwritable_output_is_refused_before_anything_runs(tmp_path, capsys, nothing_loads, monkeypatch):
    """A read-only mount: making a file there fails (permission bits do not stop root, so the mount is
    what is simulated)."""
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(cli.tempfile, "TemporaryFile", read_only)
    for argv in (["bench", "var", "--json", str(tmp_path / "b.json")], ["generate", "var", "--out",
                                                                        str(tmp_path / "x.png")],
                 ["compare", "var", "--classes", "0", "--presets", "none", "--out", str(tmp_path / "c")],
                 ["sample", "var", "--classes", "0", "--out", str(tmp_path / "s")]):
        line = run_error(capsys, argv)
        assert f"cannot write in {tmp_path} (Read-only file system)" in line, line


def test_a_finished_result_is_never_lost_to_a_failed_write(tmp_path, tiny_official, capsys, monkeypatch):
    """The output became unwritable while the work ran: the result goes to a new temporary folder, named."""
    out = tmp_path / "x.png"
    save = Image.Image.save

    def fail_at_out(image, fp, *args, **kwargs):
        if Path(fp).parent == tmp_path:
            raise OSError(28, "No space left on device")
        return save(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", fail_at_out)
    line = run_error(capsys, ["generate", "var", "--random-weights", "--class", "1", "2", "--out", str(out)])
    match = re.search(r"cannot write .*x\.png \(No space left on device\); the result is saved in (\S+) instead",
                      line)
    assert match, line
    rescued = Path(match.group(1))
    assert sorted(p.name for p in rescued.iterdir()) == ["x-0.png", "x-1.png", "x.png"]
    expected = VARPipeline.random(16)([1, 2], seed=0, progress=False)
    assert np.array_equal(np.asarray(Image.open(rescued / "x-1.png")), np.asarray(expected[1]))
    monkeypatch.setattr(Image.Image, "save", save)
    write_text = Path.write_text

    def fail_at_json(path, *args, **kwargs):
        if path.parent == tmp_path:
            raise OSError(28, "No space left on device")
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", fail_at_json)
    line = run_error(capsys, ["bench", "var", "--random-weights", "--repeats", "1", "--warmup", "0", "--preset",
                              "none", "--json", str(tmp_path / "b.json")])
    rescued = Path(re.search(r"the result is saved in (\S+) instead", line).group(1))
    assert json.loads((rescued / "b.json").read_text())["variants"][1]["name"] == "none"


def test_an_interrupt_is_one_line_without_a_traceback(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(VARPipeline, "random", interrupted)
    with pytest.raises(SystemExit) as info:
        cli.main(["sample", "var", "--random-weights", "--classes", "0", "--out", "unused-folder"])
    err = capsys.readouterr().err
    assert info.value.code == 130 and "Traceback" not in err
    assert err.strip() == "interrupted; the same command resumes the run"


def test_help_lists_the_presets_and_reads_as_text(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "infinity", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("FastVAR preset, one of paper, prune-only, skip-only, paper-unguided-last, scalekv-10, "
            "paper-scalekv-10, none (default: paper)") in text
    cli.main([])
    assert "``" not in capsys.readouterr().out


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
    cli.main(["bench", "infinity", "--depth", "2", "--size", "256x256", "--repeats", "1", "--warmup", "0", "--preset",
              "none"])  # a cut model has no official weights: random ones are timed
    assert "(--depth cuts the official model and needs --random-weights); timing random weights" in \
        capsys.readouterr().err


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
