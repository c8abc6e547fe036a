"""The README runs as written: its Python blocks (those that download, and those too big for a CPU, on tiny
stand-ins served as the Hugging Face cache), its command lines (parsed by the CLI), and the examples it
lists."""

from __future__ import annotations

import dataclasses
import re
import runpy
import shlex
import shutil
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import (
    TINY_INFINITYSTAR,
    tiny_infinitystar_build,
    tiny_var_pair,
    write_hub_cache,
    write_official_files,
    write_official_infinitystar,
)

import fastvar.pipelines.infinitystar
from fastvar import cli
from fastvar.kv_budget import KVBudget
from fastvar.models.infinitystar import OFFICIAL

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"(?:<!-- ([^>]*) -->\n)?```(python|bash)\n(.*?)```", re.S)
BLOCKS = [(marker or "", lang, code) for marker, lang, code in BLOCK.findall(README)]
PYTHON = [code for marker, lang, code in BLOCKS if lang == "python" and not marker]
STAND_INS = ("downloads", "stand-ins")  # blocks run on tiny stand-ins: those that download, those too big for a CPU
DOWNLOADS = [code for marker, lang, code in BLOCKS if lang == "python" and marker.startswith(STAND_INS)]
COMMANDS = [shlex.split(line.split("  #")[0]) for marker, lang, code in BLOCKS if lang == "bash"
            for line in code.splitlines() if line.startswith("fastvar ")]
COMMANDS += [["fastvar", *shlex.split(line.split("-m fastvar ")[1])] for marker, lang, code in BLOCKS
             if lang == "bash" for line in code.splitlines() if line.startswith("torchrun ")]


def test_every_python_block_is_run_or_says_why_not():
    skipped = [m for m, lang, _ in BLOCKS if lang == "python" and m and not m.startswith(STAND_INS)]
    assert all(marker.startswith("not run: ") for marker in skipped), skipped
    assert len(PYTHON) >= 4 and len(DOWNLOADS) >= 2 and len(COMMANDS) >= 10


@pytest.mark.parametrize("code", PYTHON, ids=[f"block{i}" for i in range(len(PYTHON))])
def test_python_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what a block writes lands in a fresh folder
    exec(compile(code, str(ROOT / "README.md"), "exec"), {"__name__": "readme"})


@pytest.fixture(scope="session")
def stand_in_files(tmp_path_factory) -> Path:
    """Tiny checkpoints under every official name: as the README's local folders, and in a Hugging Face
    cache holding the official Hub repos."""
    files, root = tmp_path_factory.mktemp("official"), tmp_path_factory.mktemp("world")
    write_official_files(files)
    ckpts = root / "ckpts"
    ckpts.mkdir()
    for name in ("var_d16.pth", "vae_ch160v4096z32.pth"):
        shutil.copyfile(files / name, ckpts / name)
    (root / "weights").mkdir()
    for name in ("infinity_2b_reg.pth", "infinity_vae_d32reg.safetensors"):
        shutil.copyfile(files / name, root / "weights" / name)
    shutil.copytree(files / "flan-t5-xl", root / "weights" / "flan-t5-xl")
    shutil.copytree(files / "hart", root / "hart-0.7b-1024px")
    shutil.copytree(files / "qwen", root / "Qwen2-VL-1.5B-Instruct")
    write_official_infinitystar(root / "InfinityStar")
    hub = {"FoundationVision/var": ckpts, "FoundationVision/Infinity": root / "weights",
           "google/flan-t5-xl": files / "flan-t5-xl", "mit-han-lab/hart-0.7b-1024px": files / "hart",
           "mit-han-lab/Qwen2-VL-1.5B-Instruct": files / "qwen", "FoundationVision/InfinityStar": root / "InfinityStar"}
    for repo, folder in hub.items():
        write_hub_cache(root / "cache", repo, {str(f.relative_to(folder)): f for f in folder.rglob("*") if f.is_file()})
    return root


@pytest.fixture
def stand_in_world(stand_in_files, tmp_path, monkeypatch, tiny_official, hub_offline):
    """The stand-in files as the working directory and the cache, the official architectures tiny (InfinityStar
    sampled at its tiny budget with the official durations), no connection."""
    shutil.copytree(stand_in_files, tmp_path / "world")
    monkeypatch.chdir(tmp_path / "world")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "world" / "cache"))
    monkeypatch.setattr(fastvar.pipelines.infinitystar, "build", tiny_infinitystar_build)
    monkeypatch.setattr(fastvar.pipelines.infinitystar, "OFFICIAL", {
        name: dataclasses.replace(TINY_INFINITYSTAR[name], durations=official.durations)
        for name, official in OFFICIAL.items()})


