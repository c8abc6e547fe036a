"""The benchmark harness: alternated variants, per-scale times, skipped scales, min and median, FLOP ratios."""

from __future__ import annotations

from conftest import tiny_var

import fastvar
from fastvar import FastVARConfig, VARPipeline
from fastvar.bench import benchmark, format_results

PATCH_NUMS = (1, 2, 3, 4, 6)


def test_benchmark_times_each_variant_and_leaves_the_model_unpatched():
    pipe = VARPipeline(tiny_var(patch_nums=PATCH_NUMS))
    patched_at_each_scale = []
    pipe.transformer.blocks[0].register_forward_pre_hook(
        lambda *_: patched_at_each_scale.append(fastvar.is_patched(pipe.transformer)))
    lines = []
    variants = ["default", FastVARConfig(skip_last=1)]
    results = benchmark(pipe, dict(class_ids=[0]), variants, repeats=2, warmup=1, report=lines.append)
    assert [r.name for r in results] == ["baseline", "default", "config1"]
    assert not fastvar.is_patched(pipe.transformer)
    for r in results:
        assert len(r.per_scale) == len(PATCH_NUMS) and len(r.totals) == 2 and r.decode > 0 and r.peak_memory is None
        assert r.total_min <= r.total_median and sum(r.per_scale) + r.decode <= r.total_median  # means, for 2 repeats
        assert r.scales == tuple(f"{p}x{p}" for p in PATCH_NUMS)
    assert results[2].per_scale[-1] == 0.0 and all(results[2].per_scale[:-1])
    assert results[0].flop_ratio == 1.0 and 0 < results[1].flop_ratio < 1 and 0 < results[2].flop_ratio < 1
    # warm-up and 2 repeats, each running baseline, default, skip in turn
    assert patched_at_each_scale == ([False] * 5 + [True] * 5 + [True] * 4) * 3
    assert [line.split(":")[0] for line in lines] == ["warm-up"] * 3 + ["repeat 1/2"] * 3 + ["repeat 2/2"] * 3
    table = format_results(results, "title").splitlines()
    assert table[0] == "title" and next(line for line in table if line.split()[0] == "4").split()[-1] == "skipped"
    speedups = next(line for line in table if line.strip().startswith("speedup (min)")).split()[2:]
    assert speedups[0] == "1.00x" and float(speedups[2][:-1]) == round(results[0].total_min / results[2].total_min, 2)


def test_bench_writes_json(tmp_path, tiny_official, capsys):
    import json

    from fastvar import cli

    out = tmp_path / "var.json"
    cli.main(["bench", "var", "--random-weights", "--repeats", "1", "--warmup", "0", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["family"] == "var" and data["torch"] and data["device"].startswith("cpu")
    assert [v["name"] for v in data["variants"]] == ["baseline", "default", "default-unguided-last", "none"]
    base, default = data["variants"][:2]
    assert base["speedup_min"] == 1.0 and default["speedup_min"] == base["total_min_s"] / default["total_min_s"]
    assert default["flop_ratio"] < 1 and default["peak_memory_bytes"] is None


def test_a_variant_out_of_memory_is_reported_and_the_others_timed(monkeypatch):
    """A KV budget may fit a batch the unpatched model cannot: the baseline's OOM does not end the benchmark."""
    import json
    import math

    import torch

    from fastvar.bench import results_json

    pipe = VARPipeline(tiny_var(patch_nums=PATCH_NUMS))
    call = VARPipeline.__call__
    runs = []

    def unpatched_runs_out_of_memory(self, *args, preset=None, **kwargs):
        runs.append(preset)
        if preset is None:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return call(self, *args, preset=preset, **kwargs)

    monkeypatch.setattr(VARPipeline, "__call__", unpatched_runs_out_of_memory)
    lines = []
    results = benchmark(pipe, dict(class_ids=[0, 1]), ["default"], repeats=2, warmup=1, report=lines.append)
    assert runs == [None, "default", "default", "default"] and lines[0] == "baseline: out of memory; not run again"
    base, default = results
    assert base.out_of_memory and math.isnan(base.total_min) and not default.out_of_memory
    assert default.images == 2 and len(default.totals) == 2
    table = format_results(results, "t")
    speedup = next(line for line in table.splitlines() if line.strip().startswith("speedup (min)")).split()
    images = next(line for line in table.splitlines() if line.strip().startswith("images/s")).split()
    assert speedup[2:] == ["OOM", "OOM"] and images[2] == "OOM" and float(images[3]) == round(2 / default.total_min, 3)
    data = json.loads(json.dumps(results_json(results)))  # JSON without NaN
    assert data["variants"][0]["out_of_memory"] and data["variants"][0]["speedup_min"] is None
    assert data["variants"][1]["images_per_second"] == 2 / default.total_min
