"""Evaluation sets: many images from one pipeline, deterministic, resumable, sharded over processes.

The work is cut into batches in a fixed order; each batch's seed comes from the base seed and its index,
so the images do not depend on how many processes share the work. A batch is finished when its record
(``.fastvar/batch-NNNNNN.json``) exists; images and records are written to a temporary file and renamed,
so a killed run leaves nothing half-written behind a finished name. Under ``torch.distributed`` each rank
takes every world-th unfinished batch; rank 0 writes the run's metadata and summary after a barrier.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

import fastvar
from fastvar.pipelines.base import Pipeline, Preset, preset_name

LAYOUTS = ("flat", "geneval", "npz")
STATE = ".fastvar"  # the resume state and temporary files, inside the output folder


@dataclass(frozen=True)
class Item:
    """One input line: the pipeline's input (a prompt or class id), its image count, and its own fields.

    ``seed`` gives the item its own batches (seeds ``seed``, ``seed + 1``, ... for its first, second, ...
    batch); ``negative_prompt`` is Infinity's; ``metadata`` keeps the line's fields as given (GenEval's
    ``tag`` and ``include`` ...), and is written beside its images.
    """

    input: str | int
    n: int = 1
    seed: int | None = None
    negative_prompt: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Batch:
    index: int
    seed: int
    images: tuple[tuple[int, int, int], ...]  # (image index, item index, sample number within the item)


# ----------------------------------------------------------------------------- inputs


def read_prompts(path: str | Path, per_prompt: int = 1) -> list[Item]:
    """Items from a text file (one prompt per line) or a JSONL file (one object per line with ``prompt``
    and optionally ``n``, ``seed``, ``negative_prompt`` and any other fields, such as GenEval's
    ``evaluation_metadata.jsonl``). ``per_prompt``: images of an item without ``n``."""
    path = Path(path)
    check_count(per_prompt, "per_prompt")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"prompts file {path}: cannot read it ({err})") from None
    numbered = [(i + 1, line.strip()) for i, line in enumerate(lines) if line.strip()]
    if not numbered:
        raise ValueError(f"prompts file {path} holds no prompt")
    if path.suffix != ".jsonl" and not numbered[0][1].startswith("{"):
        return [Item(line, per_prompt, metadata={"prompt": line}) for _, line in numbered]
    return [json_item(line, f"{path}:{number}", per_prompt) for number, line in numbered]


def json_item(line: str, where: str, per_prompt: int) -> Item:
    try:
        fields = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not a JSON object ({err.msg})") from None
    if not isinstance(fields, dict) or not isinstance(fields.get("prompt"), str) or not fields["prompt"].strip():
        raise ValueError(f"{where}: each line must be a JSON object with a non-empty string 'prompt'")
    n, seed, negative = fields.get("n", per_prompt), fields.get("seed"), fields.get("negative_prompt")
    check_count(n, f"{where}: 'n'")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"{where}: 'seed' must be an int, got {seed!r}")
    if negative is not None and (not isinstance(negative, str) or not negative):
        raise ValueError(f"{where}: 'negative_prompt' must be a non-empty string, got {negative!r}")
    return Item(fields["prompt"], n, seed, negative, fields)


def class_items(classes: str, per_class: int, num_classes: int = 1000) -> list[Item]:
    """Items for the class ids ``'A-B'`` (inclusive) or ``'A'``, ``per_class`` images each."""
    check_count(per_class, "per_class")
    parts = classes.split("-")
    if not 1 <= len(parts) <= 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"classes {classes!r}: give 'FIRST-LAST' (e.g. '0-999') or one id")
    first, last = int(parts[0]), int(parts[-1])
    if not first <= last < num_classes:
        raise ValueError(f"classes {classes!r}: need FIRST <= LAST within 0..{num_classes - 1}")
    return [Item(c, per_class, metadata={"class_id": c}) for c in range(first, last + 1)]


def check_count(value: object, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be an int >= 1, got {value!r}")


# ----------------------------------------------------------------------------- the plan


def plan_batches(items: Sequence[Item], batch_size: int, seed: int) -> list[Batch]:
    """The run's batches, in a fixed order: consecutive images, at most ``batch_size`` each. An item with
    its own seed, or a negative prompt where the previous has none (or the reverse), starts a new batch.
    Batch ``i`` is seeded ``seed + i``; an item's own seed ``s`` seeds its ``j``-th batch ``s + j``."""
    check_count(batch_size, "batch_size")
    batches: list[Batch] = []
    current: list[tuple[int, int, int]] = []
    key: tuple | None = None
    own_batches: dict[int, int] = {}

    def flush() -> None:
        first = items[current[0][1]]
        if first.seed is None:
            batch_seed = seed + len(batches)
        else:
            chunk = own_batches[current[0][1]] = own_batches.get(current[0][1], -1) + 1
            batch_seed = first.seed + chunk
        batches.append(Batch(len(batches), batch_seed, tuple(current)))
        current.clear()

    image = 0
    for item_index, item in enumerate(items):
        for sample in range(item.n):
            image_key = (item_index if item.seed is not None else None, item.negative_prompt is not None)
            if current and (len(current) == batch_size or image_key != key):
                flush()
            key = image_key
            current.append((image, item_index, sample))
            image += 1
    if current:
        flush()
    return batches


