"""InfinityStarPipeline: prompts in, videos (lists of PIL frames) out (FoundationVision/InfinityStar, with or
without FastVAR)."""

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

from fastvar.adapters.infinitystar import InfinityStarAdapter
from fastvar.hub import Checkpoint, load_checkpoint, parameters_on_meta, read_state_dict
from fastvar.models.infinitystar import (
    ARCHITECTURE,
    OFFICIAL,
    SAMPLING,
    TEMPLATE_SCALES,
    VAE_STRIDE,
    InfinityStar,
    Scale,
    nearest_template,
    scale_schedule,
    scales_per_clip,
)
from fastvar.models.infinitystar import build as build_transformer
from fastvar.models.sampling import check_sampling, check_seed
from fastvar.models.video_vae import VideoVAE
from fastvar.pipelines.base import (
    Pipeline,
    Preset,
    check_prompts,
    cut_depth,
    load_pretrained,
    resolve_device,
    transformers_module,
)
from fastvar.pipelines.infinity import parse_size

HUB_REPO = "FoundationVision/InfinityStar"
TRANSFORMERS = {  # the official transformers: folders of shards with a transformers index
    "infinitystar-8b-720p": Checkpoint(HUB_REPO, "infinitystar_8b_720p_weights/", "weights"),
    "infinitystar-8b-480p": Checkpoint(HUB_REPO, "infinitystar_8b_480p_weights/", "weights"),
}
VAE = Checkpoint(HUB_REPO, "infinitystar_videovae", "vae_weights")  # shared by both
TEXT_ENCODER = "google/flan-t5-xl"
TEXT_ENCODER_FOLDER = "text_encoder/flan-t5-xl-official"  # where the official scripts keep flan-T5-XL
TEXT_TOKENS = 512  # the official tokenizer pads every prompt to this length
ASPECT_RATIO = 0.571  # height / width of the official scripts: 16:9 landscape, the 0.562 template
PROMPT_SUFFIX = ", Close-up on big objects, emphasize scale and detail"  # the official scripts add it to every prompt


def build(depth: int | None = None) -> tuple[InfinityStar, VideoVAE]:
    """The official transformer (both checkpoints share it; ``depth`` keeps the width and cuts the blocks) and
    video VAE, with random weights."""
    return build_transformer(depth), VideoVAE()


# ----------------------------------------------------------------------------- what a call makes


def official_prompt(prompt: str, duration: int, suffix: str = PROMPT_SUFFIX) -> str:
    """The text the official scripts encode: the prompt, ``suffix``, and before a video's the duration tag
    ``<<<t=5s>>>`` (training tagged every video caption with its duration, and no image caption)."""
    text = f"{prompt}{suffix}"
    return f"<<<t={duration}s>>>{text}" if duration > 0 else text


def check_name(name: str) -> str:
    if name not in OFFICIAL:
        raise ValueError(f"unknown InfinityStar {name!r}; the official ones: {list(OFFICIAL)}")
    return name


def durations_text(name: str) -> str:
    """What the official model ``name`` makes, for errors."""
    *most, last = [str(d) for d in OFFICIAL[name].durations]
    return f"{name} makes {', '.join(most)} or {last} seconds (0: an image)"


def sizes(names: Sequence[str]) -> dict[tuple[int, int], float]:
    """(width, height) -> aspect-ratio template, of every template at the pixel budget of each model."""
    return {(s[-1][2] * VAE_STRIDE, s[-1][1] * VAE_STRIDE): template for name in names for template in TEMPLATE_SCALES
            for s in [scale_schedule(template, OFFICIAL[name].size, 0)]}


def supported_sizes(name: str) -> list[tuple[int, int]]:
    """Every (width, height) the official model ``name`` generates."""
    return sorted(sizes([name]))


