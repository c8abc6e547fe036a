"""The fastvar command: generate images and videos, bench FastVAR against the unpatched model, sample evaluation
sets and compare presets' outputs, for every model family fastvar has a pipeline for.

Every mistake is one 'error:' line (exit status 2), found before anything is loaded where it can be: the
inputs, the sampling options, the FastVAR presets and configs against the model's schedule, and every output
path, which is probed by writing to it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import fastvar
from fastvar import run_folder, sampler, video
from fastvar.bench import benchmark, format_results, results_json
from fastvar.calibrate import calibrate
from fastvar.config import FastVARConfig
from fastvar.dtypes import DTYPES, dtype_name, resolve_dtype
from fastvar.hub import WeightsUnavailableError
from fastvar.pipelines import PIPELINES
from fastvar.pipelines.base import Pipeline, Preset, resolve_device

USER_ERRORS = (ValueError, WeightsUnavailableError, ImportError)  # what a wrong option or a missing file raises
MAX_GENERATE = 64  # images (videos) of one generate command (one batch, one grid); fastvar sample batches more


class UserError(Exception):
    """A mistake in the command line, reported as one ``error:`` line."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, where it has one; descriptions keep their paragraphs."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS))
        if shown and "%(default)" not in text and "(default:" not in text:
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


# ----------------------------------------------------------------------------- outputs, probed before any work


def check_writable(folder: Path, what: str) -> None:
    """``folder`` exists and a file can be made in it (made and removed: permissions and read-only mounts
    alike)."""
    if not folder.is_dir():
        raise UserError(f"{what}: the folder {folder} does not exist")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(f"{what}: cannot write in {folder} ({err.strerror or err})") from None


def check_output_file(path: str, what: str) -> Path:
    """A file that can be written: not a folder, in a writable folder, itself writable if it exists."""
    out = Path(path)
    if out.is_dir():
        raise UserError(f"{what}: {out} is a folder; give a file name")
    check_writable(out.parent, what)
    if out.exists() and not os.access(out, os.W_OK):
        raise UserError(f"{what}: {out} exists and cannot be written")
    return out


def check_image_output(path: str) -> Path:
    """An image file PIL can write, where it can be written."""
    suffix = Path(path).suffix.lower()
    if suffix not in Image.registered_extensions() or suffix in (".pdf", ".eps"):
        raise UserError(f"--out {path}: the file name must end in an image format such as .png or .jpg")
    return check_output_file(path, f"--out {path}")


def check_video_output(path: str) -> Path:
    """A video file fastvar can write (``fastvar.video.SUFFIXES``; .mp4 with PyAV), where it can be written."""
    try:
        video.check_video_path(path)
    except ValueError as err:
        raise UserError(f"--out {err}") from None
    return check_output_file(path, f"--out {path}")


def check_out_folder(path: str) -> Path:
    """A folder that is or can be made, and written in."""
    out = run_folder.check_out_dir(path)
    existing = next(p for p in (out, *out.parents) if p.exists())
    check_writable(existing, f"--out {path}")
    return out


def rescue(what: str, err: OSError, save: Any) -> None:
    """A finished result that could not be written where asked: ``save(folder)`` it into a new temporary
    folder, and say both in the error."""
    folder = Path(tempfile.mkdtemp(prefix="fastvar-"))
    save(folder)
    raise UserError(f"cannot write {what} ({err.strerror or err}); the result is saved in {folder} instead")


