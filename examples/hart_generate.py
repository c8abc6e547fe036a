"""Text-to-image with the official HART-0.7B weights, unpatched and with each FastVAR preset, timed.

    python examples/hart_generate.py --prompt "an astronaut riding a horse on the moon"
"""

import argparse
import time

import torch

import fastvar
from fastvar import HARTPipeline

parser = argparse.ArgumentParser()
parser.add_argument("--prompt", default="a red fox in the snow, golden hour")
parser.add_argument("--model", default="hart-0.7b", help="hart-0.7b, or a folder holding llm/ and tokenizer/")
parser.add_argument("--text-encoder", default="mit-han-lab/Qwen2-VL-1.5B-Instruct")
args = parser.parse_args()

cuda = torch.cuda.is_available()
pipe = HARTPipeline.from_pretrained(args.model, text_encoder=args.text_encoder, dtype="fp16" if cuda else "fp32",
                                    device="cuda" if cuda else "cpu")
for preset in (None, "paper", "skip-last"):
    start = time.perf_counter()
    image = pipe(args.prompt, seed=1, preset=preset, progress=False)[0]
    seconds = time.perf_counter() - start
    name = preset or "unpatched"
    ratio = fastvar.summary(pipe.transformer).flop_ratio if preset else 1.0
    print(f"{name:<10} {seconds:6.2f} s   ideal FLOP ratio {ratio:.3f}")
    image.save(f"hart_{name}.png")