def template_for(names: Sequence[str], size: object, aspect_ratio: object) -> float:
    """The aspect-ratio template (height / width) of ``size`` ('WIDTHxHEIGHT' or (width, height), made by one of
    the models ``names``) or of ``aspect_ratio`` (within 2% of a template); the official 16:9 when neither is
    given. ``ValueError`` naming the nearest supported sizes, or the templates."""
    if size is not None and aspect_ratio is not None:
        raise ValueError("give size or aspect_ratio, not both")
    if size is not None:
        width, height = parse_size(size)
        known = sizes(names)
        if (width, height) not in known:
            def distance(wh: tuple[int, int]) -> float:
                return abs(math.log(wh[0] / wh[1] * height / width)) + abs(math.log(wh[0] * wh[1] / (width * height)))

            nearest = ", ".join(f"{w}x{h}" for w, h in sorted(known, key=distance)[:3])
            raise ValueError(f"unsupported size {width}x{height} (width x height) for {' or '.join(names)}; nearest "
                             f"supported: {nearest} (all: fastvar.pipelines.infinitystar.supported_sizes(name))")
        return known[(width, height)]
    h_div_w = ASPECT_RATIO if aspect_ratio is None else aspect_ratio
    if not isinstance(h_div_w, int | float) or isinstance(h_div_w, bool) or not math.isfinite(h_div_w) or h_div_w <= 0:
        raise ValueError(f"aspect_ratio must be a positive number (height / width), got {h_div_w!r}")
    template = nearest_template(h_div_w)
    if abs(template - h_div_w) > 0.02 * template:
        raise ValueError(f"unsupported aspect ratio (height / width) {h_div_w}; supported: {sorted(TEMPLATE_SCALES)}")
    return template


def plan(names: Sequence[str], duration: object, size: object, aspect_ratio: object) -> list[Scale]:
    """The scale schedule of a call to the first of the official models ``names`` that makes ``duration``
    seconds at ``size`` / ``aspect_ratio``; ``ValueError`` saying what each model makes otherwise."""
    if not isinstance(duration, int) or isinstance(duration, bool) or duration < 0:
        raise ValueError(f"duration = {duration!r}: must be a whole number of seconds >= 0 (0: an image)")
    makers = [name for name in names if duration in OFFICIAL[name].durations]
    if not makers:
        raise ValueError(f"duration = {duration}: " + "; ".join(durations_text(name) for name in names))
    template = template_for(makers, size, aspect_ratio)
    if size is not None:
        makers = [name for name in makers if parse_size(size) in sizes([name])]
    return scale_schedule(template, OFFICIAL[makers[0]].size, duration)


def to_clips(frames: torch.Tensor) -> list[list[Image.Image]]:
    """Decoded frames (B, 3, T, H, W), RGB about [-1, 1], turned into pixels as upstream's
    ``summed_codes2images`` does, in the dtype the decoder returned: (x + 1) / 2 clamped to [0, 1], times 255,
    truncated to uint8. In a video, frame 0 is then overwritten by frame 1, as upstream does; an image keeps its
    one frame (upstream's copy fails there)."""
    pixels = frames.add(1).div(2).clamp(0, 1).mul(255).to(torch.uint8).permute(0, 2, 3, 4, 1)  # (B, T, H, W, 3)
    if pixels.shape[1] > 1:
        pixels[:, 0] = pixels[:, 1]
    return [[Image.fromarray(frame) for frame in clip] for clip in pixels.cpu().numpy()]


# ----------------------------------------------------------------------------- the pipeline


