"""Evaluation sets: many images (or videos) from one pipeline, deterministic, resumable, sharded over processes.

The work is cut into batches in a fixed order; each batch's seed comes from the base seed and its index
(for a pipeline seeded per row, each image's from the base seed and the image's index), so the images do not
depend on how many processes share the work. What is on disk, and how a run that
starts again trusts it, is ``fastvar.run_folder``'s. Under ``torch.distributed`` rank 0 checks the folder
and tells every rank which batches are left (one broadcast), each rank takes every world-th of them, and
rank 0 writes the run's metadata and summary after a barrier.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import fastvar
from fastvar import run_folder
from fastvar.models.sampling import check_seed
from fastvar.pipelines.base import Pipeline, Preset, preset_name
from fastvar.run_folder import STATE, batch_record, check_out_dir
from fastvar.video import av_module, frames_of, makes_videos, mp4_bytes

LAYOUTS = ("flat", "geneval", "npz", "vbench")
VBENCH_FOLDER = "videos"  # VBench reads every file of its folder as a video: the run's other files stay out
MAX_IMAGES = 10_000_000  # per run: 200 ImageNet FID sets; more is a typo, not an evaluation


@dataclass(frozen=True)
class Item:
    """One input line: the pipeline's input (a prompt or class id), its image count, and its own fields.

    ``seed`` gives the item its own batches (seeds ``seed``, ``seed + 1``, ... for its first, second, ...
    batch, or image where the pipeline is seeded per row); ``negative_prompt`` is Infinity's; ``metadata``
    keeps the line's fields as given (GenEval's ``tag`` and ``include``, VBench's ``prompt_en`` ...), and is
    written beside its images.
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
    image_seeds: tuple[int, ...]  # for a pipeline seeded per row: each image's


# ----------------------------------------------------------------------------- inputs


def read_prompts(path: str | Path, per_prompt: int = 1) -> list[Item]:
    """Items from a JSONL file (``.jsonl``: one object per line with ``prompt`` and optionally ``n``, ``seed``,
    ``negative_prompt`` and any other fields, such as GenEval's ``evaluation_metadata.jsonl``) or any other
    text file (one prompt per line, as written). ``per_prompt``: images of an item without ``n``."""
    path = Path(path)
    check_count(per_prompt, "per_prompt")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"prompts file {path}: cannot read it ({err})") from None
    numbered = [(i + 1, line.strip()) for i, line in enumerate(lines) if line.strip()]
    if not numbered:
        raise ValueError(f"prompts file {path} holds no prompt")
    if path.suffix != ".jsonl":
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
    check_seed(seed, f"{where}: 'seed'")
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


def plan_batches(items: Sequence[Item], batch_size: int, seed: int) -> Iterator[Batch]:
    """The run's batches, in a fixed order, made as they are asked for: consecutive images, at most
    ``batch_size`` each. An item with its own seed, or a negative prompt where the previous has none (or the
    reverse), starts a new batch. Batch ``i`` is seeded ``seed + i``; an item's own seed ``s`` seeds its
    ``j``-th batch ``s + j``. For a pipeline seeded per row, image ``k`` is seeded ``seed + k``, and sample
    ``j`` of an item with its own seed ``s + j``: unlike a batch's, an image's seed does not depend on the
    batch size."""
    check_count(batch_size, "batch_size")
    current: list[tuple[int, int, int]] = []
    key: tuple | None = None
    own_batches: dict[int, int] = {}
    index = image = 0

    def flush() -> Batch:
        first = items[current[0][1]]
        if first.seed is None:
            batch_seed = seed + index
        else:
            chunk = own_batches[current[0][1]] = own_batches.get(current[0][1], -1) + 1
            batch_seed = first.seed + chunk
        image_seeds = tuple(seed + image if items[item].seed is None else items[item].seed + sample
                            for image, item, sample in current)
        batch = Batch(index, batch_seed, tuple(current), image_seeds)
        current.clear()
        return batch

    for item_index, item in enumerate(items):
        for sample_number in range(item.n):
            image_key = (item_index if item.seed is not None else None, item.negative_prompt is not None)
            if current and (len(current) == batch_size or image_key != key):
                yield flush()
                index += 1
            key = image_key
            current.append((image, item_index, sample_number))
            image += 1
    if current:
        yield flush()


def seeded_per_row(family: type[Pipeline]) -> bool:
    """Whether the family's call takes one seed per row, each row then being its input alone (InfinityStar);
    the others draw a batch's rows from one seed."""
    return family.seed_per_row


