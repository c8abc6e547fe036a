"""Evaluation sets (fastvar.sample / `fastvar sample`): inputs, batching and seeds, layouts, resume, torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fastvar
from fastvar import HARTPipeline, InfinityPipeline, VARPipeline, cli, sampler
from fastvar.sampler import Item


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file of an output folder but the resume state, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and sampler.STATE not in p.parts}


def without_timing(files: dict[str, bytes]) -> dict[str, object]:
    """The files with the timings (which differ run to run) taken out of metadata and summary."""
    out: dict[str, object] = dict(files)
    out["metadata.jsonl"] = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                             for line in files["metadata.jsonl"].decode().splitlines()]
    summary = json.loads(files["summary.json"])
    out["summary.json"] = {k: v for k, v in summary.items() if k in ("images", "batches", "preset", "fastvar")}
    return out


# ----------------------------------------------------------------------------- inputs


def test_prompt_files_text_jsonl_and_geneval(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("a red fox\n\n  a blue bird  \n")
    assert sampler.read_prompts(text, per_prompt=2) == [Item("a red fox", 2, metadata={"prompt": "a red fox"}),
                                                        Item("a blue bird", 2, metadata={"prompt": "a blue bird"})]
    geneval = {"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "a photo of two cats"}
    lines = [geneval, {"prompt": "x", "n": 3, "seed": 7, "negative_prompt": "blurry", "style": "oil"}]
    jsonl = tmp_path / "evaluation_metadata.jsonl"
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    first, second = sampler.read_prompts(jsonl, per_prompt=4)
    assert first == Item("a photo of two cats", 4, metadata=geneval)
    assert second == Item("x", 3, 7, "blurry", lines[1])


@pytest.mark.parametrize("content, expected", [
    ('{"prompt": "a"}\n{"prompt": \n', r"p.jsonl:2: not a JSON object"),
    ('{"text": "a"}\n', r"p.jsonl:1: each line must be a JSON object with a non-empty string 'prompt'"),
    ('{"prompt": "a", "n": 0}\n', r"p.jsonl:1: 'n' must be an int >= 1, got 0"),
    ('{"prompt": "a", "seed": "1"}\n', r"p.jsonl:1: 'seed' must be an int"),
    ("\n\n", r"holds no prompt"),
])
def test_bad_prompt_files_name_the_line(tmp_path, content, expected):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=expected):
        sampler.read_prompts(path)


def test_class_ranges():
    assert [i.input for i in sampler.class_items("3-5", 2)] == [3, 4, 5]
    assert sampler.class_items("7", 1) == [Item(7, 1, metadata={"class_id": 7})]
    for bad in ("5-3", "0-1000", "a-b", "1-2-3"):
        with pytest.raises(ValueError, match="classes"):
            sampler.class_items(bad, 1)


def test_batches_cover_every_image_once_in_order_with_their_seeds():
    items = [Item("a", 3), Item("b", 2, seed=50), Item("c", 1), Item("d", 2, negative_prompt="n"), Item("e", 1)]
    batches = sampler.plan_batches(items, batch_size=2, seed=10)
    assert [[img for img, _, _ in b.images] for b in batches] == [[0, 1], [2], [3, 4], [5], [6, 7], [8]]
    assert [b.seed for b in batches] == [10, 11, 50, 13, 14, 15]  # batch i: seed + i; an own seed: its own
    assert [(item, k) for b in batches[:2] for _, item, k in b.images] == [(0, 0), (0, 1), (0, 2)]
    own = sampler.plan_batches([Item("b", 5, seed=50)], batch_size=2, seed=0)
    assert [b.seed for b in own] == [50, 51, 52]


# ----------------------------------------------------------------------------- runs through the Python API


@pytest.fixture
def var_pipe(tiny_official):
    return VARPipeline.random(16)


def test_flat_run_writes_each_batch_as_the_pipeline_makes_it(tmp_path, var_pipe):
    items = sampler.class_items("1-3", 2)
    summary = fastvar.sample(var_pipe, items, tmp_path / "out", batch_size=4, seed=5, cfg=2.0)
    out = tmp_path / "out"
    first = var_pipe([1, 1, 2, 2], seed=5, cfg=2.0, progress=False)
    second = var_pipe([3, 3], seed=6, cfg=2.0, progress=False)
    for index, image in enumerate(first + second):
        assert np.array_equal(np.asarray(Image.open(out / f"{index:06d}.png")), np.asarray(image))
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [(r["class_id"], r["seed"], r["batch"], r["file"]) for r in records] == [
        (1, 5, 0, "000000.png"), (1, 5, 0, "000001.png"), (2, 5, 0, "000002.png"), (2, 5, 0, "000003.png"),
        (3, 6, 1, "000004.png"), (3, 6, 1, "000005.png")]
    assert all(r["preset"] == "default" and r["size"] == [96, 96] and r["seconds"] > 0 for r in records)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["images"] == 6 and summary["batches_this_run"] == 2 and "ideal FLOP ratio" in summary["fastvar"]
    assert not list((out / sampler.STATE / "tmp").iterdir())  # every temporary file was renamed


def test_unpatched_run_and_npz(tmp_path, var_pipe):
    fastvar.sample(var_pipe, sampler.class_items("0-2", 1), tmp_path, layout="npz", batch_size=2, preset=None)
    expected = var_pipe([0, 1], seed=0, preset=None, progress=False) + var_pipe([2], seed=1, preset=None,
                                                                                progress=False)
    arrays = np.load(tmp_path / "samples.npz")["arr_0"]
    assert arrays.dtype == np.uint8 and arrays.shape == (3, 96, 96, 3)
    assert np.array_equal(arrays, np.stack([np.asarray(i) for i in expected]))
    assert json.loads((tmp_path / "summary.json").read_text())["fastvar"] is None


def test_a_killed_run_resumes_to_the_uninterrupted_set(tmp_path, var_pipe, monkeypatch):
    items = sampler.class_items("0-4", 1)
    fastvar.sample(var_pipe, items, tmp_path / "whole", batch_size=1)
    calls, save = [], Image.Image.save

    def crash_in_the_fourth_write(image, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 4:  # the process dies with this image half-written
            Path(fp).write_bytes(b"\x89PNG half")
            raise KeyboardInterrupt
        return save(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", crash_in_the_fourth_write)
    with pytest.raises(KeyboardInterrupt):
        fastvar.sample(var_pipe, items, tmp_path / "resumed", batch_size=1)
    monkeypatch.setattr(Image.Image, "save", save)
    done = sorted(p.name for p in (tmp_path / "resumed").glob("*.png"))
    assert done == ["000000.png", "000001.png", "000002.png"]  # the half-written one is only a temporary file
    generated = []
    original_call = VARPipeline.__call__
    monkeypatch.setattr(VARPipeline, "__call__", lambda self, class_ids, **kw: generated.append(class_ids) or
                        original_call(self, class_ids, **kw))
    summary = fastvar.sample(var_pipe, items, tmp_path / "resumed", batch_size=1)
    assert generated == [[3], [4]] and summary["batches_this_run"] == 2
    assert without_timing(files_of(tmp_path / "resumed")) == without_timing(files_of(tmp_path / "whole"))


def test_a_folder_of_another_run_is_refused(tmp_path, var_pipe):
    items = sampler.class_items("0-1", 1)
    fastvar.sample(var_pipe, items, tmp_path, batch_size=1)
    with pytest.raises(ValueError, match=r"holds another run \(it differs in \['batch_size'\]\)"):
        fastvar.sample(var_pipe, items, tmp_path, batch_size=2)
    with pytest.raises(ValueError, match=r"differs in \['options'\]"):
        fastvar.sample(var_pipe, items, tmp_path, batch_size=1, cfg=1.0)


def test_mistakes_are_refused_before_any_image(tmp_path, var_pipe):
    cases = [
        (dict(items=[Item("a fox")]), "var generates from class ids; an item's input is 'a fox'"),
        (dict(items=[Item(1, negative_prompt="x")]), "an item has a 'negative_prompt', which var does not take"),
        (dict(tau=1.0), r"var sampling options \['tau'\] do not exist"),
        (dict(layout="png"), "layout 'png' is not one of"),
        (dict(preset="fast"), "unknown var preset 'fast'"),
        (dict(batch_size=0), "batch_size must be an int >= 1"),
    ]
    for overrides, expected in cases:
        kwargs = {"items": [Item(1)], "out_dir": tmp_path / "out", **overrides}
        with pytest.raises(ValueError, match=expected):
            fastvar.sample(var_pipe, **kwargs)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        fastvar.sample(var_pipe, [Item(1)], tmp_path / "file")
    assert not (tmp_path / "out").exists()


def test_geneval_layout_with_own_seeds_and_negative_prompts_on_infinity(tmp_path, tiny_official):
    pipe = InfinityPipeline.random()
    lines = [{"tag": "single_object", "prompt": "a photo of a bench"},
             {"prompt": "a cat", "n": 2, "seed": 9, "negative_prompt": "blurry"}]
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    options = dict(size=(256, 256), top_k=2)
    fastvar.sample(pipe, sampler.read_prompts(path, per_prompt=2), tmp_path / "geneval", layout="geneval",
                   batch_size=4, seed=3, **options)
    out = tmp_path / "geneval"
    for index, line in enumerate(lines):
        assert json.loads((out / f"{index:05d}" / "metadata.jsonl").read_text()) == line
        assert sorted(p.name for p in (out / f"{index:05d}" / "samples").iterdir()) == ["0000.png", "0001.png"]
    expected = {0: pipe(["a photo of a bench"] * 2, seed=3, progress=False, **options),
                1: pipe(["a cat"] * 2, seed=9, negative_prompt=["blurry"] * 2, progress=False, **options)}
    for index, images in expected.items():
        for k, image in enumerate(images):
            png = Image.open(out / f"{index:05d}" / "samples" / f"{k:04d}.png")
            assert np.array_equal(np.asarray(png), np.asarray(image))


def test_hart_flat_run(tmp_path, tiny_official):
    pipe = HARTPipeline.random()
    items = [Item("a red fox"), Item("a blue bird")]
    fastvar.sample(pipe, items, tmp_path, batch_size=2, seed=4, more_smooth=False)
    expected = pipe(["a red fox", "a blue bird"], seed=4, more_smooth=False, progress=False)
    for index, image in enumerate(expected):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"{index:06d}.png")), np.asarray(image))


# ----------------------------------------------------------------------------- the command, on one and two processes


def torchrun(processes: int, out: Path) -> subprocess.CompletedProcess:
    """``fastvar sample`` on a tiny VAR, under torchrun."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
            str(Path(__file__).with_name("tiny_cli.py")), "sample", "var", "--random-weights", "--device", "cpu",
            "--classes", "0-4", "--per-class", "2", "--batch", "2", "--out", str(out), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # as torchrun sets it for several processes
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)


