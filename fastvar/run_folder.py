"""The output folder of a ``fastvar sample`` run: what it holds is what its records say, checked on disk.

Every file is written to a temporary file in the state folder (``.fastvar``), hashed, and renamed into
place; a batch is finished when its record (``.fastvar/batch-NNNNNN.json``) lists each of its files with the
size and sha256 it was written with. A run that starts again believes the disk, not its records: a batch
whose files are missing, truncated or changed is done again. The folder is locked while a run writes it,
and holds the fingerprint of its run (``.fastvar/run.json``), so that a run with other settings or other
numerics is refused instead of mixing its images in.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None

STATE = ".fastvar"  # the run's records, lock and temporary files, inside the output folder
OUTPUTS = ("metadata.jsonl", "summary.json", "samples.npz")  # written when a run finishes


def batch_record(index: int) -> str:
    return f"{STATE}/batch-{index:06d}.json"


def check_out_dir(out_dir: str | Path) -> Path:
    """An output folder that is or can be made, and written to."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} is a file, not a folder")
    parent = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise ValueError(f"out_dir {out}: cannot write in {parent}")
    return out


# ----------------------------------------------------------------------------- what decides the pixels


def hardware(device: torch.device) -> str:
    """What the numerics of a device depend on besides the code: the GPU model, or the CPU's thread count
    (a CPU's matmuls split their sums by thread)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}, {torch.get_num_threads()} threads"


def check_run(out: Path, run: dict[str, Any], allow_existing: bool = False) -> None:
    """Refuse, without writing anything, a folder that holds files of no fastvar run (unless
    ``allow_existing``), or one holding a run that differs from ``run`` in any key ``run`` has (the fingerprint
    before the model is loaded may lack the model's)."""
    if not out.is_dir():
        return
    state, run_file = out / STATE, out / STATE / "run.json"
    if not state.is_dir() and not allow_existing and any(out.iterdir()):
        raise ValueError(f"{out} holds files of no fastvar run; sample into an empty or new folder (or allow "
                         "writing among them: allow_existing=True, CLI --allow-existing)")
    if run_file.exists():
        try:
            previous = json.loads(run_file.read_text())
        except ValueError:
            previous = {}
        changed = sorted(k for k in run if previous.get(k) != run[k])
        if changed:
            said = "; ".join(f"{k}: {previous.get(k)!r} there, {run[k]!r} now" for k in changed)
            raise ValueError(f"{out} holds another run, which differs in {changed} ({said}); its images would mix "
                             "with these: use another out_dir, or remove it")


def lock(out: Path) -> IO[str] | None:
    """Hold the folder for this process until ``release`` or its end, however it ends (an advisory lock on
    ``.fastvar/lock``, which names the holder's pid). ``ValueError`` naming the holder if another holds it."""
    (out / STATE).mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        warnings.warn("this platform has no file locks: do not start two runs on one folder", stacklevel=2)
        return None
    handle = open(out / STATE / "lock", "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ValueError(f"{out} is being written by another fastvar sample (pid {holder}); wait for it to end "
                         "or sample into another folder") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def check_unlocked(out: Path) -> None:
    """Refuse a folder another run holds (``lock``'s error), without holding it."""
    if (out / STATE / "lock").exists():
        release(lock(out))


def release(handle: IO[str] | None) -> None:
    if handle is not None:
        handle.close()  # closing the file releases its lock


# ----------------------------------------------------------------------------- files as written


def write_atomic(out: Path, relative: str, data: bytes, rank: int) -> dict[str, Any]:
    """``data`` to ``out / relative`` through a temporary file in the state folder and a rename, so that
    no half-written file ever bears the name; returns the file's record (name, size, sha256)."""
    tmp = out / STATE / "tmp" / f"{rank}-{os.getpid()}-{Path(relative).name}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(data)
    (out / relative).parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out / relative)
    return dict(file=relative, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def file_problem(out: Path, record: dict[str, Any], hash_it: bool = True) -> str | None:
    """Why the file of ``record`` is not as it was written (None: it is); without ``hash_it`` only its
    presence and size are checked."""
    path = out / record["file"]
    if not path.is_file():
        return f"{record['file']} is missing"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"{record['file']} has {size} bytes, {record['bytes']} were written"
    if hash_it and hashlib.sha256(path.read_bytes()).hexdigest() != record["sha256"]:
        return f"{record['file']} was changed since it was written"
    return None


def read_batch(out: Path, index: int) -> list[dict[str, Any]] | None:
    """The image records of batch ``index``, None when it has no record."""
    path = out / batch_record(index)
    return json.loads(path.read_text()) if path.exists() else None


def batch_problem(out: Path, index: int) -> str | None:
    """Why a batch with a record must be done again (None: every file it lists is on disk as written)."""
    try:
        records = read_batch(out, index)
    except (OSError, ValueError):
        return "its record is unreadable"
    if not all(isinstance(r, dict) and {"file", "bytes", "sha256"} <= set(r) for r in records):
        return "its record lists no sizes and checksums"
    return next(filter(None, (file_problem(out, r) for r in records)), None)


def unfinished(out: Path, indices: Sequence[int], report: Callable[[str], None]) -> list[int]:
    """The batches of ``indices`` to (re)do, oldest first: those without a record, and those whose files are
    not as written, whose records are removed (``report`` gets one line saying which and why). When any
    batch is to be done, what a finished run writes (metadata, summary, npz) is removed: it would misreport
    the folder until the run finishes."""
    todo, redo = [], []
    for index in indices:
        if not (out / batch_record(index)).exists():
            todo.append(index)
        elif (problem := batch_problem(out, index)) is not None:
            (out / batch_record(index)).unlink()
            todo.append(index)
            redo.append(f"batch {index} ({problem})")
    if redo:
        shown = ", ".join(redo[:5]) + (f" and {len(redo) - 5} more" if len(redo) > 5 else "")
        report(f"doing {len(redo)} finished batch(es) again, their files are not as written: {shown}")
    if todo:
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / STATE / "tmp", ignore_errors=True)  # what killed runs left half-written
    return todo


# ----------------------------------------------------------------------------- a finished run


def write_npz(out: Path, files: Sequence[str], rank: int) -> None:
    """``samples.npz`` holding the uint8 (N, H, W, 3) array ``arr_0`` of the images ``files`` read back
    from disk, streamed one image at a time (an ImageNet FID set at 512 px is 39 GB of pixels)."""
    first = np.asarray(Image.open(out / files[0]).convert("RGB"))
    header = {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False,
              "shape": (len(files), *first.shape)}
    tmp = out / STATE / "tmp" / f"{rank}-{os.getpid()}-samples.npz"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_2_0(member, header)
            for pixels in iter_images(out, files, first.shape):
                member.write(pixels.tobytes())
    os.replace(tmp, out / "samples.npz")


def iter_images(out: Path, files: Sequence[str], shape: tuple[int, ...]) -> Iterator[np.ndarray]:
    for file in files:
        pixels = np.asarray(Image.open(out / file).convert("RGB"))
        if pixels.shape != shape:
            raise ValueError(f"{file} is {pixels.shape[1]}x{pixels.shape[0]}, the others {shape[1]}x{shape[0]}: "
                             "one npz array needs one size")
        yield pixels
