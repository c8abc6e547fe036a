"""Evaluation sets (fastvar.sample / `fastvar sample`): inputs, batching and seeds, layouts, resume, torchrun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastvar
from fastvar import HARTPipeline, InfinityPipeline, VARPipeline, cli, run_folder, sampler
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
    text.write_text('{curly} braces first\n')  # a text file is text, whatever its first character
    assert sampler.read_prompts(text) == [Item("{curly} braces first", metadata={"prompt": "{curly} braces first"})]
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
    ('{"prompt": "a", "seed": "1"}\n', r"p.jsonl:1: 'seed' = '1': must be an int"),
    ('{"prompt": "a", "seed": 18446744073709551616}\n', r"p.jsonl:1: 'seed' = 18446744073709551616: must be an int "
                                                        r"from -2\*\*63 to 2\*\*64 - 1"),
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
    batches = list(sampler.plan_batches(items, batch_size=2, seed=10))
    assert [[img for img, _, _ in b.images] for b in batches] == [[0, 1], [2], [3, 4], [5], [6, 7], [8]]
    assert [b.index for b in batches] == list(range(6))
    assert [b.seed for b in batches] == [10, 11, 50, 13, 14, 15]  # batch i: seed + i; an own seed: its own
    assert [(item, k) for b in batches[:2] for _, item, k in b.images] == [(0, 0), (0, 1), (0, 2)]
    own = sampler.plan_batches([Item("b", 5, seed=50)], batch_size=2, seed=0)
    assert [b.seed for b in own] == [50, 51, 52]
    huge = sampler.plan_batches([Item("a", 10**12)], batch_size=4, seed=0)  # planned as it is asked for
    assert next(huge).images == ((0, 0, 0), (1, 0, 1), (2, 0, 2), (3, 0, 3))


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


def test_an_interrupted_run_resumes_to_the_uninterrupted_set(tmp_path, var_pipe, monkeypatch):
    items = sampler.class_items("0-4", 1)
    fastvar.sample(var_pipe, items, tmp_path / "whole", batch_size=1)
    calls, png_bytes = [], run_folder.png_bytes

    def interrupt_the_fourth_image(image):
        calls.append(image)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return png_bytes(image)

    monkeypatch.setattr(run_folder, "png_bytes", interrupt_the_fourth_image)
    with pytest.raises(KeyboardInterrupt):
        fastvar.sample(var_pipe, items, tmp_path / "resumed", batch_size=1)
    monkeypatch.setattr(run_folder, "png_bytes", png_bytes)
    assert sorted(p.name for p in (tmp_path / "resumed").glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    generated = []
    original_call = VARPipeline.__call__
    monkeypatch.setattr(VARPipeline, "__call__", lambda self, class_ids, **kw: generated.append(class_ids) or
                        original_call(self, class_ids, **kw))
    summary = fastvar.sample(var_pipe, items, tmp_path / "resumed", batch_size=1)
    assert generated == [[3], [4]] and summary["batches_this_run"] == 2
    assert without_timing(files_of(tmp_path / "resumed")) == without_timing(files_of(tmp_path / "whole"))


@pytest.mark.parametrize("layout", ["flat", "geneval", "npz"])
def test_resume_believes_the_disk_not_its_records(tmp_path, var_pipe, capsys, layout):
    """Images deleted, truncated or changed after a run finished: their batches are done again."""
    items = sampler.class_items("0-3", 2)
    fastvar.sample(var_pipe, items, tmp_path / "whole", layout=layout, batch_size=2, progress=False)
    run = tmp_path / "run"
    fastvar.sample(var_pipe, items, run, layout=layout, batch_size=2, progress=False)
    files = [r["file"] for r in map(json.loads, (run / "metadata.jsonl").read_text().splitlines())]
    (run / files[5]).unlink()
    (run / files[2]).write_bytes((run / files[2]).read_bytes()[:100])
    changed = bytearray((run / files[7]).read_bytes())
    changed[-20] ^= 1  # the same size, another byte
    (run / files[7]).write_bytes(bytes(changed))
    (run / "samples.npz").unlink(missing_ok=True)
    capsys.readouterr()
    summary = fastvar.sample(var_pipe, items, run, layout=layout, batch_size=2, progress=False)
    line = capsys.readouterr().err.strip()
    assert line == (f"doing 3 finished batch(es) again, their files are not as written: batch 1 ({files[2]} has 100 "
                    f"bytes, {(tmp_path / 'whole' / files[2]).stat().st_size} were written), batch 2 ({files[5]} is "
                    f"missing), batch 3 ({files[7]} was changed since it was written)")
    assert summary["images"] == 8 and summary["batches_this_run"] == 3
    assert without_timing(files_of(run)) == without_timing(files_of(tmp_path / "whole"))


def test_a_run_killed_in_the_middle_of_a_batch_resumes_to_the_uninterrupted_set(tmp_path):
    """SIGKILL while a batch is half written: its images on disk but not its record, the lock held."""
    def command(out: Path, delay: float = 0.0) -> list[str]:
        return [sys.executable, str(Path(__file__).with_name("tiny_cli.py")), "sample", "var", "--random-weights",
                "--device", "cpu", "--classes", "0-3", "--per-class", "2", "--batch", "2", "--layout", "npz",
                "--out", str(out), "--no-progress"]

    env = dict(os.environ, OMP_NUM_THREADS="1")
    whole = subprocess.run(command(tmp_path / "whole"), env=env, capture_output=True, text=True, timeout=900)
    assert whole.returncode == 0, whole.stderr
    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed), env=dict(env, TINY_CLI_WRITE_DELAY="0.5"),
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 900
    while not (killed / "000004.png").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (killed / "000004.png").exists() and not (killed / sampler.batch_record(2)).exists()
    resumed = subprocess.run(command(killed), env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0 and "8 images in" in resumed.stderr, resumed.stderr
    assert "(2 of 4 batches generated now" in resumed.stderr
    assert without_timing(files_of(killed)) == without_timing(files_of(tmp_path / "whole"))


def test_an_image_that_vanishes_during_the_run_is_not_reported_as_there(tmp_path, var_pipe, monkeypatch):
    items = sampler.class_items("0-2", 1)
    run_batch = sampler.run_batch

    def delete_the_first_image_after_the_last_batch(pipe, items, batch, out, *args):
        records = run_batch(pipe, items, batch, out, *args)
        if batch.index == 2:
            (out / "000000.png").unlink()
        return records

    monkeypatch.setattr(sampler, "run_batch", delete_the_first_image_after_the_last_batch)
    with pytest.raises(ValueError, match=r"1 image\(s\) of .* changed while the run went on \(000000.png is missing\)"):
        fastvar.sample(var_pipe, items, tmp_path, batch_size=1, progress=False)
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "metadata.jsonl").exists()
    monkeypatch.undo()
    assert fastvar.sample(var_pipe, items, tmp_path, batch_size=1, progress=False)["images"] == 3


def test_a_folder_of_another_run_is_refused(tmp_path, var_pipe, monkeypatch):
    items = sampler.class_items("0-1", 1)
    fastvar.sample(var_pipe, items, tmp_path, batch_size=1)
    with pytest.raises(ValueError, match=r"holds another run, which differs in \['batch_size'\] \(batch_size: 1 "
                                         r"there, 2 now\)"):
        fastvar.sample(var_pipe, items, tmp_path, batch_size=2)
    with pytest.raises(ValueError, match=r"differs in \['options'\]"):
        fastvar.sample(var_pipe, items, tmp_path, batch_size=1, cfg=1.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # a CPU's sums split by thread: other pixels
    try:
        with pytest.raises(ValueError, match=rf"differs in \['hardware'\] \(hardware: 'cpu, {threads} threads' there"):
            fastvar.sample(var_pipe, items, tmp_path, batch_size=1)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    with pytest.raises(ValueError, match=r"differs in \['torch'\]"):
        fastvar.sample(var_pipe, items, tmp_path, batch_size=1)


def test_a_folder_of_other_files_is_refused_unless_allowed(tmp_path, var_pipe):
    (tmp_path / "000000.png").write_bytes(b"mine")
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match="holds files of no fastvar run; sample into an empty or new folder"):
        fastvar.sample(var_pipe, [Item(1)], tmp_path)
    assert (tmp_path / "000000.png").read_bytes() == b"mine" and not (tmp_path / sampler.STATE).exists()
    fastvar.sample(var_pipe, [Item(1)], tmp_path, allow_existing=True, progress=False)
    assert (tmp_path / "000000.png").read_bytes() != b"mine"
    fastvar.sample(var_pipe, [Item(1)], tmp_path, progress=False)  # a fastvar run now: resumed


def test_a_folder_another_run_writes_is_refused_naming_it(tmp_path, var_pipe):
    held = run_folder.lock(tmp_path)  # another open of the lock file: what another process would hold
    try:
        with pytest.raises(ValueError, match=rf"is being written by another fastvar sample \(pid {os.getpid()}\)"):
            fastvar.sample(var_pipe, [Item(1)], tmp_path)
    finally:
        run_folder.release(held)
    assert fastvar.sample(var_pipe, [Item(1)], tmp_path, progress=False)["images"] == 1


def test_mistakes_are_refused_before_any_image(tmp_path, var_pipe):
    cases = [
        (dict(items=[Item("a fox")]), "var generates from class ids; an item's input is 'a fox'"),
        (dict(items=[Item(1, negative_prompt="x")]), "an item has a 'negative_prompt', which var does not take"),
        (dict(tau=1.0), r"var sampling options \['tau'\] do not exist"),
        (dict(layout="png"), "layout 'png' is not one of"),
        (dict(preset="fast"), "unknown var preset 'fast'"),
        (dict(batch_size=0), "batch_size must be an int >= 1"),
        (dict(items=[Item(1000)]), r"class id 1000 is out of range: ImageNet class ids are 0\.\.999"),
        (dict(top_p=2.0), r"top_p = 2\.0: must be a number in \[0, 1\]"),
        (dict(items=[Item(1, 2)], seed=2**64 - 1), r"the last batch's seed \(seed 18446744073709551615 \+ 1\) = "),
        (dict(items=sampler.class_items("0-999", 10**9)), r"1000000000000 images asked for; a run makes at most "
                                                          r"10,000,000"),
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


def torchrun(processes: int, out: Path, batch: int = 2) -> subprocess.CompletedProcess:
    """``fastvar sample`` on a tiny VAR, under torchrun."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
            str(Path(__file__).with_name("tiny_cli.py")), "sample", "var", "--random-weights", "--device", "cpu",
            "--classes", "0-4", "--per-class", "2", "--batch", str(batch), "--out", str(out), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # as torchrun sets it for several processes
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)  # seconds; minutes when loaded


