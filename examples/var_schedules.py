"""Compare FastVAR schedules on a VAR architecture with random weights (no download needed):
ideal FLOP ratio and measured time of each, side by side.

    python examples/var_schedules.py --depth 16
"""

import argparse
import time

import torch

import fastvar
from fastvar import FastVARConfig
from fastvar.models.var import build

parser = argparse.ArgumentParser()
parser.add_argument("--depth", type=int, default=16)
args = parser.parse_args()

torch.manual_seed(0)
_, var = build(args.depth)
var.eval()
schedules = {
    "default preset": "default",
    "prune the last three scales": FastVARConfig(prune={-3: 0.3, -2: 0.5, -1: 0.6}),
    "prune in the middle blocks only": FastVARConfig(prune={-2: 0.4, -1: 0.5},  # none of 4 blocks or fewer
                                                     layers=lambda i, depth: 2 <= i < depth - 2),
    "skip the last scale": FastVARConfig(skip_last=1),
}


def timed() -> float:
    start = time.perf_counter()
    var.autoregressive_infer_cfg(B=1, label_B=torch.tensor([207]), g_seed=0, cfg=4.0, top_k=900, top_p=0.95)
    return time.perf_counter() - start


baseline = timed()
print(f"{'schedule':<34} {'FLOP ratio':>10} {'time ratio':>10}")
for name, config in schedules.items():
    fastvar.patch(var, config)
    print(f"{name:<34} {fastvar.summary(var).flop_ratio:>10.3f} {timed() / baseline:>10.3f}")
fastvar.unpatch(var)
