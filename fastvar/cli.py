"""The fastvar command: generate images, bench FastVAR against the unpatched model, sample evaluation sets
and compare presets' outputs, for every family in ``fastvar.pipelines.PIPELINES``."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import torch
from PIL import Image

import fastvar
from fastvar import sampler
from fastvar.bench import benchmark, format_results, results_json
from fastvar.config import FastVARConfig
from fastvar.dtypes import DTYPES, dtype_name
from fastvar.hub import WeightsUnavailableError
from fastvar.pipelines import PIPELINES
from fastvar.pipelines.base import Pipeline, Preset, resolve_device

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
    inputs, options = family.inputs(args), family.call_arguments(args)
    pipe = load_pipeline(family, args, random=args.random_weights)
    images = pipe(**{family.batch_argument: inputs}, **options, seed=args.seed, preset=preset)
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


def load_pipeline(family: type[Pipeline], args: argparse.Namespace, random: bool) -> Pipeline:
    """The pipeline the model options name; with ``--offload``, loaded into host memory and offloaded."""
    if not args.offload:
        return family.from_arguments(args, random=random)
    resolve_device(args.device)  # a device that is not there is refused before loading
    target, args.device = args.device, "cpu"
    try:
        return family.from_arguments(args, random=random).enable_model_cpu_offload(target)
    finally:
        args.device = target


def bench_pipeline(args: argparse.Namespace, family: type[Pipeline]) -> Pipeline:
    if args.random_weights:
        return load_pipeline(family, args, random=True)
    try:
        with cache_only():
            return load_pipeline(family, args, random=False)
    except WeightsUnavailableError as err:
        if args.weights:
            raise
        print(f"official weights not at hand ({err}); timing random weights", file=sys.stderr)
    return load_pipeline(family, args, random=True)


def bench(args: argparse.Namespace) -> None:
    family = PIPELINES[args.family]
    items = family.inputs(args)
    inputs = {**family.call_arguments(args), family.batch_argument: [items[i % len(items)] for i in range(args.batch)]}
    presets = args.presets or list(family.adapter.presets)
    check_presets(presets, family)
    if args.json and not Path(args.json).parent.is_dir():
        raise UserError(f"--json {args.json}: the folder {Path(args.json).parent} does not exist")
    pipe = bench_pipeline(args, family)
    device = pipe.device
    repeats = args.repeats or (5 if device.type == "cuda" else 2)
    results = benchmark(pipe, inputs, presets, repeats=repeats, warmup=args.warmup,
                        report=lambda line: print(line, file=sys.stderr))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    dtype = dtype_name(pipe.dtype)
    title = (f"{pipe.describe()} batch {args.batch} {dtype} on {where}, torch {torch.__version__}; "
             f"{repeats} alternated runs after {args.warmup} warm-up (ms)")
    print(format_results(results, title))
    if args.json:
        data = results_json(results, model=pipe.describe(), family=args.family, batch=args.batch, dtype=dtype,
                            device=where, torch=torch.__version__, repeats=repeats, warmup=args.warmup)
        Path(args.json).write_text(json.dumps(data, indent=1))


def read_items(args: argparse.Namespace, family: type[Pipeline]) -> list[sampler.Item]:
    """The items of ``--classes`` or ``--prompts`` (with ``--per-class`` / ``--per-prompt`` where given)."""
    if family.batch_argument == "class_ids":
        return sampler.class_items(args.classes, getattr(args, "per_class", 1))
    return sampler.read_prompts(args.prompts, getattr(args, "per_prompt", 1))


def sample_command(args: argparse.Namespace) -> None:
    family = PIPELINES[args.family]
    preset = chosen_preset(args, family)
    items = read_items(args, family)
    out = sampler.check_out_dir(args.out)
    options = family.call_arguments(args)
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1),
                                                                      ("LOCAL_RANK", 0)))
    if world > 1:  # launched by torchrun: a barrier is the only collective, so gloo serves CPU and GPU alike
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(hours=2))
        if args.device in ("auto", "cuda") and torch.cuda.is_available():
            args.device = f"cuda:{local_rank}"
    try:
        pipe = load_pipeline(family, args, random=args.random_weights)
        summary = sampler.sample(pipe, items, out, layout=args.layout, batch_size=args.batch, seed=args.seed,
                                 preset=preset, progress=not args.no_progress, **options)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    if summary is not None:
        print(f"{summary['images']} images in {out} ({summary['batches_this_run']} of {summary['batches']} batches "
              f"generated now, {summary['images_per_second_per_process']:.2f} images/s per process); "
              f"summary.json beside them", file=sys.stderr)


def variant_from_json(text: str, family: type[Pipeline]) -> tuple[str, FastVARConfig]:
    """``{"name": ..., "preset": base preset (optional), field: value ...}`` -> (name, config)."""
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"--config {text!r} is not JSON ({err.msg})") from None
    if not isinstance(fields, dict) or not isinstance(fields.get("name"), str):
        raise UserError(f"--config {text!r}: give a JSON object with a 'name' and FastVARConfig fields, e.g. "
                        '\'{"name": "random", "preset": "default", "selection": "random"}\'')
    name, base = fields.pop("name"), fields.pop("preset", None)
    if base is not None:
        check_presets([base], family)
    if isinstance(fields.get("prune"), dict):  # JSON keys are strings; scale positions are ints
        try:
            fields["prune"] = {int(k): v for k, v in fields["prune"].items()}
        except ValueError:
            raise UserError(f"--config {name}: prune keys must be scale positions (ints)") from None
    config = family.adapter.presets[base] if base is not None else FastVARConfig()
    try:
        return name, config.replace(**fields)
    except TypeError as err:
        raise UserError(f"--config {name}: {err}") from None


def compare_command(args: argparse.Namespace) -> None:
    family = PIPELINES[args.family]
    names = [n for n in args.presets.split(",") if n] if args.presets else []
    check_presets(names, family)
    variants: dict[str, Preset] = {n: n for n in names}
    variants.update(variant_from_json(text, family) for text in args.configs or [])
    if not variants:
        raise UserError("give --presets NAME[,NAME...] or --config JSON")
    inputs = [i.input for i in read_items(args, family)]
    out = sampler.check_out_dir(args.out)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [0]
    pipe = load_pipeline(family, args, random=args.random_weights)
    comparison = fastvar.compare(pipe, inputs, variants, seeds=seeds, batch_size=args.batch, repeats=args.repeats,
                                 **family.call_arguments(args))
    comparison.save(out)
    print(comparison.table())
    print(f"saved compare.txt, compare.json and grid.png (rows: images, columns: unpatched, "
          f"{', '.join(variants)}) in {out}", file=sys.stderr)


def seed_list(text: str) -> str:
    if not all(part.strip().lstrip("-").isdigit() for part in text.split(",")):
        raise argparse.ArgumentTypeError(f"give seeds as ints separated by commas, got {text!r}")
    return text


def add_model_options(p: argparse.ArgumentParser, family: type[Pipeline]) -> None:
    family.add_model_arguments(p)
    p.add_argument("--random-weights", action="store_true",
                   help="random weights at full width (a smoke test; timing does not depend on weights)")
    p.add_argument("--dtype", default="fp32", choices=[k for k, v in DTYPES.items() if v in family.dtypes],
                   help="precision, run as the official inference runs it")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--offload", action="store_true", help="keep the modules in host memory, each on the device only "
                                                          "while it works (text encoder, transformer, decoder)")


def add_preset_choice(p: argparse.ArgumentParser, family: type[Pipeline]) -> None:
    choice = p.add_mutually_exclusive_group()
    choice.add_argument("--preset", help=f"FastVAR preset (default: {family.adapter.default_preset})")
    choice.add_argument("--no-fastvar", action="store_true", help="run the unpatched model")


def add_generate(p: argparse.ArgumentParser, name: str, family: type[Pipeline]) -> None:
    family.add_input_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--out", default=f"{name}.png", help="image file; several images: a grid, and OUT-0.png ... "
                                                       "beside it")
    add_preset_choice(p, family)
    p.set_defaults(func=generate)


def add_bench(p: argparse.ArgumentParser, name: str, family: type[Pipeline]) -> None:
    family.add_input_arguments(p)
    p.add_argument("--batch", type=positive_int, default=1, help="images per call")
    p.add_argument("--preset", dest="presets", action="append",
                   help="preset to time, repeatable (default: every preset of the family)")
    p.add_argument("--repeats", type=positive_int, help="timed runs per variant (default: 5 on CUDA, 2 on the CPU)")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="untimed runs per variant first")
    p.add_argument("--json", help="also write the results to this file as JSON")
    p.set_defaults(func=bench)


def add_item_options(p: argparse.ArgumentParser, family: type[Pipeline], per_item: bool) -> None:
    """--classes (VAR) or --prompts, and with ``per_item`` how many images each gets."""
    if family.batch_argument == "class_ids":
        p.add_argument("--classes", required=True, help="class ids FIRST-LAST (inclusive), e.g. 0-999")
        if per_item:
            p.add_argument("--per-class", type=positive_int, default=1, help="images per class")
    else:
        p.add_argument("--prompts", required=True, help="text file (one prompt per line) or JSONL (prompt, and "
                                                        "optionally n, seed, negative_prompt, other fields)")
        if per_item:
            p.add_argument("--per-prompt", type=positive_int, default=1, help="images per prompt without its own 'n'")


def add_sample(p: argparse.ArgumentParser, name: str, family: type[Pipeline]) -> None:
    add_item_options(p, family, per_item=True)
    p.add_argument("--out", required=True, help="output folder (created; a finished run's batches are skipped)")
    p.add_argument("--layout", default="flat", choices=sampler.LAYOUTS,
                   help="flat: NNNNNN.png; geneval: IIIII/samples/NNNN.png; npz: flat plus samples.npz")
    p.add_argument("--batch", type=positive_int, default=1, help="images per call (changes the images)")
    p.add_argument("--seed", type=int, default=0, help="base seed: batch i is seeded SEED + i")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_preset_choice(p, family)
    p.set_defaults(func=sample_command)


def add_compare(p: argparse.ArgumentParser, name: str, family: type[Pipeline]) -> None:
    add_item_options(p, family, per_item=False)
    p.add_argument("--presets", help=f"presets to compare, comma-separated (of {sorted(family.adapter.presets)})")
    example = json.dumps(dict(name="random", preset=family.adapter.default_preset, selection="random"))
    p.add_argument("--config", dest="configs", action="append", help=f"repeatable: a config as JSON, e.g. '{example}'")
    p.add_argument("--seeds", type=seed_list, default="0", help="seeds, comma-separated")
    p.add_argument("--batch", type=positive_int, default=1, help="inputs per call")
    p.add_argument("--repeats", type=positive_int, default=1, help="timed runs of every call and variant")
    p.add_argument("--out", required=True, help="folder for compare.txt, compare.json and grid.png")
    p.set_defaults(func=compare_command)


COMMANDS = {  # name: (help, what adds its options)
    "generate": ("generate images", add_generate),
    "bench": ("time FastVAR against the unpatched model", add_bench),
    "sample": ("generate an evaluation set: many images, resumable, sharded under torchrun", add_sample),
    "compare": ("what presets change against the unpatched model: speed, tokens, PSNR / SSIM, a grid", add_compare),
}


def parser() -> Parser:
    kwargs = dict(formatter_class=HelpFormatter)
    root = Parser(prog="fastvar", description=__doc__, **kwargs)
    root.add_argument("--version", action="version", version=f"fastvar {fastvar.__version__}")
    commands = root.add_subparsers(dest="command", parser_class=Parser)
    for command, (text, add_options) in COMMANDS.items():
        families = commands.add_parser(command, help=text, description=text, **kwargs).add_subparsers(
            dest="family", required=True, parser_class=Parser)
        for name, family in PIPELINES.items():
            doc = (family.__doc__ or "").split("\n")[0]
            p = families.add_parser(name, help=doc, description=doc, **kwargs)
            add_model_options(p, family)
            family.add_sampling_arguments(p)
            add_options(p, name, family)
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
