"""Peak memory of one generation on the CPU, unpatched and under presets: ``python benchmarks/memory.py``.

Allocations are read from the torch profiler (``profile_memory``): the running total of every
allocation and free, in time order, gives the peak above what was allocated before the call (the
weights). The scales (transformer, sampling, KV cache, cached branch outputs) are measured with the
image decoder replaced by a stub returning zeros, since the decoder, which fastvar does not change,
is the slowest part on a CPU; ``--decoder`` measures the decoder's own peak once per model.
Random weights at full width (memory does not depend on weight values).
"""

from __future__ import annotations

import argparse
import json
from importlib import resources

import torch
from torch.profiler import ProfilerActivity, profile

from fastvar import FastVARConfig, InfinityPipeline, VARPipeline
from fastvar.adapters.infinity import InfinityAdapter
from fastvar.kv_budget import PACKAGED, KVBudget


def first_blocks_budget(depth: int, of: int) -> FastVARConfig:
    """The official 10% budget of the model of ``of`` blocks, its first ``depth`` blocks: the budget of a model
    cut to ``depth`` blocks for measuring (its drafters are among the first)."""
    path = resources.files("fastvar") / "budgets" / PACKAGED["scalekv-10"][of]
    return FastVARConfig(kv_budget=KVBudget.from_file(path, blocks=depth))


def budget_variants(depth: int, of: int) -> dict[str, FastVARConfig | str]:
    budget = first_blocks_budget(depth, of)
    return {"scalekv-10": budget, "paper": "paper",
            "paper + scalekv-10": InfinityAdapter.presets["paper"].replace(kv_budget=budget.kv_budget)}


PROMPT = "a red fox in the snow"
CASES = {  # name: (pipeline factory, call arguments, variants: preset names or configs by name)
    "var-d16-256": (lambda: VARPipeline.random(16), dict(class_ids=[207]), {"default": "default"}),
    "infinity-2b-4blocks-1024": (lambda: InfinityPipeline.random("infinity-2b", depth=4),
                                 dict(prompt=[PROMPT], size=(1024, 1024)), {"paper": "paper",
                                                                           "prune-only": "prune-only"}),
    "infinity-2b-4blocks-1344": (lambda: InfinityPipeline.random("infinity-2b", depth=4),
                                 dict(prompt=[PROMPT], aspect_ratio=1.0, pixels="extended"),
                                 {"paper": "paper", "prune-only": "prune-only"}),
    "infinity-2b-4blocks-1024-budgets": (lambda: InfinityPipeline.random("infinity-2b", depth=4),
                                         dict(prompt=[PROMPT], size=(1024, 1024)), budget_variants(4, 32)),
    "infinity-8b-4blocks-1024-budgets": (lambda: InfinityPipeline.random("infinity-8b", depth=4),
                                         dict(prompt=[PROMPT], size=(1024, 1024)), budget_variants(4, 40)),
}


def peak_bytes(fn) -> int:
    """The highest total of bytes allocated by ``fn`` at any moment, above what was allocated before."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    total = peak = 0
    for event in events:
        total += event.nbytes()
        peak = max(peak, total)
    return peak


def stub_decoder(decoder: torch.nn.Module) -> None:
    decoder.forward = lambda z: z.new_zeros(z.shape[0], 3, 16 * z.shape[-2], 16 * z.shape[-1])


def measure(name: str, decoder: bool, batch: int) -> dict[str, int]:
    """Peak bytes of each variant of case ``name`` for ``batch`` images (and of the decoder alone, with
    ``decoder``)."""
    factory, call, variants = CASES[name]
    call = {k: v * batch if k in ("prompt", "class_ids") else v for k, v in call.items()}
    pipe = factory()
    row = {}
    if decoder:
        captured = {}
        pipe.vae.decoder.register_forward_pre_hook(lambda m, a: captured.setdefault("z", a[0].clone()))
        pipe(**call, seed=0, preset=None, progress=False)
        with torch.no_grad():
            row["decoder alone"] = peak_bytes(lambda: pipe.vae.decoder(captured["z"]))
    stub_decoder(pipe.vae.decoder)
    for label, preset in {"unpatched": None, **variants}.items():
        row[label] = peak_bytes(lambda preset=preset: pipe(**call, seed=0, preset=preset, progress=False))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=list(CASES), help="repeatable (default: all)")
    parser.add_argument("--decoder", action="store_true", help="also measure the image decoder alone")
    parser.add_argument("--batch", type=int, default=1, help="images per call (default: 1)")
    parser.add_argument("--json", help="write the results there too")
    args = parser.parse_args()
    results = {}
    for name in args.case or CASES:
        results[name] = row = measure(name, args.decoder, args.batch)
        print(name, " ".join(f"{k}: {v / 2**20:.1f} MiB" for k, v in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
