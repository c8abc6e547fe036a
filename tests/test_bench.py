"""The benchmark harness: alternated variants, per-scale times, skipped scales, ideal FLOP ratios."""

from __future__ import annotations

import torch
from conftest import tiny_var

import fastvar
from fastvar import FastVARConfig
from fastvar.bench import benchmark, format_results

PATCH_NUMS = (1, 2, 3, 4, 6)


def test_benchmark_times_each_variant_and_leaves_the_model_unpatched():
    var = tiny_var(patch_nums=PATCH_NUMS)
    patched_at_each_scale = []
    var.blocks[0].register_forward_pre_hook(lambda *_: patched_at_each_scale.append(fastvar.is_patched(var)))

    def run():
        return var.autoregressive_infer_cfg(B=1, label_B=torch.tensor([0]), g_seed=0)

    variants = {"prune": FastVARConfig(prune={-1: 0.5}), "skip": FastVARConfig(skip_last=1)}
    results = benchmark(var, run, variants, var.vae_proxy[0].decoder, torch.device("cpu"), len(PATCH_NUMS),
                        repeats=2, warmup=1)
    assert [r.name for r in results] == ["baseline", "prune", "skip"]
    assert not fastvar.is_patched(var)
    for r in results:
        assert len(r.per_scale) == len(PATCH_NUMS) and r.total > 0 and r.decode > 0 and r.peak_memory is None
        assert sum(r.per_scale) + r.decode <= r.total
    assert results[2].per_scale[-1] == 0.0 and all(results[2].per_scale[:-1])
    assert results[0].flop_ratio == 1.0 and 0 < results[1].flop_ratio < 1 and 0 < results[2].flop_ratio < 1
    # warm-up and 2 repeats, each running baseline, prune, skip in turn
    assert patched_at_each_scale == ([False] * 5 + [True] * 5 + [True] * 4) * 3
    lines = format_results(results, [(p, p) for p in PATCH_NUMS], "title").splitlines()
    assert lines[0] == "title" and next(line for line in lines if line.split()[0] == "4").split()[-1] == "skipped"
