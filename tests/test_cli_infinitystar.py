"""The fastvar command for InfinityStar: videos and images from generate, VBench's layout from sample, compare
over frames, bench per scale; every mistake one error line before anything is loaded."""

from __future__ import annotations

import json
import math
import re
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import run_error

from fastvar import bench, cli, fidelity, sampler, video
from fastvar.pipelines import InfinityStarPipeline
from fastvar.sampler import Item, plan_batches

pytest.importorskip("transformers")
av = pytest.importorskip("av")

FRAMES = 17  # a 1-second video: 16 frames a second and the first


def decoded(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def arrays(frames) -> list[np.ndarray]:
    return [np.asarray(frame) for frame in frames]


def test_generate_writes_videos_and_images(tmp_path, tiny_infinitystar, capsys, monkeypatch):
    encoded, encode = [], video.mp4_bytes  # the frames each file holds, up to H.264
    monkeypatch.setattr(video, "mp4_bytes", lambda frames, fps: encoded.append(arrays(frames)) or encode(frames, fps))
    cli.main(["generate", "infinitystar", "--random-weights", "--prompt", "a red fox", "--prompt", "a cat",
              "--duration", "1", "--seed", "2", "--out", str(tmp_path / "clip.mp4")])
    assert capsys.readouterr().err.endswith(f"saved {tmp_path}/clip-0.mp4 ... {tmp_path}/clip-1.mp4 (2 video(s) of 17 "
                                            "frames at 16 fps)\n")
    assert [len(decoded(tmp_path / f"clip-{i}.mp4")) for i in range(2)] == [FRAMES, FRAMES]
    expected = InfinityStarPipeline.random()(["a red fox", "a cat"], duration=1, seed=2, progress=False)
    assert all(np.array_equal(a, b) for ours, clip in zip(encoded, expected) for a, b in zip(ours, arrays(clip)))
    cli.main(["generate", "infinitystar", "--random-weights", "--prompt", "a red fox", "--prompt", "a cat",
              "--duration", "0", "--size", "256x256", "--out", str(tmp_path / "grid.png")])  # images: a grid
    images = InfinityStarPipeline.random()(["a red fox", "a cat"], duration=0, size="256x256", progress=False)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "grid.png")), np.asarray(cli.to_grid(
        [clip[0] for clip in images])))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "grid-1.png")), np.asarray(images[1][0]))


