"""Generate ImageNet classes with the official VAR weights, with and without FastVAR, and time both.

    python examples/var_generate.py --model var-d16 --classes 207 360 --out var.png
"""

import argparse
import time

import torch

import fastvar
from fastvar import VARPipeline
from fastvar.cli import to_grid

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="var-d16", help="var-d16 ... var-d36, or a folder of official checkpoints")
parser.add_argument("--classes", type=int, nargs="+", default=[207, 360, 388, 980])
parser.add_argument("--out", default="var.png")
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
pipe = VARPipeline.from_pretrained(args.model, device=device)  # from the cache, else FoundationVision/var
images = []
for preset in (None, "default"):
    start = time.perf_counter()
    images += pipe(args.classes, seed=0, preset=preset, progress=False)
    print(f"{preset or 'unpatched'}: {time.perf_counter() - start:.2f} s")
print(fastvar.summary(pipe.transformer))
to_grid(images).save(args.out)
print(f"saved {args.out}: the unpatched images first, then the FastVAR ones")