class InfinityStarPipeline(Pipeline):
    """Text-to-video and text-to-image InfinityStar-8B: flan-T5 text encoder, transformer, video VAE decoder.

    Outputs are clips: one list of PIL frames per prompt (16 fps; an image is a list of one). In bfloat16 the
    transformer blocks are stored in bfloat16 and everything runs under bfloat16 autocast, with the rest of the
    weights in float32 and the text encoder in float16, as the official inference does. ``seed`` seeds every
    row alike (an int) or each row (a list): either way each row is what its prompt gives alone with its seed.
    A pipeline without a text encoder (``random``) encodes prompts as seeded noise.
    """

    family = "infinitystar"
    adapter = InfinityStarAdapter
    batch_argument = "prompt"
    dtypes = (torch.float32, torch.bfloat16)
    seed_per_row = True  # one seed per row, each row its prompt alone (fastvar.sample seeds each video)

    def __init__(self, transformer: InfinityStar, vae: VideoVAE, text_encoder: torch.nn.Module | None = None,
                 tokenizer: Any = None, name: str = "infinitystar-8b-720p",
                 dtype: torch.dtype | str | None = torch.float32):
        self.transformer = transformer.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = None if text_encoder is None else text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = check_name(name)  # the checkpoint the weights are: its sizes, durations and repetitions
        self.dtype = self.check_dtype(dtype)

    def modules(self) -> dict[str, torch.nn.Module]:
        text = {} if self.text_encoder is None else {"text_encoder": self.text_encoder}
        return {**super().modules(), **text}

    @classmethod
    def _build(cls, depth: int | None, dtype: torch.dtype) -> tuple[InfinityStar, VideoVAE]:
        model, vae = build(depth)
        if dtype != torch.float32:
            for block in model.unregistered_blocks:
                block.to(dtype)
        return model, vae

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path = "infinitystar-8b-720p", weights: str | Path | None = None,
        vae_weights: str | Path | None = None, text_encoder: str | Path | None = None,
        dtype: torch.dtype | str | None = torch.float32, device: str | torch.device | None = "cpu",
        progress: bool = True,
    ) -> InfinityStarPipeline:
        """An official model (``"infinitystar-8b-720p"``, ``"infinitystar-8b-480p"``) or a folder holding one as
        downloaded (its shard folder ``infinitystar_8b_720p_weights/`` or ``infinitystar_8b_480p_weights/``,
        ``infinitystar_videovae.pth``, and optionally ``text_encoder/flan-t5-xl-official/``). ``weights``: the
        shard folder (or a folder holding it, searched for the VAE and text encoder too); ``vae_weights``: the
        VAE file or its folder; ``text_encoder``: a Hub id or a local flan-T5 folder (default: the one beside
        the weights, else google/flan-t5-xl). Files not given come from the Hugging Face cache, else the Hub."""
        dtype, device = cls.check_dtype(dtype), resolve_device(device)
        transformers = transformers_module("InfinityStar", "infinitystar")
        folder, name = None, str(name_or_path)
        if name not in TRANSFORMERS:
            folder = Path(name_or_path)
            if not folder.is_dir():
                raise ValueError(f"{name_or_path!r} is neither an official InfinityStar ({list(TRANSFORMERS)}) nor "
                                 "a folder")
            held = [n for n, t in TRANSFORMERS.items() if t.in_folder(folder)]
            if len(held) != 1:
                what = "both official transformers" if held else \
                    f"no official InfinityStar transformer (one of {[t.files[0] for t in TRANSFORMERS.values()]})"
                raise ValueError(f"{folder} holds {what}; name the model instead, e.g. InfinityStarPipeline"
                                 f".from_pretrained('infinitystar-8b-480p', weights={str(folder)!r})")
            name = held[0]
        search = [folder, weights if weights is not None and Path(weights).is_dir() else None]
        transformer_path = TRANSFORMERS[name].find(weights, [folder])
        vae_path = VAE.find(vae_weights, search)
        if text_encoder is None:
            text_encoder = next((Path(f) / TEXT_ENCODER_FOLDER for f in search
                                 if f is not None and (Path(f) / TEXT_ENCODER_FOLDER).is_dir()), TEXT_ENCODER)
        vae_state = read_state_dict(vae_path, ("vae",))  # memory-mapped: nothing is read yet
        transformer_state = read_state_dict(transformer_path)
        tokenizer = load_pretrained(transformers.AutoTokenizer, text_encoder, "text_encoder")
        half = torch.float16 if dtype != torch.float32 else torch.float32  # the official T5 precision
        encoder = load_pretrained(transformers.T5EncoderModel, text_encoder, "text_encoder", torch_dtype=half)
        with parameters_on_meta():
            model, vae = cls._build(None, dtype)
        load_checkpoint(vae, vae_state, device=device, progress=progress)
        load_checkpoint(model, transformer_state, device=device, progress=progress)
        return cls(model, vae, encoder.to(device), tokenizer, name, dtype)

    @classmethod
    def random(cls, name: str = "infinitystar-8b-720p", depth: int | None = None,
               dtype: torch.dtype | str | None = torch.float32, device: str | torch.device | None = "cpu",
               seed: int = 0) -> InfinityStarPipeline:
        """The official architecture with random weights, sampled as the official model ``name`` (its sizes,
        durations and repetitions), optionally only ``depth`` of its blocks (the width is kept), and no text
        encoder: for timing and smoke tests, whose frames are noise."""
        check_name(name)
        dtype, device = cls.check_dtype(dtype), resolve_device(device)
        torch.manual_seed(seed)
        with torch.device(device):
            model, vae = cls._build(depth, dtype)
            for p in model.parameters():  # small, so that activations stay finite at any depth
                torch.nn.init.normal_(p, std=0.02)
        return cls(model, vae, name=name, dtype=dtype)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, list[int], torch.Tensor, int]:
        """The packed text input (kv_compact, lens, cu_seqlens_k, max_seqlen_k) as the official ``encode_prompt``
        makes it: every prompt padded to 512 tokens, so that a row encodes as its prompt alone."""
        device = self.device
        if self.text_encoder is None:
            lens = [min(len(p.split()) + 1, TEXT_TOKENS) for p in prompts]  # words and the end token
            features = [torch.randn(n, self.transformer.config["text_channels"], generator=torch.Generator()
                                    .manual_seed(zlib.crc32(p.encode()))) for p, n in zip(prompts, lens)]
            kv_compact = torch.cat(features).to(device)
        else:
            tokens = self.tokenizer(list(prompts), max_length=TEXT_TOKENS, padding="max_length", truncation=True,
                                    return_tensors="pt")
            mask = tokens.attention_mask.to(device)
            hidden = self.text_encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask)
            features = hidden["last_hidden_state"].float()
            lens = mask.sum(dim=-1).tolist()
            kv_compact = torch.cat([f[:n] for f, n in zip(features, lens)])
        cu_seqlens_k = F.pad(torch.tensor(lens, device=device).cumsum(0), (1, 0)).to(torch.int32)
        return kv_compact, lens, cu_seqlens_k, max(lens)

    @classmethod
    def _checked(
        cls, names: Sequence[str], prompt: str | Sequence[str], duration: int, size: tuple[int, int] | str | None,
        aspect_ratio: float | None, seed: int | Sequence[int] | None, negative_prompt: str | Sequence[str] | None,
        cfg: float, tau_image: float, tau_video: float, apg_norm_threshold: float, prompt_suffix: str, preset: Preset,
    ) -> tuple[list[str], list[str] | None, list[Scale], list[int] | None]:
        """The texts to encode (official prompts), negative prompts, schedule (of the first of the models
        ``names`` that makes the call) and per-row seeds; ``ValueError`` for anything the call refuses."""
        prompts = check_prompts(prompt)
        negatives = None if negative_prompt is None else check_prompts(negative_prompt, "negative_prompt",
                                                                       len(prompts))
        schedule = plan(names, duration, size, aspect_ratio)
        seeds = [seed] * len(prompts) if seed is None or isinstance(seed, int) else seed
        if not isinstance(seeds, list | tuple) or len(seeds) != len(prompts):
            raise ValueError(f"seed must be an int (every row) or a list of one int per prompt ({len(prompts)}), "
                             f"got {seed!r}")
        for row_seed in seeds:
            check_seed(row_seed)
        check_sampling(len(prompts), 0, 0.0, cfg, [tau_image, tau_video])
        if not isinstance(apg_norm_threshold, int | float) or isinstance(apg_norm_threshold, bool) or not \
                math.isfinite(apg_norm_threshold) or apg_norm_threshold < 0:
            raise ValueError(f"apg_norm_threshold = {apg_norm_threshold!r}: must be a number >= 0 (0: no clipping)")
        if not isinstance(prompt_suffix, str):
            raise ValueError(f"prompt_suffix must be a string ('' for none), got {prompt_suffix!r}")
        cls.check_preset(preset)
        texts = [official_prompt(p, duration, prompt_suffix) for p in prompts]
        return texts, negatives, schedule, None if seed is None else list(seeds)

    @classmethod
    def check_call(
        cls, prompt: str | Sequence[str], duration: int = 5, size: tuple[int, int] | str | None = None,
        aspect_ratio: float | None = None, seed: int | Sequence[int] | None = 0,
        negative_prompt: str | Sequence[str] | None = None, cfg: float = SAMPLING["cfg"],
        tau_image: float = SAMPLING["tau_image"], tau_video: float = SAMPLING["tau_video"],
        apg_norm_threshold: float = SAMPLING["apg_norm_threshold"], prompt_suffix: str = PROMPT_SUFFIX,
        preset: Preset = None, progress: bool = True,
    ) -> tuple[list[str], list[str] | None, list[Scale], list[int] | None]:
        """The texts to encode (official prompts), negative prompts, schedule and per-row seeds of a call to any
        official model, or ``ValueError``; a pipeline's call also checks that its own model makes the duration and
        size (the command line checks them before loading, against the model it names)."""
        return cls._checked(list(OFFICIAL), prompt, duration, size, aspect_ratio, seed, negative_prompt, cfg,
                            tau_image, tau_video, apg_norm_threshold, prompt_suffix, preset)

    def __call__(
        self, prompt: str | Sequence[str], duration: int = 5, size: tuple[int, int] | str | None = None,
        aspect_ratio: float | None = None, seed: int | Sequence[int] | None = 0,
        negative_prompt: str | Sequence[str] | None = None, cfg: float = SAMPLING["cfg"],
        tau_image: float = SAMPLING["tau_image"], tau_video: float = SAMPLING["tau_video"],
        apg_norm_threshold: float = SAMPLING["apg_norm_threshold"], prompt_suffix: str = PROMPT_SUFFIX,
        preset: Preset = InfinityStarAdapter.default_preset, progress: bool = True,
    ) -> list[list[Image.Image]]:
        """One clip per prompt: ``duration`` seconds at 16 fps (16 * duration + 1 frames), or one frame for 0
        (an image); the durations are the model's official ones. The size is ``size`` ('WIDTHxHEIGHT' or
        (width, height), one the model makes) or that of ``aspect_ratio`` (height / width), by default the
        official 16:9 landscape (1280x720 at 720p, 848x480 at 480p).

        The defaults are the official settings: APG guidance ``cfg`` 34 with ``apg_norm_threshold`` 0.05,
        temperature ``tau_image`` on the image clip's scales and ``tau_video`` on the video clips', the
        checkpoint's repetitions. As the official scripts, each prompt is encoded with ``prompt_suffix``
        appended ('' appends nothing) and, for a video, the duration tag before it (``<<<t=5s>>>``: the model's
        video captions carried it in training, its image captions none); ``negative_prompt`` (default: the
        learned null text) is encoded as given. ``seed``: an int seeds every row alike, a list one seed per
        prompt; each row is what its prompt gives alone with its seed. ``preset``: a FastVAR preset name or
        config, or None for the unpatched model."""
        texts, negatives, schedule, seeds = self._checked(
            [self.name], prompt, duration, size, aspect_ratio, seed, negative_prompt, cfg, tau_image, tau_video,
            apg_norm_threshold, prompt_suffix, preset)
        K, image_scales = len(schedule), scales_per_clip(schedule)
        self.apply_preset(preset)
        with self.precision():
            with self.working(self.text_encoder):
                text = self.encode_prompts(texts)
                negative = None if negatives is None else self.encode_prompts(negatives)
            with self.working(self.transformer):
                latent = self.transformer.autoregressive_infer(
                    None, schedule, text, OFFICIAL[self.name].checkpoint, B=len(texts),
                    negative_label_B_or_BLT=negative, g_seed=seeds, cfg_list=[cfg] * K,
                    tau_list=[tau_image] * image_scales + [tau_video] * (K - image_scales),
                    apg_norm_threshold=apg_norm_threshold, return_summed_code_only=True, progress=progress)
            with self.working(self.vae), tqdm(total=1, desc="decoding", disable=not progress, leave=False) as bar:
                frames = self.vae.decode(latent)
                bar.update()
        return to_clips(frames)

    # ----------------------------------------------------------------------- command line

    @classmethod
    def add_model_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", default="8b-720p", choices=[n.removeprefix("infinitystar-") for n in OFFICIAL],
                            help="official model (default: %(default)s)")
        parser.add_argument("--depth", type=int, help="with --random-weights: keep the width, cut the blocks to this "
                                                      "many (default: all)")
        parser.add_argument("--weights", help="the transformer's shard folder, or a folder holding it (default: the "
                                              "cache, else the Hub)")
        parser.add_argument("--vae-weights", help="video VAE file or folder (default: the --weights folder, the "
                                                  "cache, else the Hub)")
        parser.add_argument("--text-encoder", help="flan-T5 Hub id or local folder (default: text_encoder/"
                                                   f"flan-t5-xl-official beside the weights, else {TEXT_ENCODER})")

    @classmethod
    def add_input_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--prompt", dest="prompts", action="append",
                            help="repeatable: one video (or image) per prompt (default: 'a red fox running in the "
                                 "snow')")

    @classmethod
    def add_sampling_arguments(cls, parser: argparse.ArgumentParser) -> None:
        durations = "; ".join(f"{n.removeprefix('infinitystar-')}: {', '.join(map(str, o.durations))}"
                              for n, o in OFFICIAL.items())
        parser.add_argument("--duration", type=int, default=5,
                            help=f"seconds at 16 fps, 0 for an image ({durations}) (default: %(default)s)")
        parser.add_argument("--size", help="WIDTHxHEIGHT the model makes (default: 16:9 landscape, 1280x720 at 720p)")
        parser.add_argument("--aspect-ratio", type=float, help="height / width, instead of --size")
        parser.add_argument("--negative-prompt", help="replaces the learned null text of guidance")
        parser.add_argument("--cfg", type=float, default=SAMPLING["cfg"], help="APG guidance scale (default: "
                                                                               "%(default)s)")
        parser.add_argument("--tau-image", type=float, default=SAMPLING["tau_image"],
                            help="temperature of the image clip's scales (default: %(default)s)")
        parser.add_argument("--tau-video", type=float, default=SAMPLING["tau_video"],
                            help="temperature of the video clips' scales (default: %(default)s)")
        parser.add_argument("--apg-norm-threshold", type=float, default=SAMPLING["apg_norm_threshold"],
                            help="APG clips the guidance difference to this RMS (default: %(default)s)")
        parser.add_argument("--no-prompt-suffix", action="store_true",
                            help=f"encode the prompts without the official suffix '{PROMPT_SUFFIX}'")

    @classmethod
    def model_plan(cls, args: argparse.Namespace, random: bool,
                   options: dict[str, Any]) -> tuple[list[tuple[int, int, int]], int]:
        schedule = plan([f"infinitystar-{args.model}"], options.get("duration", 5), options.get("size"),
                        options.get("aspect_ratio"))
        return schedule, cut_depth(args, random, ARCHITECTURE["depth"], "InfinityStar-8B")

    @classmethod
    def from_arguments(cls, args: argparse.Namespace, random: bool) -> InfinityStarPipeline:
        cut_depth(args, random, ARCHITECTURE["depth"], "InfinityStar-8B")
        name = f"infinitystar-{args.model}"
        if random:
            return cls.random(name, args.depth, args.dtype, args.device)
        return cls.from_pretrained(name, weights=args.weights, vae_weights=args.vae_weights,
                                   text_encoder=args.text_encoder, dtype=args.dtype, device=args.device)

    @classmethod
    def inputs(cls, args: argparse.Namespace) -> list[str]:
        return args.prompts or ["a red fox running in the snow"]

    @classmethod
    def call_arguments(cls, args: argparse.Namespace) -> dict[str, Any]:
        return dict(duration=args.duration, size=args.size, aspect_ratio=args.aspect_ratio,
                    negative_prompt=args.negative_prompt, cfg=args.cfg, tau_image=args.tau_image,
                    tau_video=args.tau_video, apg_norm_threshold=args.apg_norm_threshold,
                    prompt_suffix="" if args.no_prompt_suffix else PROMPT_SUFFIX)

    def describe(self) -> str:
        model = self.transformer
        return f"InfinityStar {self.name.removeprefix('infinitystar-')} width {model.C}, " \
               f"{len(model.unregistered_blocks)} blocks"
