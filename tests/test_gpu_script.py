"""benchmarks/gpu.sh, in its smoke mode: every step of the GPU benchmark, on tiny models on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_script_smoke_run_writes_every_case_and_the_table(tmp_path):
    env = dict(os.environ, FASTVAR_BENCH_SMOKE="1")
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=1200)  # about a minute, several on a loaded machine
    assert done.returncode == 0, done.stderr[-3000:]
    cases = sorted(p.stem for p in tmp_path.glob("*.json"))
    assert cases == ["hart-0.7b-1024-b1", "infinity-2b-1024-b1", "infinity-2b-1024-b4", "infinity-2b-1344-b1",
                     "infinity-8b-1024-b8", "infinitystar-480p-5s-b1", "infinitystar-720p-5s-b1", "var-d16-256-b1",
                     "var-d16-256-b16"]  # the VAR depths share one stand-in
    budgets = json.loads((tmp_path / "infinity-8b-1024-b8.json").read_text())
    assert [v["name"] for v in budgets["variants"]] == ["baseline", "scalekv-10", "paper-scalekv-10", "paper"]
    assert budgets["batch"] == 8 and all(v["images_per_second"] > 0 for v in budgets["variants"])
    hart = json.loads((tmp_path / "hart-0.7b-1024-b1.json").read_text())
    assert [v["name"] for v in hart["variants"]] == ["baseline", "paper", "skip-last", "paper-unguided-last", "none"]
    assert all(k in hart for k in ("device", "torch", "dtype", "model"))
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0].startswith("| case | device | torch | variant | FLOP ratio")
    assert len(table) == 2 + sum(len(json.loads((tmp_path / f"{c}.json").read_text())["variants"]) for c in cases)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_script_without_a_folder_is_one_error_line():
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.startswith("error: usage: benchmarks/gpu.sh OUT_DIR")
    assert done.stderr.count("\n") == 1
