"""Videos on disk: a pipeline's clip (a list of PIL frames) as MP4, through PyAV (the ``video`` extra), or,
with nothing more than Pillow, as an animated GIF / WebP or one PNG per frame.

PyAV encodes in-process from bundled FFmpeg libraries (its wheels carry libx264), so an MP4 can be made in
memory: ``fastvar sample`` hashes what it writes before it renames it into place.
"""

from __future__ import annotations

import inspect
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fastvar.extras import install_hint
from fastvar.run_folder import png_bytes

FPS = 16  # InfinityStar's frame rate, as its official scripts write its videos
SUFFIXES = (".mp4", ".gif", ".webp", ".png")  # .png: one file per frame, OUT-000.png ...
Output = Image.Image | Sequence[Image.Image]  # what a pipeline returns per input: an image, or a clip's frames


def duration_parameter(family: type) -> inspect.Parameter | None:
    """The ``duration`` of a family's call, in seconds (0: an image): the families that make videos take one."""
    return inspect.signature(family.__call__).parameters.get("duration")


def makes_videos(family: type, options: dict[str, Any]) -> bool:
    """Whether a family's call with ``options`` makes videos: a duration above 0."""
    parameter = duration_parameter(family)
    return parameter is not None and options.get("duration", parameter.default) > 0


def frames_of(output: Output) -> list[Image.Image]:
    """A pipeline's output as frames: an image is one frame."""
    return [output] if isinstance(output, Image.Image) else list(output)


def av_module() -> Any:
    try:
        import av
    except ImportError as err:  # an optional dependency
        raise ImportError(f"writing .mp4 needs PyAV: {install_hint('video')}; without it, write an animated .gif "
                          "or .webp, or .png (one file per frame), which Pillow makes") from err
    return av


def check_video_path(path: str | Path) -> Path:
    """A path whose suffix says how a video is written (``SUFFIXES``); ``ImportError`` naming the extra for an
    .mp4 without PyAV. Checked before any compute."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{path}: a video is written as {', '.join(SUFFIXES)} (.png: one file per frame); "
                         f"the file name must end in one of them")
    if path.suffix.lower() == ".mp4":
        av_module()
    return path


def mp4_bytes(frames: Sequence[Image.Image], fps: int = FPS) -> bytes:
    """The frames as an H.264 MP4 (yuv420p, which every player reads; the sides must be even, as every
    pipeline's are), made in memory. Lossy, and not bit-exact from one encoding to the next (x264's rounding
    varies slightly), so that a file's frames are the pipeline's only up to the codec."""
    av = av_module()
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for index, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(np.asarray(frame.convert("RGB")), format="rgb24")
            picture.pts = index
            container.mux(stream.encode(picture))
        container.mux(stream.encode())  # what the encoder still holds
    return buffer.getvalue()


def animated_bytes(frames: Sequence[Image.Image], format: str, fps: int = FPS) -> bytes:
    """The frames as an animated GIF or WebP (Pillow), looping. GIF has 256 colours a frame and keeps frame
    times in hundredths of a second (16 fps plays at about 16.7)."""
    buffer = io.BytesIO()
    frames[0].save(buffer, format=format, save_all=True, append_images=list(frames[1:]), duration=1000 / fps,
                   loop=0)
    return buffer.getvalue()


def video_files(frames: Sequence[Image.Image], path: str | Path, fps: int = FPS) -> dict[Path, bytes]:
    """What ``save_video`` writes: {path: bytes}, one file, or for .png one per frame beside ``path``
    (``STEM-000.png`` ...)."""
    path = check_video_path(path)
    suffix = path.suffix.lower()
    if suffix == ".png":
        return {path.with_name(f"{path.stem}-{i:03d}.png"): png_bytes(frame) for i, frame in enumerate(frames)}
    if suffix == ".mp4":
        return {path: mp4_bytes(frames, fps)}
    return {path: animated_bytes(frames, suffix[1:].upper(), fps)}


def save_video(frames: Sequence[Image.Image], path: str | Path, fps: int = FPS) -> list[Path]:
    """Write a clip by the suffix of ``path``: .mp4 (PyAV, the ``video`` extra), .gif or .webp (animated, Pillow),
    or .png (one file per frame, ``STEM-000.png`` ...). Returns the files written."""
    files = video_files(frames, path, fps)
    for file, data in files.items():
        file.write_bytes(data)
    return list(files)
