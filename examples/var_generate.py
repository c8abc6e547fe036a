"""Generate ImageNet classes with an official VAR checkpoint, with and without FastVAR, and time both.

    python examples/var_generate.py --depth 16 --classes 207 360 --out var.png
"""

import argparse
import time

import torch

import fastvar
from fastvar.cli import to_grid
from fastvar.models.var import VAR

parser = argparse.ArgumentParser()
parser.add_argument("--depth", type=int, default=16)
parser.add_argument("--classes", type=int, nargs="+", default=[207, 360, 388, 980])
parser.add_argument("--out", default="var.png")
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
var = VAR.from_pretrained(depth=args.depth, device=device)  # downloads from FoundationVision/var
labels = torch.tensor(args.classes, device=device)
images = {}
for name in ("unpatched", "fastvar"):
    if name == "fastvar":
        fastvar.patch(var)
        print(fastvar.summary(var))
    start = time.perf_counter()
    images[name] = var.autoregressive_infer_cfg(B=len(labels), label_B=labels, g_seed=0, cfg=4.0, top_k=900, top_p=0.95)
    print(f"{name}: {time.perf_counter() - start:.2f} s")
to_grid(torch.cat([images["unpatched"], images["fastvar"]])).save(args.out)
print(f"saved {args.out}: the unpatched images first, then the FastVAR ones")
