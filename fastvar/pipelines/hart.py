"""HARTPipeline: prompts in, PIL images out (mit-han-lab/hart, with or without FastVAR)."""

from __future__ import annotations

import argparse
import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fastvar.adapters.hart import HartAdapter
from fastvar.hub import Checkpoint, WeightsUnavailableError, load_checkpoint, parameters_on_meta, read_state_dict
from fastvar.models.hart import HART, OFFICIAL, HARTTokenizer, build
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

HUB_REPO = "mit-han-lab/hart-0.7b-1024px"
TEXT_ENCODER = "mit-han-lab/Qwen2-VL-1.5B-Instruct"
MODELS = {"hart-0.7b": HUB_REPO}
TRANSFORMER_CONFIG = Checkpoint(HUB_REPO, "llm/config.json", "weights")
TRANSFORMER = Checkpoint(HUB_REPO, "llm/ema_model", "weights", alternatives=("llm/ema_model.bin",))  # the EMA weights
TOKENIZER_CONFIG = Checkpoint(HUB_REPO, "tokenizer/config.json", "vae_weights")
TOKENIZER = Checkpoint(HUB_REPO, "tokenizer/model", "vae_weights", alternatives=("tokenizer/pytorch_model.bin",))
SAMPLING = dict(seed=1, cfg=4.5, more_smooth=True)  # the official sample.py defaults
# The official text encoding prepends this instruction to every prompt (HART's ``llm_system_prompt``):
# a model input, reproduced exactly, since the model was trained with it.
SYSTEM_PROMPT = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for '
    "image generation.\n\nExamples:\n- User Prompt: A cat sleeping -> A small, fluffy white cat curled up in a round "
    "shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.\n- User "
    "Prompt: A busy city street -> A bustling city street scene at dusk, featuring glowing street lamps, a diverse "
    "crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.\n\nPlease "
    "generate only the enhanced description for the prompt below and DO NOT include any additional sentences. Start "
    'your response with "Enhanced Prompt:".\n\nUser Prompt:\n'
)


def read_config(path: Path, build_fn: Any, what: str) -> Any:
    """``build_fn(**fields)`` of an official ``config.json``, its refusals named after the file."""
    fields = json.loads(path.read_text())
    try:
        return build_fn(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path} ({what}): {err}") from None


def folder_of(path: str | Path | None, parameter: str) -> Path | None:
    """The folder a user-given checkpoint (``parameter``) sits in: its config.json is beside it."""
    if path is None:
        return None
    path = Path(path)
    if not path.exists():
        raise WeightsUnavailableError(f"{parameter}={path}: no such file or folder")
    return path if path.is_dir() else path.parent