@pytest.mark.parametrize("code", DOWNLOADS, ids=[f"downloads{i}" for i in range(len(DOWNLOADS))])
def test_download_block_runs_on_stand_ins(code, stand_in_world):
    exec(compile(code, str(ROOT / "README.md"), "exec"), {"__name__": "readme"})


class Loading(Exception):
    """Raised where a command starts loading its model: every check before it passed."""


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a[1:4]) for a in COMMANDS])
def test_command_lines_pass_every_check_before_loading(argv, tmp_path, monkeypatch, capsys):
    if argv[1:] in (["--version"], []):
        return
    monkeypatch.chdir(tmp_path)  # the input files the commands name, as a user has them
    (tmp_path / "evaluation_metadata.jsonl").write_text('{"prompt": "a photo of a bench", "tag": "single_object"}\n')
    for name in ("mjhq.txt", "prompts.txt"):
        (tmp_path / name).write_text("a red fox in the snow\n")
    (tmp_path / "vbench.jsonl").write_text('{"prompt": "a red fox running in the snow", "prompt_en": "a fox"}\n')
    KVBudget.packaged("scalekv-10", 32).to_file(tmp_path / "budget.json")
    if "cuda" in argv:  # the GPU lines, on any machine
        monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: True)

    def loading(*args, **kwargs):
        raise Loading

    monkeypatch.setattr(cli, "load_pipeline", loading)
    with pytest.raises(Loading):
        cli.main(argv[1:])
    assert "error:" not in capsys.readouterr().err


@pytest.mark.parametrize("script, argv", [
    ("var_generate.py", ["--classes", "1", "2"]),
    ("infinity_generate.py", ["--size", "256x256"]),
    ("hart_generate.py", ["--model", "hart-0.7b-1024px", "--text-encoder", "Qwen2-VL-1.5B-Instruct"]),
    ("var_schedules.py", ["--depth", "2"]),
    ("infinity_schedules.py", ["--preset", "paper"]),
])
def test_examples_run(script, argv, stand_in_world, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, *argv])
    runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    assert capsys.readouterr().out


UPSTREAM_STAND_IN = """
from conftest import tiny_var_pair


def build_vae_var(**official):
    return tiny_var_pair()
"""


def test_var_upstream_example_runs_on_a_stand_in_clone(tmp_path, monkeypatch, capsys):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text(UPSTREAM_STAND_IN)
    vae, var = tiny_var_pair()
    torch.save(var.state_dict(), tmp_path / "var.pth")
    torch.save(vae.state_dict(), tmp_path / "vae.pth")
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the clone first
    monkeypatch.delitem(sys.modules, "models", raising=False)
    monkeypatch.setattr(sys, "argv", ["var_upstream.py", *(str(tmp_path / f) for f in ("", "var.pth", "vae.pth"))])
    try:
        runpy.run_path(str(ROOT / "examples" / "var_upstream.py"), run_name="__main__")
    finally:
        sys.modules.pop("models", None)
    assert "torch.Size([2, 3, 96, 96])" in capsys.readouterr().out


@pytest.mark.parametrize("argv, problem", [
    ([], "give 3 arguments, not 0"),
    (["{tmp}", "{tmp}/var.pth"], "give 3 arguments, not 2"),
    (["{tmp}/nowhere", "{tmp}/var.pth", "{tmp}/var.pth"], "{tmp}/nowhere is not a clone of FoundationVision/VAR"),
    (["{tmp}", "{tmp}/var.pth", "{tmp}/vae.pth"], "{tmp}/vae.pth is not a file"),
])
def test_var_upstream_example_without_its_arguments_prints_its_usage(argv, problem, tmp_path, monkeypatch, capsys):
    (tmp_path / "models").mkdir()
    (tmp_path / "var.pth").write_bytes(b"")
    monkeypatch.setattr(sys, "argv", ["var_upstream.py", *(a.format(tmp=tmp_path) for a in argv)])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(ROOT / "examples" / "var_upstream.py"), run_name="__main__")
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and not out
    assert err.startswith("usage: python examples/var_upstream.py VAR_REPO VAR_CKPT VAE_CKPT (")
    assert problem.format(tmp=tmp_path) in err and err.count("\n") == 1


def test_every_example_is_listed_and_compiles():
    listed = set(re.findall(r"`examples/(\w+\.py)`", README))
    present = {p.name for p in (ROOT / "examples").glob("*.py")}
    assert listed == present
    for name in present:
        compile((ROOT / "examples" / name).read_text(), name, "exec")