def image_path(layout: str, image: int, item: int, sample: int) -> str:
    """Where an image goes, relative to the output folder."""
    return f"{item:05d}/samples/{sample:04d}.png" if layout == "geneval" else f"{image:06d}.png"


# ----------------------------------------------------------------------------- files


def write_atomic(out: Path, relative: str, write: Callable[[Path], None], rank: int) -> None:
    """``write(tmp)`` to a temporary file in the state folder of ``out``, then rename it to ``out / relative``."""
    tmp = out / STATE / "tmp" / f"{rank}-{os.getpid()}-{Path(relative).name}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    write(tmp)
    (out / relative).parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out / relative)


def write_text(out: Path, relative: str, text: str, rank: int) -> None:
    write_atomic(out, relative, lambda tmp: tmp.write_text(text, encoding="utf-8"), rank)


def write_npz(path: Path, images: np.ndarray) -> None:
    with path.open("wb") as f:
        np.savez(f, arr_0=images)


def batch_record(index: int) -> str:
    return f"{STATE}/batch-{index:06d}.json"


def fingerprint(pipe: Pipeline, items: Sequence[Item], layout: str, batch_size: int, seed: int, preset: Preset,
                options: dict[str, Any]) -> dict[str, Any]:
    """What decides the images: a folder holding another run's images is refused rather than mixed in."""
    digest = hashlib.sha256(json.dumps([asdict(i) for i in items], sort_keys=True, default=str).encode()).hexdigest()
    run = dict(family=pipe.family, model=pipe.describe(), dtype=str(pipe.dtype).removeprefix("torch."),
               device=pipe.device.type, layout=layout, batch_size=batch_size, seed=seed, preset=preset_name(preset),
               options=options, items=len(items), items_sha256=digest)
    return json.loads(json.dumps(run, sort_keys=True, default=str))  # as it reads back from run.json


def check_out_dir(out_dir: str | Path) -> Path:
    """An output folder that is or can be made, and written to."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} is a file, not a folder")
    parent = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise ValueError(f"out_dir {out}: cannot write in {parent}")
    return out


def check_call_options(pipe: Pipeline, items: Sequence[Item], options: dict[str, Any]) -> None:
    accepted = set(inspect.signature(type(pipe).__call__).parameters) - {"self", pipe.batch_argument, "seed",
                                                                           "preset", "progress"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"{pipe.family} sampling options {unknown} do not exist; accepted: {sorted(accepted)}")
    if any(i.negative_prompt is not None for i in items) and "negative_prompt" not in accepted:
        raise ValueError(f"an item has a 'negative_prompt', which {pipe.family} does not take")
    kind = int if pipe.batch_argument == "class_ids" else str
    wrong = next((i.input for i in items if not isinstance(i.input, kind) or isinstance(i.input, bool)), None)
    if wrong is not None:
        what = "class ids" if kind is int else "prompts"
        raise ValueError(f"{pipe.family} generates from {what}; an item's input is {wrong!r}")


# ----------------------------------------------------------------------------- the run


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def sample(
    pipe: Pipeline, items: Sequence[Item], out_dir: str | Path, layout: str = "flat", batch_size: int = 1,
    seed: int = 0, preset: Preset = "default", progress: bool = True, **options: Any,
) -> dict[str, Any] | None:
    """Generate every image of ``items`` into ``out_dir``; ``options`` go to every pipeline call (cfg, size ...).

    ``layout``: ``flat`` (``NNNNNN.png`` and ``metadata.jsonl``), ``geneval`` (``IIIII/metadata.jsonl`` and
    ``IIIII/samples/NNNN.png`` per item, as GenEval reads them) or ``npz`` (flat, plus ``samples.npz`` holding
    the uint8 (N, H, W, 3) array ``arr_0`` that the ADM / VAR FID evaluation reads). ``preset``: a preset
    name or config, or None for the unpatched model (``"default"``: the family's default preset). Finished
    batches of an earlier run into the same folder are skipped. Returns the run's summary on rank 0 (also
    written to ``summary.json``), None on the other ranks.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {list(LAYOUTS)}")
    if not items:
        raise ValueError("no items to generate")
    if preset == "default":
        preset = pipe.adapter.default_preset
    pipe.check_preset(preset)
    check_call_options(pipe, items, options)
    out = check_out_dir(out_dir)
    batches = plan_batches(items, batch_size, seed)
    rank, world = rank_and_world()
    run = fingerprint(pipe, items, layout, batch_size, seed, preset, options)
    run_file = out / STATE / "run.json"
    previous = json.loads(run_file.read_text()) if run_file.exists() else None
    if previous is not None and previous != run:
        changed = sorted(k for k in run if previous.get(k) != run[k])
        raise ValueError(f"{out} holds another run (it differs in {changed}); use another out_dir or remove it")
    if rank == 0:
        write_text(out, f"{STATE}/run.json", json.dumps(run, indent=1), rank)
    pipe.apply_preset(preset)
    barrier(world)  # every rank lists the finished batches before any rank writes one
    todo = [b for b in batches if not (out / batch_record(b.index)).exists()]
    barrier(world)
    mine = todo[rank::world]
    started = time.perf_counter()
    bar = tqdm(total=sum(len(b.images) for b in mine), unit="img", disable=not progress or rank != 0,
               desc=f"sampling, rank 0 of {world}" if world > 1 else "sampling")
    for batch in mine:
        records = run_batch(pipe, items, batch, out, layout, preset, options, rank)
        write_text(out, batch_record(batch.index), json.dumps(records), rank)
        bar.update(len(batch.images))
    bar.close()
    barrier(world)
    if rank != 0:
        return None
    return finish(pipe, items, batches, out, layout, preset, time.perf_counter() - started, world, len(todo))