class HARTPipeline(Pipeline):
    """Text-to-image HART at 1024 px: Qwen2 text encoder, transformer with its diffusion head, tokenizer.

    Half precisions run as the official scripts do: float32 weights under float16 (or bfloat16) autocast.
    The diffusion noise is drawn from a generator seeded with ``seed`` (upstream draws it from torch's
    global generator), so a seed fixes the whole image. A pipeline without a text encoder (``random``)
    encodes prompts as seeded noise.
    """

    family = "hart"
    adapter = HartAdapter
    batch_argument = "prompt"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def __init__(self, transformer: HART, text_encoder: torch.nn.Module | None = None, tokenizer: Any = None,
                 dtype: torch.dtype | str | None = torch.float32, system_prompt: str | None = SYSTEM_PROMPT):
        self.transformer = transformer.eval().requires_grad_(False)
        self.vae = transformer.vae_proxy[0]
        self.text_encoder = None if text_encoder is None else text_encoder.eval().requires_grad_(False)
        self.tokenizer, self.system_prompt = tokenizer, system_prompt
        self.dtype = self.check_dtype(dtype)

    def modules(self) -> dict[str, torch.nn.Module]:
        text = {} if self.text_encoder is None else {"text_encoder": self.text_encoder}
        return {**super().modules(), **text}

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path = "hart-0.7b", weights: str | Path | None = None,
        vae_weights: str | Path | None = None, text_encoder: str | Path = TEXT_ENCODER,
        dtype: torch.dtype | str | None = torch.float32, device: str | torch.device | None = "cpu",
        progress: bool = True,
    ) -> HARTPipeline:
        """``"hart-0.7b"`` (the Hub repo ``mit-han-lab/hart-0.7b-1024px``) or a folder holding it as
        downloaded (``llm/`` with ``config.json`` and the EMA weights ``ema_model.bin``, ``tokenizer/`` with
        ``config.json`` and its weights). ``weights``: the ``llm`` folder or its weights file; ``vae_weights``:
        the ``tokenizer`` folder or its weights file. ``text_encoder``: a Hub id or a local Qwen2 folder.
        Files not given come from the Hugging Face cache, else the Hub. Both ``config.json`` files are read,
        and option values fastvar does not implement are refused by name."""
        dtype, device = cls.check_dtype(dtype), resolve_device(device)
        transformers = transformers_module("HART", "hart")
        if str(name_or_path) in MODELS:
            folder = None
        elif Path(name_or_path).is_dir():
            folder = Path(name_or_path)
        else:
            raise ValueError(f"{name_or_path!r} is neither an official HART ({list(MODELS)}) nor a folder")
        tokenizer_config = TOKENIZER_CONFIG.find(folder_of(vae_weights, "vae_weights"), [folder])
        transformer_config = TRANSFORMER_CONFIG.find(folder_of(weights, "weights"), [folder])
        tokenizer_state = read_state_dict(TOKENIZER.find(vae_weights, [folder]))  # memory-mapped: nothing read yet
        transformer_state = read_state_dict(TRANSFORMER.find(weights, [folder]))
        text_tokenizer = load_pretrained(transformers.AutoTokenizer, text_encoder, "text_encoder")
        encoder = load_pretrained(transformers.AutoModel, text_encoder, "text_encoder")  # float32, as upstream
        with parameters_on_meta():
            tokenizer = read_config(tokenizer_config, HARTTokenizer, "the tokenizer configuration")
            model = read_config(transformer_config, lambda **fields: HART(tokenizer, **fields),
                                "the transformer configuration")
        load_checkpoint(tokenizer, tokenizer_state, device=device, progress=progress)
        load_checkpoint(model, transformer_state, device=device, progress=progress)
        return cls(model, encoder.to(device), text_tokenizer, dtype)

    @classmethod
    def random(cls, depth: int | None = None, dtype: torch.dtype | str | None = torch.float32,
               device: str | torch.device | None = "cpu", seed: int = 0) -> HARTPipeline:
        """HART-0.7B's architecture with random weights, optionally only ``depth`` of its blocks (the width is
        kept), and no text encoder: for timing and smoke tests, whose images are noise."""
        dtype, device = cls.check_dtype(dtype), resolve_device(device)
        torch.manual_seed(seed)
        with torch.device(device):
            model, _ = build(depth)
        return cls(model, dtype=dtype)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``label_B``, ``context_mask`` and ``context_position_ids`` as the official script makes them: each
        prompt padded to ``context_token`` tokens, the system prompt run before it and cut from the last
        hidden states, position ids counting the real tokens."""
        device, T = self.device, self.transformer.context_token
        if self.text_encoder is None:
            lens = [min(len(p.split()) + 1, T) for p in prompts]
            features = torch.stack([torch.randn(T, self.transformer.context_dim, generator=torch.Generator()
                                                .manual_seed(zlib.crc32(p.encode()))) for p in prompts]).to(device)
            mask = torch.arange(T, device=device)[None] < torch.tensor(lens, device=device)[:, None]
        else:
            tokens = torch.stack([self.tokenizer(p, return_tensors="pt", padding="max_length", max_length=T,
                                                 truncation=True).input_ids[0] for p in prompts]).to(device)
            mask = tokens != self.tokenizer.pad_token_id
            prefix = tokens[:, :0]
            if self.system_prompt:
                prefix = self.tokenizer(self.system_prompt, return_tensors="pt").input_ids.to(device)
                prefix = prefix.repeat(len(prompts), 1)
            hidden = self.text_encoder(torch.cat((prefix, tokens), dim=1),
                                       attention_mask=torch.cat((torch.ones_like(prefix, dtype=torch.bool), mask), 1),
                                       output_hidden_states=True).hidden_states[-1]
            features = hidden[:, prefix.shape[1]:].float()
        return dict(label_B=features, context_mask=mask, context_position_ids=mask.cumsum(dim=1) - 1)

    @classmethod
    def check_call(
        cls, prompt: str | Sequence[str], seed: int | None = SAMPLING["seed"], cfg: float = SAMPLING["cfg"],
        more_smooth: bool = SAMPLING["more_smooth"], top_p: float = 0.0, preset: Preset = None,
        progress: bool = True,
    ) -> list[str]:
        """The prompts of a call, or ``ValueError`` for any argument the call would refuse (checked without a
        model, before any compute)."""
        prompts = check_prompts(prompt)
        check_seed(seed)
        check_sampling(len(prompts), 0, top_p, cfg)
        cls.check_preset(preset)
        return prompts

    def __call__(
        self, prompt: str | Sequence[str], seed: int | None = SAMPLING["seed"], cfg: float = SAMPLING["cfg"],
        more_smooth: bool = SAMPLING["more_smooth"], top_p: float = 0.0, preset: Preset = HartAdapter.default_preset,
        progress: bool = True,
    ) -> list[Image.Image]:
        """1024 px images for the prompts (the official sampling: top-k 600 for the first 7 scales, 300 after;
        ``top_p = 0``: no top-p filtering). ``preset``: a FastVAR preset name or config, or None for the
        unpatched model."""
        prompts = self.check_call(prompt, seed, cfg, more_smooth, top_p, preset)
        self.apply_preset(preset)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        with self.precision():
            with self.working(self.text_encoder):
                text = self.encode_prompts(prompts)
            with self.working(self.transformer, self.vae):  # the model's call decodes
                images = self.transformer.autoregressive_infer_cfg(
                    B=len(prompts), g_seed=seed, cfg=cfg, top_p=top_p, more_smooth=more_smooth, generator=generator,
                    progress=progress, **text)
        return to_pil(images)

    # ----------------------------------------------------------------------- command line

    @classmethod
    def add_model_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--depth", type=int, help="with --random-weights: keep the width, cut the blocks to this "
                                                      "many (default: all)")
        parser.add_argument("--weights", help="the llm folder or its weights file (default: the cache, else the Hub)")
        parser.add_argument("--vae-weights", help="the tokenizer folder or its weights file (default: the cache, "
                                                  "else the Hub)")
        parser.add_argument("--text-encoder", help=f"Qwen2 Hub id or local folder (default: {TEXT_ENCODER})")

    @classmethod
    def add_input_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--prompt", dest="prompts", action="append",
                            help="repeatable: one image per prompt (default: 'a red fox in the snow')")

    @classmethod
    def add_sampling_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--cfg", type=float, default=SAMPLING["cfg"], help="guidance scale")
        parser.add_argument("--top-p", type=float, default=0.0, help="0: no top-p filtering")
        parser.add_argument("--more-smooth", action=argparse.BooleanOptionalAction, default=SAMPLING["more_smooth"],
                            help="Gumbel-softmax smoothing of the token maps")

    @classmethod
    def model_plan(cls, args: argparse.Namespace, random: bool,
                   options: dict[str, Any]) -> tuple[list[tuple[int, int]], int]:
        depth = cut_depth(args, random, OFFICIAL["depth"], "HART-0.7B")
        maps = [(pn, pn) for pn in OFFICIAL["patch_nums"][1:]]  # scale 0 is the text, in place of the 1x1 map
        return [(1, OFFICIAL["context_token"]), *maps], depth

    @classmethod
    def from_arguments(cls, args: argparse.Namespace, random: bool) -> HARTPipeline:
        cls.model_plan(args, random, {})
        if random:
            return cls.random(args.depth, args.dtype, args.device)
        return cls.from_pretrained("hart-0.7b", weights=args.weights, vae_weights=args.vae_weights,
                                   text_encoder=args.text_encoder or TEXT_ENCODER, dtype=args.dtype,
                                   device=args.device)

    @classmethod
    def inputs(cls, args: argparse.Namespace) -> list[str]:
        return args.prompts or ["a red fox in the snow"]

    @classmethod
    def call_arguments(cls, args: argparse.Namespace) -> dict[str, Any]:
        return dict(cfg=args.cfg, top_p=args.top_p,
                    more_smooth=args.more_smooth)

    def describe(self) -> str:
        model = self.transformer
        return f"HART width {model.C}, {model.depth} blocks, {len(model.patch_nums)} scales"