def vbench_name(item: Item) -> str:
    """The name VBench looks a video up by: the item's ``prompt_en`` (VBench's key for its prompt, kept when the
    model gets a rewritten one, as InfinityStar's evaluation does), else its prompt."""
    return str(item.metadata.get("prompt_en", item.input))


def output_path(layout: str, items: Sequence[Item], image: int, item: int, sample: int, video: bool) -> str:
    """Where an image (PNG) or a video (MP4) goes, relative to the output folder."""
    if layout == "geneval":
        return f"{item:05d}/samples/{sample:04d}.png"
    if layout == "vbench":
        return f"{VBENCH_FOLDER}/{vbench_name(items[item])}-{sample}.mp4"
    return f"{image:06d}{'.mp4' if video else '.png'}"


def check_layout(layout: str, items: Sequence[Item], videos: bool) -> None:
    """Refuse a layout that cannot hold the run: GenEval's folders and the npz hold images; VBench's holds
    videos, each named by its prompt (a file name, the same for no two items). Videos need PyAV."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {list(LAYOUTS)}")
    if videos and layout in ("geneval", "npz"):
        raise ValueError(f"layout {layout!r} holds images; videos go in 'flat' (NNNNNN.mp4) or 'vbench' "
                         "(PROMPT-N.mp4)")
    if layout == "vbench" and not videos:
        raise ValueError("layout 'vbench' holds videos (duration > 0); images go in 'flat', 'geneval' or 'npz'")
    if videos:
        av_module()
    names: dict[str, int] = {}
    for index, item in enumerate(items if layout == "vbench" else ()):
        name = vbench_name(item)
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            raise ValueError(f"item {index}: {name!r} cannot name a file, as VBench names each video by its prompt; "
                             "give the item a 'prompt_en' to name it by")
        if len(f"{name}-{item.n - 1}.mp4".encode()) > 255:
            raise ValueError(f"item {index}: the prompt is too long for a file name (255 bytes with '-N.mp4'); give "
                             "the item a shorter 'prompt_en' to name it by")
        if name in names:
            raise ValueError(f"items {names[name]} and {index} are both named {name!r}: their videos would overwrite "
                             "each other in the vbench layout")
        names[name] = index


def fingerprint(family: type[Pipeline], items: Sequence[Item], layout: str, batch_size: int, seed: int,
                preset: Preset, options: dict[str, Any], dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """What decides the images, but the model (``sample`` adds its description): the settings, the inputs,
    and the numerics (precision, device, torch version; a CPU's thread count, a GPU's model). A folder
    holding another run is refused rather than mixed."""
    digest = hashlib.sha256(json.dumps([asdict(i) for i in items], sort_keys=True, default=str).encode()).hexdigest()
    run = dict(family=family.family, dtype=str(dtype).removeprefix("torch."), device=device.type,
               hardware=run_folder.hardware(device), torch=torch.__version__, layout=layout, batch_size=batch_size,
               seed=seed, preset=preset_name(preset), options=options, items=len(items), items_sha256=digest)
    return json.loads(json.dumps(run, sort_keys=True, default=str))  # as it reads back from run.json


def check_call_options(family: type[Pipeline], items: Sequence[Item], options: dict[str, Any]) -> None:
    accepted = set(inspect.signature(family.__call__).parameters) - {"self", family.batch_argument, "seed",
                                                                        "preset", "progress"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"{family.family} sampling options {unknown} do not exist; accepted: {sorted(accepted)}")
    if any(i.negative_prompt is not None for i in items) and "negative_prompt" not in accepted:
        raise ValueError(f"an item has a 'negative_prompt', which {family.family} does not take")
    kind = int if family.batch_argument == "class_ids" else str
    wrong = next((i.input for i in items if not isinstance(i.input, kind) or isinstance(i.input, bool)), None)
    if wrong is not None:
        what = "class ids" if kind is int else "prompts"
        raise ValueError(f"{family.family} generates from {what}; an item's input is {wrong!r}")


def check_plan(family: type[Pipeline], items: Sequence[Item], out_dir: str | Path, layout: str, batch_size: int,
               seed: int, preset: Preset, options: dict[str, Any], dtype: torch.dtype, device: torch.device,
               allow_existing: bool = False) -> Path:
    """Everything ``sample`` refuses that is known before the pipeline is loaded: inputs, settings, the
    sampling options (as the pipeline's call checks them), and the output folder (another run, a lock, files
    of no run). Returns the folder."""
    if not items:
        raise ValueError("no items to generate")
    check_count(batch_size, "batch_size")
    images = sum(i.n for i in items)
    if images > MAX_IMAGES:
        raise ValueError(f"{images} images asked for; a run makes at most {MAX_IMAGES:,} (split it into runs)")
    family.check_preset(preset)
    check_call_options(family, items, options)
    check_seed(seed)
    if seeded_per_row(family):
        check_seed(seed + images - 1, f"the last image's seed (seed {seed} + {images - 1})")
    else:
        batches = sum(1 for _ in plan_batches(items, batch_size, seed))
        check_seed(seed + batches - 1, f"the last batch's seed (seed {seed} + {batches - 1})")
    family.check_call(**{family.batch_argument: [i.input for i in items]}, **options)
    check_layout(layout, items, makes_videos(family, options))
    out = check_out_dir(out_dir)
    rank, world = rank_and_world()
    problem = None
    if rank == 0:  # the ranks of one run leave the folder to rank 0, and all stop if it refuses
        try:
            run_folder.check_run(out, fingerprint(family, items, layout, batch_size, seed, preset, options, dtype,
                                                  device), allow_existing)
            run_folder.check_unlocked(out)
        except ValueError as err:
            problem = str(err)
    problem = from_rank_0(problem, world)
    if problem is not None:
        raise ValueError(problem)
    return out


# ----------------------------------------------------------------------------- the run


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def from_rank_0(value: Any, world: int) -> Any:
    """Rank 0's ``value``, on every rank."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sample(
    pipe: Pipeline, items: Sequence[Item], out_dir: str | Path, layout: str = "flat", batch_size: int = 1,
    seed: int = 0, preset: Preset = "default", progress: bool = True, allow_existing: bool = False, **options: Any,
) -> dict[str, Any] | None:
    """Generate every image of ``items`` into ``out_dir``; ``options`` go to every pipeline call (cfg, size ...).

    ``layout``: ``flat`` (``NNNNNN.png``, a video ``NNNNNN.mp4``, and ``metadata.jsonl``), ``geneval``
    (``IIIII/metadata.jsonl`` and ``IIIII/samples/NNNN.png`` per item, as GenEval reads them), ``npz`` (flat,
    plus ``samples.npz`` holding the uint8 (N, H, W, 3) array ``arr_0`` that the ADM / VAR FID evaluation
    reads) or ``vbench`` (videos: ``videos/PROMPT-N.mp4``, N the sample number of its item, as VBench reads
    them; see ``vbench_name``). ``preset``: a preset
    name or config, or None for the unpatched model (``"default"``: the family's default preset).

    The same call again resumes: batches whose files are on disk as they were written are kept, the others
    are done (again). A folder holding another run, one being written by another run, or one holding files of
    no run (unless ``allow_existing``) is refused. Returns the run's summary on rank 0 (also written to
    ``summary.json``), None on the other ranks.
    """
    if preset == "default":
        preset = pipe.adapter.default_preset
    rank, world = rank_and_world()
    out = check_plan(type(pipe), items, out_dir, layout, batch_size, seed, preset, options, pipe.dtype,
                     pipe.device, allow_existing)
    run = {**fingerprint(type(pipe), items, layout, batch_size, seed, preset, options, pipe.dtype, pipe.device),
           "model": pipe.describe()}
    held, verdict = None, None
    if rank == 0:
        try:
            held = run_folder.lock(out)
            run_folder.check_run(out, run, allow_existing=True)  # again, now that no other run can change it
            run_folder.write_atomic(out, f"{STATE}/run.json", json.dumps(run, indent=1).encode(), rank)
            indices = range(sum(1 for _ in plan_batches(items, batch_size, seed)))
            verdict = run_folder.unfinished(out, indices, report=lambda line: print(line, file=sys.stderr))
        except (ValueError, OSError) as err:
            run_folder.release(held)
            verdict = f"{out}: {err}" if isinstance(err, OSError) else str(err)
    verdict = from_rank_0(verdict, world)  # every rank acts on rank 0's reading of the folder
    if isinstance(verdict, str):
        raise ValueError(verdict)
    try:
        return run_batches(pipe, items, out, layout, batch_size, seed, preset, options, verdict, rank, world,
                           progress)
    finally:
        run_folder.release(held)