def test_two_processes_under_torchrun_write_what_one_writes_and_resume_its_run(tmp_path):
    one, two = torchrun(1, tmp_path / "one"), torchrun(2, tmp_path / "two")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert "10 images in" in two.stderr and "(5 of 5 batches generated now" in two.stderr
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    assert len(list((tmp_path / "two").glob("*.png"))) == 10
    assert without_timing(files_of(tmp_path / "two")) == without_timing(files_of(tmp_path / "one"))
    # a one-process run stopped after two batches, finished by two processes
    # and an image of a finished batch deleted: rank 0 reads the folder, every rank acts on its verdict
    shutil.copytree(tmp_path / "one", tmp_path / "part")
    for index in (2, 3, 4):
        (tmp_path / "part" / sampler.batch_record(index)).unlink()
    for name in ("000000.png", "000005.png", "000009.png", "metadata.jsonl", "summary.json"):
        (tmp_path / "part" / name).unlink()
    resumed = torchrun(2, tmp_path / "part")
    assert resumed.returncode == 0 and "(4 of 5 batches generated now" in resumed.stderr, resumed.stderr
    assert "batch 0 (000000.png is missing)" in resumed.stderr
    refused = torchrun(2, tmp_path / "one", batch=1)  # rank 0 refuses another run's folder: every rank stops
    assert refused.returncode != 0
    assert refused.stderr.count("error: ") == 2 and "differs in ['batch_size']" in refused.stderr
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