def test_sample_writes_vbench_s_layout_seeded_per_video_and_resumes(tmp_path, tiny_infinitystar, capsys,
                                                                     monkeypatch):
    encoded, encode = [], sampler.mp4_bytes  # the frames each file holds, up to H.264
    monkeypatch.setattr(sampler, "mp4_bytes", lambda frames: encoded.append(arrays(frames)) or encode(frames))
    prompts = tmp_path / "vbench.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red fox running, rewritten", "prompt_en": "a red fox", "n": 2}) + "\n"
                       + json.dumps({"prompt": "a blue bird"}) + "\n")
    out = tmp_path / "out"
    argv = ["sample", "infinitystar", "--random-weights", "--prompts", str(prompts), "--batch", "2", "--seed", "10",
            "--duration", "1", "--layout", "vbench", "--out", str(out), "--no-progress"]
    cli.main(argv)
    assert "3 videos in" in capsys.readouterr().err
    names = ["a red fox-0.mp4", "a red fox-1.mp4", "a blue bird-0.mp4"]
    assert sorted(p.name for p in (out / "videos").iterdir()) == sorted(names)  # nothing else where VBench reads
    assert all(len(decoded(out / "videos" / name)) == FRAMES for name in names)
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [(r["file"], r["seed"], r["batch"], r["frames"]) for r in records] == [
        (f"videos/{name}", 10 + i, i // 2, FRAMES) for i, name in enumerate(names)]  # seed + the video's index
    fox = InfinityStarPipeline.random()("a red fox running, rewritten", duration=1, seed=11, progress=False)[0]
    assert all(np.array_equal(a, b) for a, b in zip(encoded[1], arrays(fox)))  # row 1 of 2 is the prompt alone
    cli.main(argv)
    assert "(0 of 2 batches generated now" in capsys.readouterr().err and len(encoded) == 3
    (out / "videos" / "a blue bird-0.mp4").unlink()
    cli.main(argv)
    err = capsys.readouterr().err
    assert "doing 1 finished batch(es) again" in err and "(1 of 2 batches generated now" in err
    assert len(decoded(out / "videos" / "a blue bird-0.mp4")) == FRAMES
    assert all(np.array_equal(a, b) for a, b in zip(encoded[3], encoded[2]))  # the same video again


def test_sample_writes_images_in_the_image_layouts(tmp_path, tiny_infinitystar, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na blue bird\n")
    cli.main(["sample", "infinitystar", "--random-weights", "--prompts", str(prompts), "--duration", "0", "--batch",
              "2", "--seed", "4", "--out", str(tmp_path / "out"), "--no-progress"])
    assert "2 images in" in capsys.readouterr().err
    bird = InfinityStarPipeline.random()("a blue bird", duration=0, seed=5, progress=False)[0][0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "000001.png")), np.asarray(bird))


def test_compare_measures_videos_over_their_frames(tmp_path, tiny_infinitystar, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n")
    cli.main(["compare", "infinitystar", "--random-weights", "--prompts", str(prompts), "--duration", "1", "--config",
              '{"name": "skip", "skip_last": 1}', "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "records no draws" not in out
    variants = json.loads((tmp_path / "compare.json").read_text())["variants"]
    agreement = [v["agreement"] for v in variants]  # per scale, the final run's tokens
    assert agreement[0] == [1.0] * 22 and agreement[1][-1] is None and agreement[1][:11] == [1.0] * 11
    assert [(v["name"], v["psnr"] == ["inf"]) for v in variants] == [("unpatched", True), ("skip", False)]
    assert 0 < variants[1]["psnr"][0] < 100 and variants[1]["ssim"][0] < 1
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width == 2 * fidelity.GRID_FRAMES * 336  # two columns, each cell four frames of the video


def test_video_metrics_take_every_frame():
    pytest.importorskip("torchmetrics")
    rng = np.random.default_rng(0)
    clip = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    changed = [*clip[:2], Image.fromarray(np.asarray(clip[2]) // 2)]
    psnr, ssim = fidelity.image_metrics([clip, changed], [clip, clip])
    assert psnr[0] == math.inf and ssim[0] == pytest.approx(1.0)
    error = (np.asarray(changed[2], dtype=float) - np.asarray(clip[2], dtype=float)) / 255
    assert psnr[1] == pytest.approx(10 * math.log10(1 / (error**2).sum() * (3 * error.size)), rel=1e-5)
    frame_ssim = fidelity.image_metrics([changed[2]], [clip[2]])[1][0]
    assert ssim[1] == pytest.approx((2 + frame_ssim) / 3, rel=1e-5)  # the mean of its frames'


def test_bench_reports_each_scale_over_its_runs(tiny_infinitystar, capsys):
    cli.main(["bench", "infinitystar", "--random-weights", "--duration", "0", "--repeats", "1", "--warmup", "0",
              "--preset", "none"])
    out = capsys.readouterr().out
    assert "InfinityStar 8b-720p width 64, 2 blocks batch 1 fp32" in out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [r[1] for r in rows] == ["1x1x1", "1x2x3", "1x2x4", "1x3x5", "1x4x7", "1x4x8", "1x5x9", "1x6x11", "1x8x13",
                                    "1x9x16", "1x12x21"]  # one row per scale, whatever its runs
    assert all(float(r[2]) > 0 for r in rows)


def test_decoding_starts_at_the_decoder_s_first_call():
    """A video decoder runs chunk by chunk: decoding is timed from its first chunk."""
    block, decoder = torch.nn.Identity(), torch.nn.Identity()
    clock = bench.StepClock(block, decoder, torch.device("cpu"))

    def call() -> None:
        block(torch.zeros(1))
        for _ in range(2):
            decoder(torch.zeros(1))
            time.sleep(0.05)

    (total, steps, decode), _ = clock.run(call)
    clock.close()
    assert len(steps) == 1 and steps[0] < 0.04 and 0.1 <= decode <= total


def test_scale_seconds_group_each_scale_s_runs():
    steps = [0.5, 1.0, 2.0, 4.0, 8.0]  # a text pass, then scale 0 twice, scale 1 once, scale 2 skipped, scale 3 once
    assert bench.scale_seconds(steps, [2, 1, 0, 1]) == [3.5, 4.0, 0.0, 8.0]
    assert bench.scale_seconds(steps, None) == steps  # a call per scale


@pytest.fixture
def nothing_loads(monkeypatch):
    monkeypatch.setattr(InfinityStarPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.setattr(InfinityStarPipeline, "random", lambda *a, **k: pytest.fail("built a model"))


@pytest.mark.parametrize("argv, expected", [
    (["generate", "--duration", "7"], r"duration = 7: infinitystar-8b-720p makes 0 or 5 seconds \(0: an image\)$"),
    (["generate", "--model", "8b-480p", "--duration", "3"], r"infinitystar-8b-480p makes 0, 5 or 10 seconds"),
    (["generate", "--size", "1000x1000"], r"unsupported size 1000x1000 \(width x height\) for infinitystar-8b-720p; "
                                          r"nearest supported: 960x960"),
    (["generate", "--model", "8b-480p", "--size", "1280x720"], r"unsupported size 1280x720 .* for "
                                                              r"infinitystar-8b-480p; nearest supported: 848x480"),
    (["generate", "--out", "{tmp}/clip.avi"], r"--out .*clip\.avi: a video is written as \.mp4, \.gif, \.webp, \.png"),
    (["generate", "--duration", "0", "--out", "{tmp}/x.mp4"], r"the file name must end in an image format"),
    (["generate", "--out", "{tmp}/missing/x.mp4"], r"the folder .*missing does not exist"),
    (["generate", "--random-weights", "--depth", "40"], r"--depth must be in 1\.\.36 for InfinityStar-8B"),
    (["generate", "--tau-video", "0"], r"tau = 0\.0: the temperature must be a number > 0"),
    (["generate", "--apg-norm-threshold", "-1"], r"apg_norm_threshold = -1\.0: must be a number >= 0"),
    (["sample", "--prompts", "{tmp}/p.txt", "--layout", "geneval", "--out", "{tmp}/s"],
     r"layout 'geneval' holds images; videos go in 'flat' \(NNNNNN\.mp4\) or 'vbench'"),
    (["sample", "--prompts", "{tmp}/p.txt", "--layout", "vbench", "--duration", "0", "--out", "{tmp}/s"],
     r"layout 'vbench' holds videos"),
    (["sample", "--prompts", "{tmp}/twice.txt", "--layout", "vbench", "--out", "{tmp}/s"],
     r"items 0 and 1 are both named 'a fox': their videos would overwrite each other"),
    (["sample", "--prompts", "{tmp}/slash.txt", "--layout", "vbench", "--out", "{tmp}/s"],
     r"item 0: 'red/green' cannot name a file"),
    (["calibrate", "--prompts", "{tmp}/p.txt", "--out", "{tmp}/b.json"], r"calibrate measures a KV budget, and "
                                                                         r"infinitystar takes none"),
])
def test_mistakes_are_one_error_line_before_anything_is_loaded(tmp_path, capsys, nothing_loads, argv, expected):
    for name, text in (("p.txt", "a fox\n"), ("twice.txt", "a fox\na fox\n"), ("slash.txt", "red/green\n")):
        (tmp_path / name).write_text(text)
    line = run_error(capsys, [argv[0], "infinitystar", *(a.format(tmp=tmp_path) for a in argv[1:])])
    assert re.search(expected, line), line


def test_without_pyav_mp4_is_refused_before_loading_naming_the_extra(tmp_path, capsys, nothing_loads, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import fails as if not installed
    (tmp_path / "p.txt").write_text("a fox\n")
    for argv in (["generate", "infinitystar"], ["generate", "infinitystar", "--out", str(tmp_path / "x.mp4")],
                 ["sample", "infinitystar", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "s")]):
        line = run_error(capsys, argv)
        assert re.search(r"writing \.mp4 needs PyAV: pip install .*av.*; without it, write an animated \.gif or "
                         r"\.webp, or \.png", line), line
    assert not (tmp_path / "s").exists()


def test_help_lists_the_official_settings(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "infinitystar", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--duration DURATION seconds at 16 fps, 0 for an image (8b-720p: 0, 5; 8b-480p: 0, 5, 10) "
                   "(default: 5)", "--cfg CFG APG guidance scale (default: 34.0)", "(default: 0.4)",
                   "--model {8b-720p,8b-480p}", "--no-prompt-suffix"):
        assert option in text, option


def test_a_video_s_seed_does_not_depend_on_the_batch():
    items = [Item("a", 3), Item("b", 2, seed=50)]
    for size in (1, 2, 3):
        assert [s for b in plan_batches(items, size, seed=10) for s in b.image_seeds] == [10, 11, 12, 50, 51]
