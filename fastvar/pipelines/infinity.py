"""InfinityPipeline: prompts in, PIL images out (FoundationVision/Infinity, with or without FastVAR)."""

from __future__ import annotations

import argparse
import math
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from fastvar.adapters.infinity import InfinityAdapter
from fastvar.hub import Checkpoint, load_checkpoint, parameters_on_meta, read_state_dict
from fastvar.models.bsq_vae import BSQVAE
from fastvar.models.infinity import (
    EXTENDED_SCALE,
    OFFICIAL,
    SIZES,
    TEMPLATE_SCALES,
    VAE_STRIDE,
    Infinity,
    build,
    nearest_template,
    scale_schedule,
)
from fastvar.models.sampling import check_sampling, check_seed
from fastvar.pipelines.base import (
    Pipeline,
    Preset,
    check_prompts,
    cut_depth,
    load_pretrained,
    resolve_device,
    to_pil,
    transformers_module,
)

HUB_REPO = "FoundationVision/Infinity"
TEXT_ENCODER = "google/flan-t5-xl"
CHECKPOINTS = {  # the files of the official release: transformer, VAE
    "infinity-2b": (Checkpoint(HUB_REPO, "infinity_2b_reg", "weights"),
                    Checkpoint(HUB_REPO, "infinity_vae_d32reg", "vae_weights")),
    "infinity-8b": (Checkpoint(HUB_REPO, "infinity_8b_weights/", "weights"),  # a folder of shards
                    Checkpoint(HUB_REPO, "infinity_vae_d56_f8_14_patchify", "vae_weights")),
}
TEXT_TOKENS = 512  # the official tokenizer's max_length


# ----------------------------------------------------------------------------- sizes


def _schedules() -> dict[tuple[int, int], list[tuple[int, int, int]]]:
    """(width, height) -> schedule, for every template and size (the extended ones included)."""
    sizes = [*SIZES, "extended"]
    schedules = [scale_schedule(ratio, size) for ratio in TEMPLATE_SCALES for size in sizes
                 if size != "extended" or ratio in EXTENDED_SCALE]
    return {(s[-1][2] * VAE_STRIDE, s[-1][1] * VAE_STRIDE): s for s in schedules}


def supported_sizes() -> list[tuple[int, int]]:
    """Every (width, height) a schedule produces."""
    return sorted(_schedules())


def parse_size(size: object) -> tuple[int, int]:
    """(width, height) from a pair of ints or a 'WIDTHxHEIGHT' string."""
    if isinstance(size, str):
        parts = size.lower().split("x")
        if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            return int(parts[0]), int(parts[1])
    elif isinstance(size, list | tuple) and len(size) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in size):
        return size[0], size[1]
    raise ValueError(f"size must be (width, height) or 'WIDTHxHEIGHT' such as '1024x1024', got {size!r}")


def schedule_for(width: int, height: int) -> list[tuple[int, int, int]]:
    """The schedule producing exactly ``width`` x ``height``; ``ValueError`` naming the nearest otherwise."""
    schedule = _schedules().get((width, height))
    if schedule is None:
        def distance(wh: tuple[int, int]) -> float:
            return abs(math.log(wh[0] / wh[1] * height / width)) + abs(math.log(wh[0] * wh[1] / (width * height)))

        nearest = ", ".join(f"{w}x{h}" for w, h in sorted(supported_sizes(), key=distance)[:3])
        raise ValueError(f"unsupported size {width}x{height} (width x height); nearest supported: {nearest} "
                         "(all: fastvar.pipelines.infinity.supported_sizes())")
    return schedule


def schedule_for_ratio(h_div_w: object, pixels: str = "1M") -> list[tuple[int, int, int]]:
    """The schedule of the template matching ``h_div_w`` (within 2%); ``ValueError`` listing them otherwise."""
    if not isinstance(h_div_w, int | float) or isinstance(h_div_w, bool) or not math.isfinite(h_div_w) or h_div_w <= 0:
        raise ValueError(f"aspect_ratio must be a positive number (height / width), got {h_div_w!r}")
    if pixels not in (*SIZES, "extended"):
        raise ValueError(f"unknown pixel budget {pixels!r}; supported: {[*SIZES, 'extended']}")
    template = nearest_template(h_div_w)
    if abs(template - h_div_w) > 0.02 * template:
        raise ValueError(f"unsupported aspect ratio (height / width) {h_div_w}; supported: {sorted(TEMPLATE_SCALES)}")
    return scale_schedule(template, pixels)