def run_batches(pipe: Pipeline, items: Sequence[Item], out: Path, layout: str, batch_size: int, seed: int,
                preset: Preset, options: dict[str, Any], todo: Sequence[int], rank: int, world: int,
                progress: bool) -> dict[str, Any] | None:
    """This rank's share of the batches ``todo``; on rank 0, once every rank is done, the run's outputs."""
    mine = set(todo[rank::world])
    pipe.apply_preset(preset)
    started = time.perf_counter()
    images = sum(len(b.images) for b in plan_batches(items, batch_size, seed) if b.index in mine)
    bar = tqdm(total=images, unit="img", disable=rank != 0 or not progress,
               desc=f"sampling, rank 0 of {world}" if world > 1 else "sampling")
    for batch in plan_batches(items, batch_size, seed):
        if batch.index in mine:
            records = run_batch(pipe, items, batch, out, layout, preset, options, rank)
            run_folder.write_atomic(out, batch_record(batch.index), json.dumps(records).encode(), rank)
            bar.update(len(batch.images))
    bar.close()
    if world > 1:
        dist.barrier()
    if rank != 0:
        return None
    return finish(pipe, items, plan_batches(items, batch_size, seed), out, layout, preset,
                  time.perf_counter() - started, world, len(todo))


def run_batch(pipe: Pipeline, items: Sequence[Item], batch: Batch, out: Path, layout: str, preset: Preset,
              options: dict[str, Any], rank: int) -> list[dict[str, Any]]:
    """Generate and write one batch; its images' records (metadata, and each file's size and checksum)."""
    chosen = [items[i] for _, i, _ in batch.images]
    call = dict(options)
    if chosen[0].negative_prompt is not None:
        call["negative_prompt"] = [i.negative_prompt for i in chosen]
    per_row = seeded_per_row(type(pipe))
    seeds = batch.image_seeds if per_row else (batch.seed,) * len(chosen)
    start = time.perf_counter()
    outputs = pipe(**{pipe.batch_argument: [i.input for i in chosen]}, seed=list(seeds) if per_row else batch.seed,
                   preset=preset, progress=False, **call)
    seconds = time.perf_counter() - start
    records = []
    for output, (index, item, sample_number), image_seed in zip(outputs, batch.images, seeds):
        frames = frames_of(output)
        video = len(frames) > 1
        data = mp4_bytes(frames) if video else run_folder.png_bytes(frames[0])
        file = run_folder.write_atomic(out, output_path(layout, items, index, item, sample_number, video), data, rank)
        records.append(dict(items[item].metadata, index=index, **file, item=item, sample=sample_number,
                            seed=image_seed, batch=batch.index, preset=preset_name(preset), size=list(frames[0].size),
                            **({"frames": len(frames)} if video else {}), seconds=seconds / len(outputs)))
    return records