def test_two_processes_under_torchrun_write_what_one_writes_and_resume_its_run(tmp_path):
    one, two = torchrun(1, tmp_path / "one"), torchrun(2, tmp_path / "two")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert "10 images in" in two.stderr and "(5 of 5 batches generated now" in two.stderr
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    assert len(list((tmp_path / "two").glob("*.png"))) == 10
    assert without_timing(files_of(tmp_path / "two")) == without_timing(files_of(tmp_path / "one"))
    # a one-process run stopped after two batches, finished by two processes
    shutil.copytree(tmp_path / "one", tmp_path / "part")
    for index in (2, 3, 4):
        (tmp_path / "part" / sampler.batch_record(index)).unlink()
    for name in ("000005.png", "000009.png", "metadata.jsonl", "summary.json"):
        (tmp_path / "part" / name).unlink()
    resumed = torchrun(2, tmp_path / "part")
    assert resumed.returncode == 0 and "(3 of 5 batches generated now" in resumed.stderr, resumed.stderr
    assert without_timing(files_of(tmp_path / "part")) == without_timing(files_of(tmp_path / "one"))


@pytest.mark.parametrize("argv, expected", [
    (["sample", "var", "--classes", "9-1", "--out", "{tmp}/o"], "classes '9-1': need FIRST <= LAST"),
    (["sample", "hart", "--prompts", "{tmp}/missing.txt", "--out", "{tmp}/o"], "missing.txt: cannot read it"),
    (["sample", "var", "--classes", "0-1", "--out", "{tmp}/o", "--preset", "fast"], "unknown var preset"),
    (["sample", "var", "--classes", "0-1", "--out", "{tmp}/file"], "is a file, not a folder"),
    (["sample", "var", "--classes", "0-1", "--prompts", "p.txt", "--out", "{tmp}/o"], "unrecognized arguments"),
    (["sample", "var", "--out", "{tmp}/o"], "the following arguments are required: --classes"),
])
def test_sample_mistakes_are_one_error_line(tmp_path, capsys, argv, expected):
    from test_cli import run_error

    (tmp_path / "file").write_text("")
    line = run_error(capsys, [a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert expected in line


def test_sample_command_on_tiny_models(tmp_path, tiny_official, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na blue bird\n")
    cli.main(["sample", "infinity", "--random-weights", "--prompts", str(prompts), "--size", "256x256", "--top-k",
              "2", "--out", str(tmp_path / "out"), "--no-fastvar", "--seed", "1", "--no-progress"])
    assert "2 images in" in capsys.readouterr().err
    expected = InfinityPipeline.random()("a blue bird", seed=2, size=(256, 256), top_k=2, preset=None,
                                         progress=False)[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "000001.png")), np.asarray(expected))