def pick_schedule(size: object, aspect_ratio: object, pixels: str) -> list[tuple[int, int, int]]:
    if size is not None and aspect_ratio is not None:
        raise ValueError("give size or aspect_ratio (with pixels), not both")
    if aspect_ratio is not None:
        return schedule_for_ratio(aspect_ratio, pixels)
    return schedule_for(*parse_size((1024, 1024) if size is None else size))


# ----------------------------------------------------------------------------- the pipeline


class InfinityPipeline(Pipeline):
    """Text-to-image Infinity: flan-T5 text encoder (through transformers), transformer, BSQ-VAE decoder.

    In bfloat16 the transformer blocks are stored in bfloat16 and everything runs under bfloat16
    autocast, with the rest of the weights in float32 and the text encoder in float16, as the official
    inference does. A pipeline without a text encoder (``random``) encodes prompts as seeded noise.
    """

    family = "infinity"
    adapter = InfinityAdapter
    batch_argument = "prompt"
    dtypes = (torch.float32, torch.bfloat16)

    def __init__(self, transformer: Infinity, vae: BSQVAE, text_encoder: torch.nn.Module | None = None,
                 tokenizer: Any = None, dtype: torch.dtype | str | None = torch.float32):
        self.transformer = transformer.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = None if text_encoder is None else text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.dtype = self.check_dtype(dtype)

    def modules(self) -> dict[str, torch.nn.Module]:
        text = {} if self.text_encoder is None else {"text_encoder": self.text_encoder}
        return {**super().modules(), **text}

    @classmethod
    def _build(cls, name: str, depth: int | None, dtype: torch.dtype) -> tuple[Infinity, BSQVAE]:
        model, vae = build(name, depth)
        if dtype != torch.float32:
            for block in model.unregistered_blocks:
                block.to(dtype)
        return model, vae

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path = "infinity-2b", weights: str | Path | None = None,
        vae_weights: str | Path | None = None, text_encoder: str | Path = TEXT_ENCODER,
        dtype: torch.dtype | str | None = torch.float32, device: str | torch.device | None = "cpu",
        progress: bool = True,
    ) -> InfinityPipeline:
        """An official model (``"infinity-2b"``, ``"infinity-8b"``) or a folder holding one as downloaded
        (``infinity_2b_reg.pth`` + ``infinity_vae_d32reg.pth``, or the 8B shard folder + its VAE).
        ``weights`` / ``vae_weights``: checkpoint files or folders (the 8B: its shard folder); a ``weights``
        folder is searched for the VAE too. ``text_encoder``: a Hub id or a local flan-T5 folder. Files not
        given come from the Hugging Face cache, else the Hub."""
        dtype, device = cls.check_dtype(dtype), resolve_device(device)
        transformers = transformers_module("Infinity", "infinity")
        folder, name = None, str(name_or_path)
        if name not in CHECKPOINTS:
            folder = Path(name_or_path)
            if not folder.is_dir():
                raise ValueError(f"{name_or_path!r} is neither an official Infinity ({list(CHECKPOINTS)}) nor a folder")
            name = next((n for n, (t, _) in CHECKPOINTS.items() if t.in_folder(folder)), None)
            if name is None:
                expected = [t.files[0] for t, _ in CHECKPOINTS.values()]
                raise ValueError(f"{folder} holds no official Infinity transformer (one of {expected}); name the "
                                 f"model instead, e.g. InfinityPipeline.from_pretrained('infinity-2b', weights=...)")
        transformer_file, vae_file = CHECKPOINTS[name]
        search = [folder, weights if weights is not None and Path(weights).is_dir() else None]
        transformer_path = transformer_file.find(weights, [folder])
        vae_path = vae_file.find(vae_weights, search)
        vae_state = read_state_dict(vae_path, ("vae",))  # memory-mapped: nothing is read yet
        transformer_state = read_state_dict(transformer_path, ("trainer", "gpt_fsdp"))
        tokenizer = load_pretrained(transformers.AutoTokenizer, text_encoder, "text_encoder")
        half = torch.float16 if dtype != torch.float32 else torch.float32  # the official T5 precision
        encoder = load_pretrained(transformers.T5EncoderModel, text_encoder, "text_encoder", torch_dtype=half)
        with parameters_on_meta():
            model, vae = cls._build(name, None, dtype)
        load_checkpoint(vae, vae_state, device=device, progress=progress)
        load_checkpoint(model, transformer_state, device=device, progress=progress)
        return cls(model, vae, encoder.to(device), tokenizer, dtype)

    @classmethod
    def random(cls, name: str = "infinity-2b", depth: int | None = None,
               dtype: torch.dtype | str | None = torch.float32, device: str | torch.device | None = "cpu",
               seed: int = 0) -> InfinityPipeline:
        """The official architecture ``name`` with random weights, optionally only ``depth`` of its blocks (the
        width is kept), and no text encoder: for timing and smoke tests, whose images are noise."""
        dtype, device = cls.check_dtype(dtype), resolve_device(device)
        torch.manual_seed(seed)
        with torch.device(device):
            model, vae = cls._build(name, depth, dtype)
            for p in model.parameters():  # small, so that activations stay finite at any depth
                torch.nn.init.normal_(p, std=0.02)
        return cls(model, vae, dtype=dtype)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, list[int], torch.Tensor, int]:
        """The packed text input (kv_compact, lens, cu_seqlens_k, max_seqlen_k), as the official script."""
        device = self.device
        if self.text_encoder is None:
            lens = [min(len(p.split()) + 1, TEXT_TOKENS) for p in prompts]  # words and the end token
            features = [torch.randn(n, self.transformer.Ct5, generator=torch.Generator().manual_seed(
                zlib.crc32(p.encode()))) for p, n in zip(prompts, lens)]
            kv_compact = torch.cat(features).to(device)
        else:
            tokens = self.tokenizer(list(prompts), max_length=TEXT_TOKENS, padding=True, truncation=True,
                                    return_tensors="pt")
            mask = tokens.attention_mask.to(device)
            hidden = self.text_encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask)
            features = hidden["last_hidden_state"].float()
            lens = mask.sum(dim=-1).tolist()
            kv_compact = torch.cat([f[:n] for f, n in zip(features, lens)])
        cu_seqlens_k = F.pad(torch.tensor(lens, device=device).cumsum(0), (1, 0)).to(torch.int32)
        return kv_compact, lens, cu_seqlens_k, max(lens)

    @classmethod
    def check_call(
        cls, prompt: str | Sequence[str], seed: int | None = 0, cfg: float = 3.0, tau: float = 0.5,
        size: tuple[int, int] | str | None = None, aspect_ratio: float | None = None, pixels: str = "1M",
        negative_prompt: str | Sequence[str] | None = None, top_k: int = 900, top_p: float = 0.97,
        preset: Preset = None, progress: bool = True,
    ) -> tuple[list[str], list[str] | None, list[tuple[int, int, int]]]:
        """The prompts, negative prompts and scale schedule of a call, or ``ValueError`` for any argument the
        call would refuse (checked without a model, before any compute)."""
        prompts = check_prompts(prompt)
        negatives = None if negative_prompt is None else check_prompts(negative_prompt, "negative_prompt",
                                                                       len(prompts))
        schedule = pick_schedule(size, aspect_ratio, pixels)
        check_seed(seed)
        check_sampling(len(prompts), top_k, top_p, cfg, tau)
        cls.check_preset(preset)
        return prompts, negatives, schedule

    def __call__(
        self, prompt: str | Sequence[str], seed: int | None = 0, cfg: float = 3.0, tau: float = 0.5,
        size: tuple[int, int] | str | None = None, aspect_ratio: float | None = None, pixels: str = "1M",
        negative_prompt: str | Sequence[str] | None = None, top_k: int = 900, top_p: float = 0.97,
        preset: Preset = InfinityAdapter.default_preset, progress: bool = True,
    ) -> list[Image.Image]:
        """Images for the prompts, of ``size`` (width, height) or 'WxH' (default 1024x1024), or of
        ``aspect_ratio`` (height / width) at the pixel budget ``pixels`` ('0.06M', '0.25M', '0.60M', '1M',
        'extended'). ``negative_prompt`` replaces the learned null text of guidance. ``top_k = 0`` /
        ``top_p = 0``: no filtering. ``preset``: a FastVAR preset name or config, or None for the unpatched
        model."""
        prompts, negatives, schedule = self.check_call(prompt, seed, cfg, tau, size, aspect_ratio, pixels,
                                                       negative_prompt, top_k, top_p, preset)
        K = len(schedule)
        self.apply_preset(preset)
        with self.precision():
            with self.working(self.text_encoder):
                text = self.encode_prompts(prompts)
                negative = None if negatives is None else self.encode_prompts(negatives)
            with self.working(self.transformer, self.vae.quantizer):  # which turns bits into codes
                _, _, summed_codes = self.transformer.autoregressive_infer_cfg(
                    self.vae, schedule, text, B=len(prompts), negative_label_B_or_BLT=negative, g_seed=seed,
                    cfg_list=[cfg] * K, tau_list=[tau] * K, top_k=top_k, top_p=top_p, cfg_insertion_layer=[0],
                    vae_type=self.vae.codebook_dim, progress=progress)
            with self.working(self.vae), tqdm(total=1, desc="decoding", disable=not progress, leave=False) as bar:
                images = self.vae.decode(summed_codes).add(1).div(2)
                bar.update()
        return to_pil(images)

    # ----------------------------------------------------------------------- command line

    @classmethod
    def add_model_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", default="2b", choices=[n.removeprefix("infinity-") for n in CHECKPOINTS],
                            help="official model (default: %(default)s)")
        parser.add_argument("--depth", type=int, help="with --random-weights: keep the width, cut the blocks to this "
                                                      "many (default: all)")
        parser.add_argument("--weights", help="transformer checkpoint file or folder (8B: its shard folder; "
                                              "default: the cache, else the Hub)")
        parser.add_argument("--vae-weights", help="VAE checkpoint file or folder (default: the --weights folder, the "
                                                  "cache, else the Hub)")
        parser.add_argument("--text-encoder", help=f"flan-T5 Hub id or local folder (default: {TEXT_ENCODER})")

    @classmethod
    def add_input_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--prompt", dest="prompts", action="append",
                            help="repeatable: one image per prompt (default: 'a red fox in the snow')")

    @classmethod
    def add_sampling_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--negative-prompt", help="replaces the learned null text of guidance")
        parser.add_argument("--size", help="WIDTHxHEIGHT of an official schedule (default: 1024x1024)")
        parser.add_argument("--aspect-ratio", type=float, help="height / width, instead of --size")
        parser.add_argument("--pixels", default="1M", choices=[*SIZES, "extended"],
                            help="pixel budget with --aspect-ratio (default: %(default)s)")
        parser.add_argument("--cfg", type=float, default=3.0, help="guidance scale (default: %(default)s)")
        parser.add_argument("--tau", type=float, default=0.5, help="sampling temperature (default: %(default)s)")
        parser.add_argument("--top-k", type=int, default=900, help="0: no top-k filtering (default: %(default)s)")
        parser.add_argument("--top-p", type=float, default=0.97, help="0: no top-p filtering (default: %(default)s)")

    @classmethod
    def model_plan(cls, args: argparse.Namespace, random: bool,
                   options: dict[str, Any]) -> tuple[list[tuple[int, int]], int]:
        name = f"infinity-{args.model}"
        depth = cut_depth(args, random, OFFICIAL[name][0]["depth"], name)
        schedule = pick_schedule(options.get("size"), options.get("aspect_ratio"), options.get("pixels", "1M"))
        return [(h, w) for _, h, w in schedule], depth

    @classmethod
    def from_arguments(cls, args: argparse.Namespace, random: bool) -> InfinityPipeline:
        cls.model_plan(args, random, {})
        name = f"infinity-{args.model}"
        if random:
            return cls.random(name, args.depth, args.dtype, args.device)
        return cls.from_pretrained(name, weights=args.weights, vae_weights=args.vae_weights,
                                   text_encoder=args.text_encoder or TEXT_ENCODER, dtype=args.dtype,
                                   device=args.device)

    @classmethod
    def inputs(cls, args: argparse.Namespace) -> list[str]:
        return args.prompts or ["a red fox in the snow"]

    @classmethod
    def call_arguments(cls, args: argparse.Namespace) -> dict[str, Any]:
        return dict(negative_prompt=args.negative_prompt,
                    size=args.size, aspect_ratio=args.aspect_ratio, pixels=args.pixels, cfg=args.cfg, tau=args.tau,
                    top_k=args.top_k, top_p=args.top_p)

    def describe(self) -> str:
        model = self.transformer
        return f"Infinity width {model.C}, {len(model.unregistered_blocks)} blocks"
