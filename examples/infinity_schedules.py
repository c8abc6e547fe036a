"""What a FastVAR preset does at every aspect ratio and size of Infinity (no download, no generation):
the config is keyed by scale position, so it resolves against each schedule.

    python examples/infinity_schedules.py --preset paper
"""

import argparse

import torch

import fastvar
from fastvar.adapters.infinity import InfinityAdapter
from fastvar.models.infinity import TEMPLATE_SCALES, build, scale_schedule
from fastvar.summary import Summary

parser = argparse.ArgumentParser()
parser.add_argument("--preset", default="paper", choices=sorted(InfinityAdapter.presets))
args = parser.parse_args()

with torch.device("meta"):  # the architecture only: no memory, no weights
    model, _ = build("infinity-2b")
config = fastvar.presets(model)[args.preset]
cost = InfinityAdapter.cost_model(model)
print(f"{'h/w':>6} {'size':>8} {'image':>10} {'scales':>6} {'FLOP ratio':>10}")
for ratio in sorted(TEMPLATE_SCALES):
    for size in ("0.25M", "1M", "extended"):
        try:
            schedule = scale_schedule(ratio, size)
            resolved = config.resolve([(h, w) for _, h, w in schedule], depth=32)
        except ValueError:
            continue  # no extended scale for this aspect ratio
        _, h, w = schedule[-1]
        summary = Summary.of("infinity", args.preset, resolved, cost)
        print(f"{ratio:>6} {size:>8} {16 * w:>4}x{16 * h:<5} {len(schedule):>6} {summary.flop_ratio:>10.3f}")
