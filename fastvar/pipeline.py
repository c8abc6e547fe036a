"""InfinityPipeline: prompts in, PIL images out, with or without FastVAR."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import fastvar
from fastvar.config import FastVARConfig
from fastvar.hub import fetch_sharded_state_dict, fetch_state_dict, load_checkpoint
from fastvar.models.bsq_vae import BSQVAE, DERIVED_BUFFERS
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

HUB_REPO = "FoundationVision/Infinity"
TEXT_ENCODER = "google/flan-t5-xl"


def _transformers():
    try:
        import transformers
    except ImportError as err:  # an optional dependency: pip install fastvar-torch[infinity]
        raise ImportError("InfinityPipeline needs transformers: pip install 'fastvar-torch[infinity]'") from err
    return transformers


def _schedules() -> dict[tuple[int, int], list[tuple[int, int, int]]]:
    """(width, height) -> schedule, for every template and size (the extended ones included)."""
    sizes = [*SIZES, "extended"]
    schedules = [scale_schedule(ratio, size) for ratio in TEMPLATE_SCALES for size in sizes
                 if size != "extended" or ratio in EXTENDED_SCALE]
    return {(s[-1][2] * VAE_STRIDE, s[-1][1] * VAE_STRIDE): s for s in schedules}


def supported_sizes() -> list[tuple[int, int]]:
    """Every (width, height) a schedule produces."""
    return sorted(_schedules())


def schedule_for(width: int, height: int) -> list[tuple[int, int, int]]:
    """The schedule producing exactly ``width`` x ``height``; ``ValueError`` listing them otherwise."""
    schedule = _schedules().get((width, height))
    if schedule is None:
        listing = ", ".join(f"{w}x{h}" for w, h in supported_sizes())
        raise ValueError(f"unsupported size {width}x{height}; supported (width x height): {listing}")
    return schedule


def schedule_for_ratio(h_div_w: float, pixels: str = "1M") -> list[tuple[int, int, int]]:
    """The schedule of the template matching ``h_div_w`` (within 2%); ``ValueError`` listing them otherwise."""
    template = nearest_template(h_div_w)
    if abs(template - h_div_w) > 0.02 * template:
        raise ValueError(f"unsupported aspect ratio (height / width) {h_div_w}; supported: {sorted(TEMPLATE_SCALES)}")
    return scale_schedule(template, pixels)


class InfinityPipeline:
    """Text encoder (flan-T5 through transformers), Infinity transformer and BSQ-VAE decoder."""

    def __init__(self, transformer: Infinity, vae: BSQVAE, text_encoder: torch.nn.Module, tokenizer):
        self.transformer, self.vae = transformer.eval(), vae.eval()
        self.text_encoder, self.tokenizer = text_encoder.eval(), tokenizer

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "infinity-2b", text_encoder: str | Path = TEXT_ENCODER,
                        device: str | torch.device = "cpu") -> InfinityPipeline:
        """``"infinity-2b"``: the official weights from the Hub repo FoundationVision/Infinity and the
        flan-T5-XL encoder; or a directory written by ``save_pretrained``."""
        tf = _transformers()
        path = Path(name_or_path)
        if str(name_or_path) in OFFICIAL:
            _, _, transformer_file, vae_file = OFFICIAL[str(name_or_path)]
            vae_state = fetch_state_dict(HUB_REPO, vae_file, wrapper_keys=("vae",))
            if transformer_file.endswith("/"):  # Infinity-8B: a folder of shards
                transformer_state = fetch_sharded_state_dict(HUB_REPO, transformer_file.rstrip("/"))
            else:
                transformer_state = fetch_state_dict(HUB_REPO, transformer_file, wrapper_keys=("trainer", "gpt_fsdp"))
            transformer, vae = build(str(name_or_path))
            load_checkpoint(vae, vae.adapt_state_dict(vae_state), DERIVED_BUFFERS)
            load_checkpoint(transformer, transformer_state)
            encoder_path = text_encoder
        elif path.is_dir() and (path / "fastvar_infinity.json").is_file():
            config = json.loads((path / "fastvar_infinity.json").read_text())
            vae = BSQVAE(**config["vae"])
            transformer = Infinity(vae, **config["transformer"])
            load_checkpoint(vae, fetch_state_dict(HUB_REPO, "vae", path))
            load_checkpoint(transformer, fetch_state_dict(HUB_REPO, "transformer", path))
            encoder_path = path / "text_encoder"
        else:
            raise ValueError(f"{name_or_path!r} is neither an official model ({list(OFFICIAL)}) nor a directory "
                             "written by InfinityPipeline.save_pretrained")
        tokenizer = tf.AutoTokenizer.from_pretrained(encoder_path)
        encoder = tf.T5EncoderModel.from_pretrained(encoder_path)
        return cls(transformer, vae, encoder, tokenizer).to(device)

    def save_pretrained(self, path: str | Path) -> None:
        """Write a directory ``from_pretrained`` reads back (weights as safetensors)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"transformer": self.transformer.config, "vae": self.vae.config}
        (path / "fastvar_infinity.json").write_text(json.dumps(config))
        for name, module in (("transformer", self.transformer), ("vae", self.vae)):
            state = {k: v.clone().contiguous() for k, v in module.state_dict().items()}  # the VAE shares a buffer
            save_file(state, path / f"{name}.safetensors")
        self.text_encoder.save_pretrained(path / "text_encoder")
        self.tokenizer.save_pretrained(path / "text_encoder")

    def to(self, device: str | torch.device) -> InfinityPipeline:
        for module in (self.transformer, self.vae, self.text_encoder):
            module.to(device)
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, list[int], torch.Tensor, int]:
        """The packed text input: (kv_compact, lens, cu_seqlens_k, max_seqlen_k), as the official script."""
        device = self.transformer.pos_start.device
        tokens = self.tokenizer(list(prompts), max_length=512, padding=True, truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(device)
        features = self.text_encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask)
        features = features["last_hidden_state"].float()
        lens = mask.sum(dim=-1).tolist()
        kv_compact = torch.cat([f[:n] for f, n in zip(features, lens)])
        cu_seqlens_k = F.pad(mask.sum(dim=-1).to(torch.int32).cumsum(0), (1, 0)).to(torch.int32)
        return kv_compact, lens, cu_seqlens_k, max(lens)

    @torch.no_grad()
    def __call__(
        self, prompt: str | Sequence[str], seed: int | None = 0, cfg: float = 3.0, tau: float = 0.5,
        size: tuple[int, int] | None = (1024, 1024), aspect_ratio: float | None = None, pixels: str = "1M",
        preset: FastVARConfig | str | None = "paper", top_k: int = 900, top_p: float = 0.97, progress: bool = True,
    ) -> list[Image.Image]:
        """Images for the prompts, of ``size`` (width, height), or of ``aspect_ratio`` (height / width) at
        the pixel budget ``pixels`` ('0.06M', '0.25M', '0.60M', '1M', 'extended'). ``preset``: a FastVAR
        preset name or config, or None to run the model unpatched."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise ValueError(f"prompt must be a non-empty string or a non-empty list of them, got {prompt!r}")
        schedule = schedule_for(*size) if aspect_ratio is None else schedule_for_ratio(aspect_ratio, pixels)
        if preset is None:
            if fastvar.is_patched(self.transformer):
                fastvar.unpatch(self.transformer)
        else:
            fastvar.patch(self.transformer, preset)
        K = len(schedule)
        _, _, summed_codes = self.transformer.autoregressive_infer_cfg(
            self.vae, schedule, self.encode_prompts(prompts), B=len(prompts), g_seed=seed, cfg_list=[cfg] * K,
            tau_list=[tau] * K, top_k=top_k, top_p=top_p, cfg_insertion_layer=[0],
            vae_type=self.vae.codebook_dim, progress=progress,
        )
        images = self.vae.decode(summed_codes).add(1).div(2)
        pixels = images.mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(p) for p in pixels]
