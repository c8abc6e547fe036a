"""VARPipeline: ImageNet class ids in, PIL images out (FoundationVision/VAR, with or without FastVAR)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fastvar.adapters.var import VarAdapter
from fastvar.hub import Checkpoint, load_checkpoint, parameters_on_meta, read_state_dict
from fastvar.models.sampling import check_sampling, check_seed
from fastvar.models.var import OFFICIAL_DEPTHS, PATCH_NUMS_256, PATCH_NUMS_512, VAR, build
from fastvar.pipelines.base import Pipeline, Preset, resolve_device, to_pil

HUB_REPO = "FoundationVision/var"
MODELS = {f"var-d{depth}": depth for depth in OFFICIAL_DEPTHS}
VAE = Checkpoint(HUB_REPO, "vae_ch160v4096z32", "vae_weights")
SAMPLING = dict(cfg=4.0, top_k=900, top_p=0.95)  # the official demo's settings
NUM_CLASSES = 1000  # ImageNet's, those of every official VAR


def transformer_checkpoint(depth: int) -> Checkpoint:
    return Checkpoint(HUB_REPO, f"var_d{depth}", "weights")


def depth_in_folder(folder: Path) -> int:
    """The depth of the one official VAR checkpoint (``var_d16.pth`` ...) in ``folder``."""
    depths = sorted({int(m.group(1)) for f in folder.iterdir() if (m := re.fullmatch(r"var_d(\d+)\.(pth|safetensors)",
                                                                                       f.name))})
    if len(depths) != 1:
        found = f"checkpoints of depths {depths}" if depths else "no var_d*.pth / var_d*.safetensors"
        raise ValueError(f"{folder} holds {found}; name the model instead, e.g. "
                         f"VARPipeline.from_pretrained('var-d16', weights='{folder}')")
    return depths[0]


class VARPipeline(Pipeline):
    """Class-conditional ImageNet VAR and its VQVAE.

    Half precisions (``dtype``) run as the official demo does: float32 weights under autocast.
    """

    family = "var"
    adapter = VarAdapter
    batch_argument = "class_ids"
    dtypes = (torch.float32, torch.bfloat16, torch.float16)

    def __init__(self, transformer: VAR, dtype: torch.dtype | str | None = torch.float32):
        self.transformer = transformer.eval().requires_grad_(False)
        self.vae = transformer.vae_proxy[0]
        self.dtype = self.check_dtype(dtype)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path = "var-d16", weights: str | Path | None = None,
        vae_weights: str | Path | None = None, dtype: torch.dtype | str | None = torch.float32,
        device: str | torch.device | None = "cpu", progress: bool = True,
    ) -> VARPipeline:
        """An official model (``"var-d16"`` ... ``"var-d36"``) or a folder holding one (``var_d16.pth`` and
        ``vae_ch160v4096z32.pth`` as downloaded). ``weights`` / ``vae_weights``: the checkpoint files, or
        folders holding them; a ``weights`` folder is searched for the VAE too. Files not given are taken
        from the Hugging Face cache, else the Hub (``FoundationVision/var``)."""
        dtype, device = cls.check_dtype(dtype), resolve_device(device)
        folder = None
        if str(name_or_path) in MODELS:
            depth = MODELS[str(name_or_path)]
        elif Path(name_or_path).is_dir():
            folder, depth = Path(name_or_path), depth_in_folder(Path(name_or_path))
        else:
            raise ValueError(f"{name_or_path!r} is neither an official VAR ({list(MODELS)}) nor a folder")
        search = [folder, weights if weights is not None and Path(weights).is_dir() else None]
        var_file = transformer_checkpoint(depth).find(weights, [folder])
        vae_file = VAE.find(vae_weights, search)
        vae_state = read_state_dict(vae_file, ("trainer", "vae_local"))  # memory-mapped: nothing is read yet
        var_state = read_state_dict(var_file, ("trainer", "var_wo_ddp"))
        with parameters_on_meta():
            vae, var = build(depth)
        load_checkpoint(vae, vae_state, device=device, progress=progress)
        load_checkpoint(var, var_state, device=device, progress=progress)
        return cls(var, dtype)

    @classmethod
    def random(cls, depth: int = 16, resolution: int | None = None, dtype: torch.dtype | str | None = torch.float32,
               device: str | torch.device | None = "cpu", seed: int = 0) -> VARPipeline:
        """The official architecture of ``depth`` blocks (any depth) with random weights, for timing and smoke
        tests. ``resolution`` 256 or 512 (default: 512 for depth 36, as the official d36)."""
        if resolution is None:
            resolution = 512 if depth == 36 else 256
        if resolution not in (256, 512):
            raise ValueError(f"resolution must be 256 or 512, got {resolution!r}")
        dtype, device = cls.check_dtype(dtype), resolve_device(device)
        torch.manual_seed(seed)
        with torch.device(device):
            _, var = build(depth, PATCH_NUMS_512 if resolution == 512 else PATCH_NUMS_256)
        return cls(var, dtype)

    @classmethod
    def check_call(cls, class_ids: int | Sequence[int], seed: int | None = 0, cfg: float = SAMPLING["cfg"],
                   top_k: int = SAMPLING["top_k"], top_p: float = SAMPLING["top_p"], more_smooth: bool = False,
                   preset: Preset = None, progress: bool = True) -> list[int]:
        """The class ids of a call as a list, or ``ValueError`` for any argument the call would refuse (checked
        without a model, before any compute)."""
        ids = [class_ids] if isinstance(class_ids, int) and not isinstance(class_ids, bool) else class_ids
        if not isinstance(ids, list | tuple) or not ids or not all(isinstance(i, int) and not isinstance(i, bool)
                                                                   for i in ids):
            raise ValueError(f"class_ids must be an int or a non-empty list of ints, got {class_ids!r}")
        outside = [i for i in ids if not 0 <= i < NUM_CLASSES]
        if outside:
            raise ValueError(f"class id {outside[0]} is out of range: ImageNet class ids are 0..{NUM_CLASSES - 1}")
        check_seed(seed)
        check_sampling(len(ids), top_k, top_p, cfg)
        cls.check_preset(preset)
        return list(ids)

    def __call__(
        self, class_ids: int | Sequence[int], seed: int | None = 0, cfg: float = SAMPLING["cfg"],
        top_k: int = SAMPLING["top_k"], top_p: float = SAMPLING["top_p"], more_smooth: bool = False,
        preset: Preset = VarAdapter.default_preset, progress: bool = True,
    ) -> list[Image.Image]:
        """One image per ImageNet class id (repeat an id for several samples). ``top_k = 0`` / ``top_p = 0``:
        no filtering. ``preset``: a FastVAR preset name or config, or None for the unpatched model."""
        ids = self.check_call(class_ids, seed, cfg, top_k, top_p, more_smooth, preset)
        labels = torch.tensor(ids, device=self.device)
        self.apply_preset(preset)
        with self.precision(), self.working(self.transformer, self.vae):  # the model's call decodes
            images = self.transformer.autoregressive_infer_cfg(
                B=len(ids), label_B=labels, g_seed=seed, cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth,
                progress=progress)
        return to_pil(images)

    # ----------------------------------------------------------------------- command line

    @classmethod
    def add_model_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--depth", type=int, default=16,
                            help=f"blocks; official weights exist for {OFFICIAL_DEPTHS} (default: %(default)s)")
        parser.add_argument("--resolution", type=int, choices=[256, 512],
                            help="with --random-weights (default: 512 for depth 36, else 256)")
        parser.add_argument("--weights", help="VAR checkpoint file or folder (default: the cache, else the Hub)")
        parser.add_argument("--vae-weights", help="VQVAE checkpoint file or folder (default: the --weights folder, "
                                                  "the cache, else the Hub)")

    @classmethod
    def add_input_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--class", dest="classes", type=int, nargs="+", default=[207],
                            help="ImageNet class ids, 0..999 (default: %(default)s)")
        parser.add_argument("--num-samples", type=int, default=1, help="images per class (default: %(default)s)")

    @classmethod
    def add_sampling_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--cfg", type=float, default=SAMPLING["cfg"], help="guidance scale (default: %(default)s)")
        parser.add_argument("--top-k", type=int, default=SAMPLING["top_k"],
                            help="sample among the k likeliest tokens; 0: all (default: %(default)s)")
        parser.add_argument("--top-p", type=float, default=SAMPLING["top_p"],
                            help="sample within this probability mass; 0: all (default: %(default)s)")
        parser.add_argument("--more-smooth", action="store_true", help="Gumbel-softmax smoothing (visual quality)")

    @classmethod
    def model_plan(cls, args: argparse.Namespace, random: bool,
                   options: dict[str, Any]) -> tuple[list[tuple[int, int]], int]:
        if args.depth < 1:
            raise ValueError(f"--depth must be >= 1, got {args.depth}")
        if not random:
            if args.depth not in OFFICIAL_DEPTHS:
                raise ValueError(f"no official VAR of depth {args.depth} (official: {OFFICIAL_DEPTHS}); "
                                 "use --random-weights for other depths")
            if args.resolution is not None:
                raise ValueError("--resolution picks the schedule of random weights (--random-weights); an official "
                                 "VAR has its own: 512 for d36, 256 for the others")
        resolution = args.resolution or (512 if args.depth == 36 else 256)
        return [(pn, pn) for pn in (PATCH_NUMS_512 if resolution == 512 else PATCH_NUMS_256)], args.depth

    @classmethod
    def from_arguments(cls, args: argparse.Namespace, random: bool) -> VARPipeline:
        cls.model_plan(args, random, {})
        if random:
            return cls.random(args.depth, args.resolution, args.dtype, args.device)
        return cls.from_pretrained(f"var-d{args.depth}", weights=args.weights, vae_weights=args.vae_weights,
                                   dtype=args.dtype, device=args.device)

    @classmethod
    def inputs(cls, args: argparse.Namespace) -> list[int]:
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
        return [c for c in args.classes for _ in range(args.num_samples)]

    @classmethod
    def call_arguments(cls, args: argparse.Namespace) -> dict[str, Any]:
        return dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, more_smooth=args.more_smooth)

    def describe(self) -> str:
        var = self.transformer
        return f"VAR d{var.depth} {16 * var.patch_nums[-1]}px"
