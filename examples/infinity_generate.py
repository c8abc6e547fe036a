"""Text-to-image with the official Infinity-2B weights, unpatched and with each FastVAR preset, timed.

    python examples/infinity_generate.py --prompt "a red fox in the snow" --size 1024x1024
"""

import argparse
import time

import torch

import fastvar
from fastvar import InfinityPipeline

parser = argparse.ArgumentParser()
parser.add_argument("--prompt", default="a red fox in the snow, golden hour")
parser.add_argument("--size", default="1024x1024")
args = parser.parse_args()

cuda = torch.cuda.is_available()
pipe = InfinityPipeline.from_pretrained("infinity-2b", dtype="bf16" if cuda else "fp32",  # the cache, else the Hub
                                        device="cuda" if cuda else "cpu")
for preset in (None, "prune-only", "skip-only", "paper"):
    start = time.perf_counter()
    image = pipe(args.prompt, seed=0, size=args.size, preset=preset, progress=False)[0]
    seconds = time.perf_counter() - start
    name = preset or "unpatched"
    ratio = fastvar.summary(pipe.transformer).flop_ratio if preset else 1.0
    print(f"{name:<11} {seconds:6.2f} s   ideal FLOP ratio {ratio:.3f}")
    image.save(f"infinity_{name}.png")