def save_images(images: Sequence[Image.Image], out: Path) -> list[Path]:
    """One image as ``out``; several: the grid as ``out`` and each image beside it (``OUT-0.png`` ...)."""
    if len(images) == 1:
        images[0].save(out)
        return [out]
    to_grid(images).save(out)
    singles = [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
    for image, single in zip(images, singles):
        image.save(single)
    return [out, *singles]


def save_videos(clips: Sequence[Sequence[Image.Image]], out: Path) -> list[Path]:
    """One video as ``out``; several: ``OUT-0.mp4`` ... (``.png``: each video's frames, ``OUT-000.png`` ...)."""
    if len(clips) == 1:
        return video.save_video(clips[0], out)
    return [path for i, clip in enumerate(clips) for path in video.save_video(clip, out.with_name(
        f"{out.stem}-{i}{out.suffix}"))]


# ----------------------------------------------------------------------------- what to run, checked before loading


def check_presets(names: Sequence[str], family: type[Pipeline]) -> None:
    unknown = sorted(set(names) - set(family.adapter.presets))
    if unknown:
        raise UserError(f"unknown {family.family} preset(s) {unknown}; available: {sorted(family.adapter.presets)}")


def chosen_preset(args: argparse.Namespace, family: type[Pipeline]) -> str | None:
    if args.no_fastvar:
        return None
    check_presets([args.preset or family.adapter.default_preset], family)
    return args.preset or family.adapter.default_preset


def check_model_options(args: argparse.Namespace, family: type[Pipeline], random: bool, options: dict[str, Any],
                        variants: dict[str, Preset]) -> None:
    """The model options (weights files and random weights exclude each other), and every FastVAR variant
    ({name: preset or config}) resolved against the schedule and depth of the model they name, before it is
    loaded."""
    if args.random_weights:
        given = [f"--{name.replace('_', '-')}" for name in ("weights", "vae_weights", "text_encoder")
                 if getattr(args, name, None) is not None]
        if given:
            raise UserError(f"{' and '.join(given)} {'gives' if len(given) == 1 else 'give'} files to load and "
                            "--random-weights asks for none: give one or the other")
    shapes, depth = family.model_plan(args, random, options)
    for name, variant in variants.items():
        config = family.adapter.presets[variant] if isinstance(variant, str) else variant
        try:
            if config is not None:
                family.adapter.resolve(config, shapes, depth)
        except ValueError as err:
            raise UserError(f"{name} does not fit this model ({depth} blocks, {len(shapes)} scales): {err}") from None


def check_images(family: type[Pipeline], inputs: list, options: dict[str, Any], seeds: Sequence[int]) -> None:
    """Every call's inputs and options as the pipeline's call checks them, without a model."""
    for seed in seeds:
        family.check_call(**{family.batch_argument: inputs}, **options, seed=seed)


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


# ----------------------------------------------------------------------------- the commands


def generate(args: argparse.Namespace) -> None:
    family = PIPELINES[args.family]
    inputs, options = family.inputs(args), family.call_arguments(args)
    videos = video.makes_videos(family, options)
    out = check_video_output(args.out or f"{args.family}.mp4") if videos else check_image_output(
        args.out or f"{args.family}.png")
    preset = chosen_preset(args, family)
    if len(inputs) > MAX_GENERATE:
        what = "videos asked for; generate makes at most {} (one batch)" if videos else \
            "images asked for; generate makes at most {} (one batch, one grid)"
        raise UserError(f"{len(inputs)} {what.format(MAX_GENERATE)}: fastvar sample makes any number, in batches")
    check_model_options(args, family, args.random_weights, options, {str(preset): preset})
    check_images(family, inputs, options, [args.seed])
    resolve_device(args.device)
    pipe = load_pipeline(family, args, random=args.random_weights)
    outputs = pipe(**{family.batch_argument: inputs}, **options, seed=args.seed, preset=preset)
    if fastvar.is_patched(pipe.transformer):
        print(fastvar.summary(pipe.transformer), file=sys.stderr)
    if videos:
        save = save_videos
        said = f"{len(outputs)} video(s) of {len(video.frames_of(outputs[0]))} frames at {video.FPS} fps"
    else:
        outputs = [video.frames_of(o)[0] for o in outputs]  # a family of videos makes an image as one frame
        save = save_images
        said = "a grid, and each image beside it" if len(outputs) > 1 else "an image"
    try:
        written = save(outputs, out)
    except OSError as err:
        rescue(str(out), err, lambda folder: save(outputs, folder / out.name))
    print(f"saved {written[0] if len(written) == 1 else f'{written[0]} ... {written[-1]}'} ({said})",
          file=sys.stderr)


def bench_pipeline(args: argparse.Namespace, family: type[Pipeline], options: dict[str, Any]) -> Pipeline:
    """The official weights at hand, else random weights: timing does not depend on weight values."""
    if args.random_weights:
        return load_pipeline(family, args, random=True)
    try:
        family.model_plan(args, False, options)  # a cut model (--depth) has no official weights
        with cache_only():
            return load_pipeline(family, args, random=False)
    except (WeightsUnavailableError, ValueError) as err:
        if args.weights:
            raise
        print(f"official weights not at hand ({err}); timing random weights", file=sys.stderr)
    return load_pipeline(family, args, random=True)


def bench(args: argparse.Namespace) -> None:
    family = PIPELINES[args.family]
    items, options = family.inputs(args), family.call_arguments(args)
    inputs = [items[i % len(items)] for i in range(args.batch)]
    presets = args.presets or []
    check_presets(presets, family)
    json_out = None if args.json is None else check_output_file(args.json, f"--json {args.json}")
    check_model_options(args, family, True, options, {p: p for p in presets})
    check_images(family, inputs, options, [0])
    resolve_device(args.device)
    pipe = bench_pipeline(args, family, options)
    if not presets:  # every preset that fits the model (a KV budget is made for a number of blocks)
        presets = list(fastvar.presets(pipe.transformer))
        left_out = sorted(set(family.adapter.presets) - set(presets))
        if left_out:
            print(f"not for this model, so not timed: {', '.join(left_out)}", file=sys.stderr)
    device = pipe.device
    repeats = args.repeats or (5 if device.type == "cuda" else 2)
    results = benchmark(pipe, {**options, family.batch_argument: inputs}, presets, repeats=repeats,
                        warmup=args.warmup, report=lambda line: print(line, file=sys.stderr))
    where, dtype = run_folder.hardware(device), dtype_name(pipe.dtype)
    title = (f"{pipe.describe()} batch {args.batch} {dtype} on {where}, torch {torch.__version__}; "
             f"{repeats} alternated runs after {args.warmup} warm-up (ms)")
    print(format_results(results, title))
    if json_out is not None:
        data = json.dumps(results_json(results, model=pipe.describe(), family=args.family, batch=args.batch,
                                       dtype=dtype, device=where, torch=torch.__version__, repeats=repeats,
                                       warmup=args.warmup), indent=1)
        try:
            json_out.write_text(data)
        except OSError as err:
            rescue(str(json_out), err, lambda folder: (folder / json_out.name).write_text(data))


def read_items(args: argparse.Namespace, family: type[Pipeline]) -> list[sampler.Item]:
    """The items of ``--classes`` or ``--prompts`` (with ``--per-class`` / ``--per-prompt`` where given)."""
    if family.batch_argument == "class_ids":
        return sampler.class_items(args.classes, getattr(args, "per_class", 1))
    return sampler.read_prompts(args.prompts, getattr(args, "per_prompt", 1))


def sample_command(args: argparse.Namespace) -> None:
    family = PIPELINES[args.family]
    preset = chosen_preset(args, family)
    items = read_items(args, family)
    options = family.call_arguments(args)
    check_model_options(args, family, args.random_weights, options, {str(preset): preset})
    out = check_out_folder(args.out)
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1),
                                                                      ("LOCAL_RANK", 0)))
    if world > 1:  # launched by torchrun: gloo for the two collectives, so the same on CPUs and GPUs
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(hours=2))
        if args.device in ("auto", "cuda") and torch.cuda.is_available():
            args.device = f"cuda:{local_rank}"
    try:
        sampler.check_plan(family, items, out, args.layout, args.batch, args.seed, preset, options,
                           resolve_dtype(args.dtype), resolve_device(args.device), args.allow_existing)
        pipe = load_pipeline(family, args, random=args.random_weights)
        summary = sampler.sample(pipe, items, out, layout=args.layout, batch_size=args.batch, seed=args.seed,
                                 preset=preset, progress=not args.no_progress, allow_existing=args.allow_existing,
                                 **options)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    if summary is not None:
        what = "videos" if video.makes_videos(family, options) else "images"
        print(f"{summary['images']} {what} in {out} ({summary['batches_this_run']} of {summary['batches']} batches "
              f"generated now, {summary['images_per_second_per_process']:.2f} {what}/s per process); "
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
    except (TypeError, ValueError) as err:
        raise UserError(f"--config {name}: {err}") from None


def compare_command(args: argparse.Namespace) -> None:
    family = PIPELINES[args.family]
    names = [n for n in args.presets.split(",") if n] if args.presets else []
    check_presets(names, family)
    variants: dict[str, Preset] = {n: n for n in names}
    for text in args.configs or []:
        name, config = variant_from_json(text, family)
        if name in variants or name == "unpatched":
            raise UserError(f"--config {name}: the name {name!r} is taken (by --presets, another --config, or the "
                            "unpatched model); give each variant its own name")
        variants[name] = config
    if not variants:
        raise UserError("give --presets NAME[,NAME...] or --config JSON")
    inputs = [i.input for i in read_items(args, family)]
    options = family.call_arguments(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    check_model_options(args, family, args.random_weights, options, variants)
    check_images(family, inputs, options, seeds)
    out = check_out_folder(args.out)
    resolve_device(args.device)
    pipe = load_pipeline(family, args, random=args.random_weights)
    comparison = fastvar.compare(pipe, inputs, variants, seeds=seeds, batch_size=args.batch, repeats=args.repeats,
                                 **options)
    print(comparison.table())
    try:
        comparison.save(out)
    except OSError as err:
        rescue(f"the comparison into {out}", err, comparison.save)
    print(f"saved compare.txt, compare.json and grid.png (rows: images, columns: unpatched, "
          f"{', '.join(variants)}) in {out}", file=sys.stderr)


def calibrate_command(args: argparse.Namespace) -> None:
    family = PIPELINES[args.family]
    if not hasattr(family.adapter, "attention_module"):  # the attention class whose KV cache a budget cuts
        raise UserError(f"calibrate measures a KV budget, and {family.family} takes none")
    if not 0 < args.fraction < 1:
        raise UserError(f"--fraction {args.fraction}: the share of the KV cache to keep, in (0, 1)")
    inputs = [i.input for i in read_items(args, family)]
    options = family.call_arguments(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    check_model_options(args, family, args.random_weights, options, {})
    check_images(family, inputs, options, seeds)
    out = check_output_file(args.out, f"--out {args.out}")
    resolve_device(args.device)
    pipe = load_pipeline(family, args, random=args.random_weights)
    budget = calibrate(pipe, inputs, args.fraction, seeds, **options)
    for position, counts in sorted(budget.capacities.items()):
        drafters = [str(b) for b, c in enumerate(counts) if c == max(counts) and c != min(counts)]
        kept = (f"drafters {', '.join(drafters)} keep {max(counts)} tokens, the other blocks {min(counts)}"
                if drafters else f"no drafters, every block keeps {min(counts)} tokens")
        print(f"scale {position}: {kept}", file=sys.stderr)
    try:
        budget.to_file(out)
    except OSError as err:
        rescue(str(out), err, lambda folder: budget.to_file(folder / out.name))
    print(f"wrote {out} (threshold {budget.threshold}): a FastVARConfig's kv_budget, e.g. "
          f"fastvar.patch(model, 'none', kv_budget={str(out)!r})", file=sys.stderr)


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


def preset_names(family: type[Pipeline]) -> str:
    return ", ".join(family.adapter.presets)


def add_preset_choice(p: argparse.ArgumentParser, family: type[Pipeline]) -> None:
    choice = p.add_mutually_exclusive_group()
    choice.add_argument("--preset", help=f"FastVAR preset, one of {preset_names(family)} "
                                         f"(default: {family.adapter.default_preset})")
    choice.add_argument("--no-fastvar", action="store_true", help="run the unpatched model")


def add_generate(p: argparse.ArgumentParser, name: str, family: type[Pipeline]) -> None:
    family.add_input_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    videos = ("; a video: .mp4 (PyAV), .gif or .webp (animated), or .png (one file per frame, OUT-000.png ...), "
              f"several: OUT-0.mp4 ... (default: {name}.png, a video {name}.mp4)"
              if video.duration_parameter(family) else f" (default: {name}.png)")
    p.add_argument("--out", help=f"image file; several images (at most {MAX_GENERATE}): a grid, and OUT-0.png ... "
                                 f"beside it{videos}")
    add_preset_choice(p, family)
    p.set_defaults(func=generate)


def add_bench(p: argparse.ArgumentParser, name: str, family: type[Pipeline]) -> None:
    family.add_input_arguments(p)
    p.add_argument("--batch", type=positive_int, default=1, help="images per call")
    p.add_argument("--preset", dest="presets", action="append",
                   help=f"preset to time, repeatable: {preset_names(family)} (default: every one that fits the "
                        "model)")
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
                   help="flat: NNNNNN.png (a video: NNNNNN.mp4); geneval: IIIII/samples/NNNN.png; npz: flat plus "
                        "samples.npz; vbench (videos): videos/PROMPT-N.mp4")
    p.add_argument("--batch", type=positive_int, default=1, help="images per call (changes the images)")
    p.add_argument("--seed", type=int, default=0, help="base seed: batch i is seeded SEED + i")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--allow-existing", action="store_true",
                   help="write into a folder that holds files of no fastvar run (they may be overwritten)")
    add_preset_choice(p, family)
    p.set_defaults(func=sample_command)


def add_compare(p: argparse.ArgumentParser, name: str, family: type[Pipeline]) -> None:
    add_item_options(p, family, per_item=False)
    p.add_argument("--presets", help=f"presets to compare, comma-separated, of {preset_names(family)}")
    example = json.dumps(dict(name="random", preset=family.adapter.default_preset, selection="random"))
    p.add_argument("--config", dest="configs", action="append", help=f"repeatable: a config as JSON, e.g. '{example}'")
    p.add_argument("--seeds", type=seed_list, default="0", help="seeds, comma-separated")
    p.add_argument("--batch", type=positive_int, default=1, help="inputs per call")
    p.add_argument("--repeats", type=positive_int, default=1, help="timed runs of every call and variant")
    p.add_argument("--out", required=True, help="folder for compare.txt, compare.json and grid.png")
    p.set_defaults(func=compare_command)


def add_calibrate(p: argparse.ArgumentParser, name: str, family: type[Pipeline]) -> None:
    add_item_options(p, family, per_item=False)
    p.add_argument("--fraction", type=float, default=0.1, help="share of the KV cache the budget keeps")
    p.add_argument("--seeds", type=seed_list, default="0", help="seeds, comma-separated: one call each")
    p.add_argument("--out", required=True, help="the budget file to write (the official ScaleKV format)")
    p.set_defaults(func=calibrate_command)


COMMANDS = {  # name: (help, what adds its options)
    "generate": ("generate images", add_generate),
    "bench": ("time FastVAR against the unpatched model", add_bench),
    "sample": ("generate an evaluation set: many images, resumable, sharded under torchrun", add_sample),
    "compare": ("what presets change against the unpatched model: speed, tokens, PSNR / SSIM, a grid", add_compare),
    "calibrate": ("a KV budget for the model: its drafter and refiner blocks, measured on a few inputs",
                  add_calibrate),
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
    except KeyboardInterrupt:
        resume = "; the same command resumes the run" if args.command == "sample" else ""
        print(f"\ninterrupted{resume}", file=sys.stderr)
        raise SystemExit(130) from None