def run_batch(pipe: Pipeline, items: Sequence[Item], batch: Batch, out: Path, layout: str, preset: Preset,
              options: dict[str, Any], rank: int) -> list[dict[str, Any]]:
    """Generate and write one batch; its images' metadata."""
    chosen = [items[i] for _, i, _ in batch.images]
    call = dict(options)
    if chosen[0].negative_prompt is not None:
        call["negative_prompt"] = [i.negative_prompt for i in chosen]
    start = time.perf_counter()
    images = pipe(**{pipe.batch_argument: [i.input for i in chosen]}, seed=batch.seed, preset=preset,
                  progress=False, **call)
    seconds = time.perf_counter() - start
    records = []
    for image, (index, item, sample_number) in zip(images, batch.images):
        file = image_path(layout, index, item, sample_number)
        write_atomic(out, file, lambda tmp, image=image: image.save(tmp, format="PNG"), rank)
        records.append(dict(items[item].metadata, index=index, file=file, item=item, sample=sample_number,
                            seed=batch.seed, batch=batch.index, preset=preset_name(preset), size=list(image.size),
                            seconds=seconds / len(images)))
    return records


def finish(pipe: Pipeline, items: Sequence[Item], batches: Sequence[Batch], out: Path, layout: str, preset: Preset,
           wall: float, world: int, generated_batches: int) -> dict[str, Any]:
    """Rank 0, after every rank is done: the metadata files, the npz, and the summary."""
    missing = [b.index for b in batches if not (out / batch_record(b.index)).exists()]
    if missing:
        raise RuntimeError(f"batches {missing[:5]} of {out} are not finished; run the same command again")
    records = [r for b in batches for r in json.loads((out / batch_record(b.index)).read_text())]
    write_text(out, "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in records), 0)
    if layout == "geneval":  # GenEval reads one JSON object, the prompt's line, per folder
        for index, item in enumerate(items):
            write_text(out, f"{index:05d}/metadata.jsonl", json.dumps(item.metadata), 0)
    if layout == "npz":
        images = np.stack([np.asarray(Image.open(out / r["file"]).convert("RGB")) for r in records])
        write_atomic(out, "samples.npz", lambda tmp: write_npz(tmp, images), 0)
    busy = sum(r["seconds"] for r in records)
    patched = fastvar.is_patched(pipe.transformer)
    summary = dict(family=pipe.family, model=pipe.describe(), preset=preset_name(preset), images=len(records),
                   batches=len(batches), batches_this_run=generated_batches, processes=world,
                   wall_seconds_this_run=round(wall, 3), images_per_second_per_process=len(records) / busy,
                   fastvar=str(fastvar.summary(pipe.transformer, batch=max(len(b.images) for b in batches)))
                   if patched else None)
    write_text(out, "summary.json", json.dumps(summary, indent=1), 0)
    return summary
