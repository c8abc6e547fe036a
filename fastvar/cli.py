"""The fastvar command: generate images, and bench FastVAR against the unpatched model, for every family
in ``fastvar.pipelines.PIPELINES``."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image

import fastvar
from fastvar.bench import benchmark, format_results
from fastvar.hub import WeightsUnavailableError
from fastvar.pipelines import PIPELINES
from fastvar.pipelines.base import DTYPES, Pipeline

USER_ERRORS = (ValueError, WeightsUnavailableError, ImportError)  # what a wrong option or a missing file raises


class UserError(Exception):
    """A mistake in the command line, reported as one ``error:`` line."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS))
        if shown and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def to_grid(images: Sequence[Image.Image]) -> Image.Image:
    """The images in one picture, ceil(sqrt(n)) per row."""
    w, h = images[0].size
    cols = math.ceil(math.sqrt(len(images)))
    grid = Image.new("RGB", (cols * w, math.ceil(len(images) / cols) * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


def check_output(path: str) -> Path:
    """An image file PIL can write, in a folder that exists."""
    out = Path(path)
    if out.suffix.lower() not in Image.registered_extensions() or out.suffix.lower() in (".pdf", ".eps"):
        raise UserError(f"--out {path}: the file name must end in an image format such as .png or .jpg")
    if not out.parent.is_dir():
        raise UserError(f"--out {path}: the folder {out.parent} does not exist")
    if out.is_dir() or not os.access(out.parent, os.W_OK):
        raise UserError(f"--out {path}: cannot write there")
    return out


def check_presets(names: Sequence[str], family: type[Pipeline]) -> None:
    unknown = sorted(set(names) - set(family.adapter.presets))
    if unknown:
        raise UserError(f"unknown {family.family} preset(s) {unknown}; available: {sorted(family.adapter.presets)}")


def chosen_preset(args: argparse.Namespace, family: type[Pipeline]) -> str | None:
    if args.no_fastvar:
        return None
    check_presets([args.preset or family.adapter.default_preset], family)
    return args.preset or family.adapter.default_preset


@contextlib.contextmanager
def cache_only() -> Iterator[None]:
    """No downloads: ``bench`` times whatever weights are at hand (timing does not depend on them)."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = before


def generate(args: argparse.Namespace) -> None:
    family = PIPELINES[args.family]
    out = check_output(args.out)
    preset = chosen_preset(args, family)
    inputs = family.call_arguments(args)
    pipe = family.from_arguments(args, random=args.random_weights)
    images = pipe(**inputs, seed=args.seed, preset=preset)
    if fastvar.is_patched(pipe.transformer):
        print(fastvar.summary(pipe.transformer), file=sys.stderr)
    if len(images) == 1:
        images[0].save(out)
    else:
        to_grid(images).save(out)
        for i, image in enumerate(images):
            image.save(out.with_name(f"{out.stem}-{i}{out.suffix}"))
    print(f"saved {out}" + (f" (a grid) and {len(images)} single images beside it" if len(images) > 1 else ""),
          file=sys.stderr)


def bench_pipeline(args: argparse.Namespace, family: type[Pipeline]) -> Pipeline:
    if args.random_weights:
        return family.from_arguments(args, random=True)
    try:
        with cache_only():
            return family.from_arguments(args, random=False)
    except WeightsUnavailableError as err:
        if args.weights:
            raise
        print(f"official weights not at hand ({err}); timing random weights", file=sys.stderr)
    return family.from_arguments(args, random=True)


def bench(args: argparse.Namespace) -> None:
    family = PIPELINES[args.family]
    inputs = family.call_arguments(args)
    items = inputs[family.batch_argument]
    items = [items] if isinstance(items, int | str) else items
    inputs[family.batch_argument] = [items[i % len(items)] for i in range(args.batch)]
    presets = args.presets or list(family.adapter.presets)
    check_presets(presets, family)
    pipe = bench_pipeline(args, family)
    device = pipe.device
    repeats = args.repeats or (5 if device.type == "cuda" else 2)
    results = benchmark(pipe, inputs, presets, repeats=repeats, warmup=args.warmup,
                        report=lambda line: print(line, file=sys.stderr))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    dtype = next(k for k, v in DTYPES.items() if v == pipe.dtype)
    title = (f"{pipe.describe()} batch {args.batch} {dtype} on {where}, torch {torch.__version__}; "
             f"{repeats} alternated runs after {args.warmup} warm-up (ms)")
    print(format_results(results, title))


def parser() -> Parser:
    kwargs = dict(formatter_class=HelpFormatter)
    root = Parser(prog="fastvar", description=__doc__, **kwargs)
    root.add_argument("--version", action="version", version=f"fastvar {fastvar.__version__}")
    commands = root.add_subparsers(dest="command", parser_class=Parser)
    gen = commands.add_parser("generate", help="generate images", **kwargs).add_subparsers(
        dest="family", required=True, parser_class=Parser)
    ben = commands.add_parser("bench", help="time FastVAR against the unpatched model", **kwargs).add_subparsers(
        dest="family", required=True, parser_class=Parser)
    for name, family in PIPELINES.items():
        doc = (family.__doc__ or "").split("\n")[0]
        for command, sub in (("generate", gen), ("bench", ben)):
            p = sub.add_parser(name, help=doc, description=doc, **kwargs)
            family.add_model_arguments(p)
            family.add_input_arguments(p)
            p.add_argument("--random-weights", action="store_true",
                           help="random weights at full width (a smoke test; timing does not depend on weights)")
            p.add_argument("--dtype", default="fp32", choices=[k for k, v in DTYPES.items() if v in family.dtypes],
                           help="precision, run as the official inference runs it")
            p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
            if command == "generate":
                p.add_argument("--seed", type=int, default=0, help="sampling seed")
                p.add_argument("--out", default=f"{name}.png", help="image file; several images: a grid, and "
                                                                  "OUT-0.png ... beside it")
                choice = p.add_mutually_exclusive_group()
                choice.add_argument("--preset", help=f"FastVAR preset (default: {family.adapter.default_preset})")
                choice.add_argument("--no-fastvar", action="store_true", help="run the unpatched model")
                p.set_defaults(func=generate)
            else:
                p.add_argument("--batch", type=positive_int, default=1, help="images per call")
                p.add_argument("--preset", dest="presets", action="append",
                               help="preset to time, repeatable (default: every preset of the family)")
                p.add_argument("--repeats", type=positive_int, help="timed runs per variant (default: 5 on CUDA, 2 "
                                                                    "on the CPU)")
                p.add_argument("--warmup", type=non_negative_int, default=1, help="untimed runs per variant first")
                p.set_defaults(func=bench)
    return root


def main(argv: Sequence[str] | None = None) -> None:
    cli = parser()
    args = cli.parse_args(argv)
    if args.command is None:
        cli.print_help()
        return
    try:
        args.func(args)
    except (UserError, *USER_ERRORS) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
