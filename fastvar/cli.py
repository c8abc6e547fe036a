"""The fastvar command: generate images, and bench FastVAR against the unpatched model."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

import fastvar
from fastvar.bench import benchmark, format_results
from fastvar.hub import WeightsUnavailableError
from fastvar.models.infinity import build as build_infinity
from fastvar.models.var import OFFICIAL_DEPTHS, PATCH_NUMS_256, PATCH_NUMS_512, VAR, build
from fastvar.pipeline import InfinityPipeline, schedule_for

SAMPLING = dict(cfg=4.0, top_k=900, top_p=0.95)  # the official VAR demo's settings


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def to_grid(images: torch.Tensor) -> Image.Image:
    """(N, 3, H, W) in [0, 1] as one PNG-ready image, ceil(sqrt(N)) per row."""
    n, _, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.zeros(3, rows * h, cols * w)
    for i, img in enumerate(images.float().cpu()):
        grid[:, (i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w] = img
    pixels = grid.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(pixels)


def generate_var(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    try:
        var = VAR.from_pretrained(args.depth, weights=args.weights, vae_weights=args.vae_weights, device=device)
    except WeightsUnavailableError as err:
        raise SystemExit(f"error: {err}") from err
    if not args.no_fastvar:
        try:
            fastvar.patch(var, args.preset)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from err
        print(fastvar.summary(var), file=sys.stderr)
    labels = torch.tensor(args.classes, device=device)
    images = var.autoregressive_infer_cfg(
        B=len(args.classes), label_B=labels, g_seed=args.seed, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
        more_smooth=args.more_smooth, progress=True,
    )
    to_grid(images).save(args.out)
    print(f"saved {args.out}", file=sys.stderr)


def var_for_bench(args: argparse.Namespace, device: torch.device) -> VAR:
    patch_nums = PATCH_NUMS_512 if args.resolution == 512 else PATCH_NUMS_256
    official = (args.depth == 36) == (args.resolution == 512) and args.depth in OFFICIAL_DEPTHS
    if args.weights or (official and not args.random_weights):
        try:
            return VAR.from_pretrained(args.depth, weights=args.weights, vae_weights=args.vae_weights, device=device)
        except WeightsUnavailableError as err:
            if args.weights:
                raise SystemExit(f"error: {err}") from err
            print(f"official weights unavailable ({err}); timing random weights", file=sys.stderr)
    torch.manual_seed(0)
    return build(args.depth, patch_nums)[1].to(device).eval().requires_grad_(False)


def bench_var(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    var = var_for_bench(args, device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    labels = (torch.arange(args.batch, device=device) * 97) % 1000

    def run() -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return var.autoregressive_infer_cfg(B=args.batch, label_B=labels, g_seed=0, **SAMPLING)

    presets = args.presets or list(fastvar.presets(var))
    results = benchmark(var, run, {name: name for name in presets}, var.vae_proxy[0].decoder, device,
                        len(var.patch_nums), repeats=args.repeats, warmup=args.warmup)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    title = (f"VAR d{args.depth} {16 * var.patch_nums[-1]}px batch {args.batch} {args.dtype} on {where}, "
             f"torch {torch.__version__}; median of {args.repeats} alternated runs (ms)")
    print(format_results(results, [(pn, pn) for pn in var.patch_nums], title))


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"size must look like 1024x1024 (width x height), got {text!r}") from err
    return width, height


def generate_infinity(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    try:
        pipe = InfinityPipeline.from_pretrained(args.weights or f"infinity-{args.model}", device=device)
        images = pipe(args.prompts, seed=args.seed, cfg=args.cfg, tau=args.tau, size=args.size,
                      preset=None if args.no_fastvar else args.preset)
    except (WeightsUnavailableError, ValueError, ImportError, OSError) as err:
        raise SystemExit(f"error: {err}") from err
    to_grid(torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in images])).save(
        args.out)
    print(f"saved {args.out}", file=sys.stderr)


def bench_infinity(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    try:
        schedule = schedule_for(*args.size)
        torch.manual_seed(0)
        model, vae = build_infinity(f"infinity-{args.model}", args.depth)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    for p in model.parameters():  # random weights; small, so that activations stay finite at any depth
        torch.nn.init.normal_(p, std=0.02)
    model, vae = model.to(device).eval().requires_grad_(False), vae.to(device).eval().requires_grad_(False)
    K, lens = len(schedule), [32] * args.batch  # a typical prompt length
    text = (torch.randn(sum(lens), model.Ct5, device=device), lens,
            torch.arange(0, 32 * (args.batch + 1), 32, dtype=torch.int32, device=device), 32)

    def run():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, _, summed = model.autoregressive_infer_cfg(vae, schedule, text, B=args.batch, g_seed=0,
                                                          cfg_list=[3.0] * K, tau_list=[0.5] * K, top_k=900,
                                                          top_p=0.97, vae_type=vae.codebook_dim)
            return vae.decode(summed)

    presets = args.presets or list(fastvar.presets(model))
    results = benchmark(model, run, {name: name for name in presets}, vae.decoder, device, K,
                        repeats=args.repeats, warmup=args.warmup)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    title = (f"Infinity-{args.model.upper()} width {model.C}, {len(model.unregistered_blocks)} blocks, "
             f"{args.size[0]}x{args.size[1]} batch {args.batch} {args.dtype} on {where}, torch {torch.__version__}; "
             f"median of {args.repeats} alternated runs (ms)")
    print(format_results(results, [(h, w) for _, h, w in schedule], title))


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="fastvar", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate images").add_subparsers(dest="family", required=True)
    var = gen.add_parser("var", help="class-conditional ImageNet VAR")
    var.add_argument("--depth", type=int, default=16, choices=OFFICIAL_DEPTHS)
    var.add_argument("--class", dest="classes", type=int, nargs="+", default=[207], help="ImageNet class ids")
    var.add_argument("--seed", type=int, default=0)
    var.add_argument("--out", default="var.png")
    var.add_argument("--weights", help="VAR checkpoint file or directory (default: the Hub)")
    var.add_argument("--vae-weights", help="VQVAE checkpoint file or directory (default: the Hub)")
    choice = var.add_mutually_exclusive_group()
    choice.add_argument("--preset", default="default", help="FastVAR preset (default: %(default)s)")
    choice.add_argument("--no-fastvar", action="store_true", help="run the unpatched model")
    var.add_argument("--cfg", type=float, default=SAMPLING["cfg"])
    var.add_argument("--top-k", type=int, default=SAMPLING["top_k"])
    var.add_argument("--top-p", type=float, default=SAMPLING["top_p"])
    var.add_argument("--more-smooth", action="store_true")
    var.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    var.set_defaults(func=generate_var)
    inf = gen.add_parser("infinity", help="text-to-image Infinity")
    inf.add_argument("--prompt", dest="prompts", action="append", required=True, help="repeatable")
    inf.add_argument("--model", default="2b", choices=["2b", "8b"])
    inf.add_argument("--weights", help="a directory written by InfinityPipeline.save_pretrained")
    inf.add_argument("--size", type=parse_size, default=(1024, 1024), help="WIDTHxHEIGHT (default 1024x1024)")
    inf.add_argument("--seed", type=int, default=0)
    inf.add_argument("--cfg", type=float, default=3.0)
    inf.add_argument("--tau", type=float, default=0.5)
    inf.add_argument("--out", default="infinity.png")
    choice = inf.add_mutually_exclusive_group()
    choice.add_argument("--preset", default="paper", help="FastVAR preset (default: %(default)s)")
    choice.add_argument("--no-fastvar", action="store_true", help="run the unpatched model")
    inf.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    inf.set_defaults(func=generate_infinity)

    bench = commands.add_parser("bench", help="time FastVAR against the unpatched model")
    bench_family = bench.add_subparsers(dest="family", required=True)
    var = bench_family.add_parser("var", help="class-conditional ImageNet VAR")
    var.add_argument("--depth", type=int, default=16)
    var.add_argument("--resolution", type=int, default=None, choices=[256, 512],
                     help="default: 512 for depth 36, else 256")
    var.add_argument("--batch", type=int, default=1)
    var.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    var.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="autocast precision")
    var.add_argument("--random-weights", action="store_true",
                     help="do not look for official weights (timing does not depend on weight values)")
    var.add_argument("--weights", help="VAR checkpoint file or directory")
    var.add_argument("--vae-weights", help="VQVAE checkpoint file or directory")
    var.add_argument("--preset", dest="presets", action="append", help="preset to time (repeatable; default: all)")
    var.add_argument("--repeats", type=int, default=5)
    var.add_argument("--warmup", type=int, default=1)
    var.set_defaults(func=bench_var)
    inf = bench_family.add_parser("infinity", help="text-to-image Infinity, random weights")
    inf.add_argument("--model", default="2b", choices=["2b", "8b"])
    inf.add_argument("--depth", type=int, help="keep the width, cut the blocks to this many")
    inf.add_argument("--size", type=parse_size, default=(1024, 1024), help="WIDTHxHEIGHT (default 1024x1024)")
    inf.add_argument("--batch", type=int, default=1)
    inf.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    inf.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="autocast precision")
    inf.add_argument("--preset", dest="presets", action="append", help="preset to time (repeatable; default: all)")
    inf.add_argument("--repeats", type=int, default=3)
    inf.add_argument("--warmup", type=int, default=1)
    inf.set_defaults(func=bench_infinity)
    return root


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if getattr(args, "resolution", 0) is None:
        args.resolution = 512 if args.depth == 36 else 256
    args.func(args)