def finish(pipe: Pipeline, items: Sequence[Item], batches: Iterator[Batch], out: Path, layout: str, preset: Preset,
           wall: float, world: int, generated_batches: int) -> dict[str, Any]:
    """Rank 0, after every rank is done: the metadata files, the npz, and the summary, of the images that are
    on disk as written (``ValueError`` naming those that are not: the run is then unfinished)."""
    records, count, largest = [], 0, 1
    for batch in batches:
        batch_records = run_folder.read_batch(out, batch.index)
        if batch_records is None:
            raise ValueError(f"batch {batch.index} of {out} is not finished; run the same command again")
        records += batch_records
        count, largest = count + 1, max(largest, len(batch.images))
    problems = [p for r in records if (p := run_folder.file_problem(out, r, hash_it=False)) is not None]
    if problems:
        raise ValueError(f"{len(problems)} image(s) of {out} changed while the run went on ({problems[0]}): "
                         "run the same command again to make them")
    run_folder.write_atomic(out, "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode(), 0)
    if layout == "geneval":  # GenEval reads one JSON object, the prompt's line, per folder
        for index, item in enumerate(items):
            run_folder.write_atomic(out, f"{index:05d}/metadata.jsonl", json.dumps(item.metadata).encode(), 0)
    if layout == "npz":
        run_folder.write_npz(out, [r["file"] for r in records], 0)
    busy = sum(r["seconds"] for r in records)
    patched = fastvar.is_patched(pipe.transformer)
    summary = dict(family=pipe.family, model=pipe.describe(), preset=preset_name(preset), images=len(records),
                   batches=count, batches_this_run=generated_batches, processes=world,
                   wall_seconds_this_run=round(wall, 3), images_per_second_per_process=len(records) / busy,
                   fastvar=str(fastvar.summary(pipe.transformer, batch=largest)) if patched else None)
    run_folder.write_atomic(out, "summary.json", json.dumps(summary, indent=1).encode(), 0)
    return summary
