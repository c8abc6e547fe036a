"""What every family's pipeline shares: precision and device, a FastVAR preset per call, images out,
and the text encoders that come through transformers."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

import fastvar
from fastvar.adapters.base import Adapter
from fastvar.config import FastVARConfig
from fastvar.dtypes import resolve_dtype
from fastvar.extras import install_hint
from fastvar.hub import WeightsUnavailableError, hub_unreachable_reason

Preset = FastVARConfig | str | None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when torch sees a GPU, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device = {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA device")
    return device


class Pipeline:
    """One family's generator. Subclasses set the class attributes, ``transformer`` (the model fastvar
    patches), ``vae`` (whose ``decoder`` makes the image) and ``dtype``, and implement ``from_pretrained``,
    ``random``, ``__call__`` and the command-line hooks below."""

    family: ClassVar[str]
    adapter: ClassVar[type[Adapter]]  # how fastvar patches the transformer: its presets
    batch_argument: ClassVar[str]  # the __call__ argument listing one input per image
    dtypes: ClassVar[tuple[torch.dtype, ...]]  # the precisions the family runs in, float32 first
    seed_per_row: ClassVar[bool] = False  # one seed per row (each row its input alone), not one per batch

    transformer: nn.Module
    vae: nn.Module
    dtype: torch.dtype

    @classmethod
    def check_dtype(cls, dtype: torch.dtype | str | None) -> torch.dtype:
        """A supported precision: a torch dtype or 'fp32' / 'bf16' / 'fp16'; None is float32."""
        return resolve_dtype(dtype, cls.dtypes, f"{cls.family} dtype")

    offload_device: torch.device | None = None  # set by enable_model_cpu_offload

    @property
    def device(self) -> torch.device:
        """Where generation runs (with offload: where each module goes while it works)."""
        return self.offload_device or next(self.transformer.parameters()).device

    def modules(self) -> dict[str, nn.Module]:
        """The pipeline's torch modules by name (moved together by ``to``)."""
        return {"transformer": self.transformer, "vae": self.vae}

    def to(self, device: str | torch.device) -> Pipeline:
        device = resolve_device(device)
        self.offload_device = None
        for module in self.modules().values():
            module.to(device)
        return self

    def enable_model_cpu_offload(self, device: str | torch.device | None = "cuda") -> Pipeline:
        """Keep every module in host memory and move each to ``device`` only while it works: the text
        encoder while encoding, the transformer over the scales, the image decoder while decoding (with the
        transformer where the model's call decodes, as VAR's and HART's do). Peak GPU memory is that of the
        largest phase; each call pays the transfers. ``to(device)`` turns it off."""
        device = resolve_device(device)
        if self.offload_device is not None:
            raise RuntimeError("model offload is already on; call pipe.to(device) to turn it off first")
        for module in self.modules().values():
            module.to("cpu")
        self.offload_device = device
        return self

    @contextlib.contextmanager
    def working(self, *modules: nn.Module | None) -> Iterator[None]:
        """With offload on: ``modules`` (None: absent) on the generation device for the block, back in host
        memory after it."""
        modules = [m for m in modules if m is not None]
        if self.offload_device is None or not modules:
            yield
            return
        for module in modules:
            module.to(self.offload_device)
        try:
            yield
        finally:
            for module in modules:
                module.to("cpu")

    @classmethod
    def check_call(cls, *args: Any, **kwargs: Any) -> Any:
        """Refuse, without a model and before any compute, the ``__call__`` arguments the call would refuse;
        returns them normalised (subclasses: same signature as ``__call__``)."""
        raise NotImplementedError

    @classmethod
    def check_preset(cls, preset: Preset) -> None:
        """Refuse, before any compute, a preset name the family does not have."""
        if isinstance(preset, str) and preset not in cls.adapter.presets:
            raise ValueError(f"unknown {cls.family} preset {preset!r}; available: {sorted(cls.adapter.presets)}")

    def apply_preset(self, preset: Preset) -> None:
        """Patch the transformer with ``preset`` (a preset name or config), or run it unpatched (None)."""
        if preset is None:
            if fastvar.is_patched(self.transformer):
                fastvar.unpatch(self.transformer)
        else:
            fastvar.patch(self.transformer, preset)

    @contextlib.contextmanager
    def precision(self) -> Iterator[None]:
        """Autocast to the pipeline's half precision, as the official inference runs it."""
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            yield

    # ----------------------------------------------------------------------- command line

    @classmethod
    def add_model_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Options choosing the model and its files, for ``generate`` and ``bench``."""
        raise NotImplementedError

    @classmethod
    def add_input_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Options of ``generate`` and ``bench`` listing the images (prompts or class ids)."""
        raise NotImplementedError

    @classmethod
    def add_sampling_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Options of every command that become ``__call__`` arguments (guidance, sampling, size)."""
        raise NotImplementedError

    @classmethod
    def model_plan(cls, args: argparse.Namespace, random: bool,
                   options: dict[str, Any]) -> tuple[list[tuple[int, int]], int]:
        """The scale shapes (h, w) a call with ``options`` runs and the depth of the model the model options
        name (official weights, or random ones), without loading it: a FastVAR config is checked against
        them first. ``ValueError`` for model options ``from_arguments`` would refuse."""
        raise NotImplementedError

    @classmethod
    def from_arguments(cls, args: argparse.Namespace, random: bool) -> Pipeline:
        """The pipeline the model options name: official weights, or random ones."""
        raise NotImplementedError

    @classmethod
    def inputs(cls, args: argparse.Namespace) -> list:
        """The ``batch_argument`` of ``__call__`` from the options of ``add_input_arguments``."""
        raise NotImplementedError

    @classmethod
    def call_arguments(cls, args: argparse.Namespace) -> dict[str, Any]:
        """``__call__`` keyword arguments from the options of ``add_sampling_arguments``."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line naming the model, for benchmark titles."""
        raise NotImplementedError


def cut_depth(args: argparse.Namespace, random: bool, official: int, model: str) -> int:
    """The depth of the model a command line names: ``--depth`` cuts ``model``'s ``official`` blocks, for
    random weights only; ``ValueError`` for a depth it cannot have."""
    if args.depth is not None and not random:
        raise ValueError("--depth cuts the official model and needs --random-weights")
    if args.depth is not None and not 1 <= args.depth <= official:
        raise ValueError(f"--depth must be in 1..{official} for {model}, got {args.depth}")
    return args.depth or official


def preset_name(preset: Preset) -> str | None:
    """A preset's name, or a config's repr, for reports; None is the unpatched model."""
    return preset if preset is None or isinstance(preset, str) else repr(preset)


def check_prompts(prompt: object, name: str = "prompt", count: int | None = None) -> list[str]:
    """A prompt or a list of prompts as a list of non-empty strings (``count`` of them, if given)."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list | tuple) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"{name} must be a non-empty string or a non-empty list of them, got {prompt!r}")
    if count is not None and len(prompts) != count:
        if len(prompts) != 1:
            raise ValueError(f"{name} has {len(prompts)} entries for {count} prompts; give one or {count}")
        prompts = list(prompts) * count
    return list(prompts)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) RGB in [0, 1] -> B PIL images."""
    pixels = images.float().mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


# ----------------------------------------------------------------------------- text encoders


def transformers_module(family: str, extra: str) -> Any:
    try:
        import transformers
    except ImportError as err:  # an optional dependency
        raise ImportError(f"the {family} text encoder needs transformers: "
                          f"{install_hint(extra)}") from err
    return transformers


def load_pretrained(loader: Any, name_or_path: str | Path, parameter: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` (a transformers class) from a local folder, the Hugging Face cache, or the
    Hub when it can be reached; when it cannot, one ``WeightsUnavailableError`` line at once."""
    if Path(name_or_path).is_dir():
        return loader.from_pretrained(name_or_path, **kwargs)
    try:
        return loader.from_pretrained(name_or_path, local_files_only=True, **kwargs)
    except OSError:
        pass
    reason = hub_unreachable_reason()
    if reason is not None:
        raise WeightsUnavailableError(
            f"{name_or_path} is not in the Hugging Face cache, and {reason}; download it "
            f"(https://huggingface.co/{name_or_path}) and pass {parameter}=PATH (CLI: --{parameter.replace('_', '-')} "
            "PATH)")
    return loader.from_pretrained(name_or_path, **kwargs)
