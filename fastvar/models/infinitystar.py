"""InfinityStar: text-to-image and text-to-video next-scale prediction (FoundationVision/InfinityStar).

A clip is a pyramid of (t, h, w) latent maps. A video is the image clip (t = 1, the first frame) and
then clips of up to 20 latent frames, each a pyramid over the same (h, w) list; every scale runs a few
times (repetitions), each time refining the same map. State-dict keys (``block_chunks.{c}.module.{j}.…``)
are those of the official checkpoints, so the 720p and 480p shards load as they are. The video VAE is
in ``fastvar.models.video_vae``; the text encoder (flan-T5-XL) is not part of this file: the model takes
its output packed as upstream's ``encode_prompt`` returns it.

The file reads top to bottom: scale schedules, 4-D rotary positions, layers, the model, sampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastvar.attention import flash_attn_func, flash_available
from fastvar.models.infinity import FastRMSNorm
from fastvar.models.sampling import check_sampling, check_seed, record_draws

Scale = tuple[int, int, int]

# ----------------------------------------------------------------------------- scale schedules

# Side of the square each scale's area matches; the (h, w) of a scale keep the template's aspect ratio.
SCALE_SIDES = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32, 40, 60)
SCALES_PER_SIZE = {"0.06M": 11, "0.25M": 13, "0.40M": 14, "0.90M": 15}  # prefixes of SCALE_SIDES
ASPECT_RATIOS = (1.0, 100 / 116, 3 / 4, 2 / 3, 9 / 16, 1 / 2, 2 / 5, 1 / 3)  # h / w; each also mirrored
FRAMES_PER_CLIP = 20  # latent frames of a video clip (80 video frames)
LATENT_FRAMES_PER_SECOND = 4  # 16 fps, 4x temporal compression
VAE_STRIDE = 16


def _template_scales() -> dict[float, list[tuple[int, int]]]:
    """(h, w) of every scale per template, keyed as upstream: the last scale's h/w truncated to 3 decimals."""
    templates = {}
    for ratio in ASPECT_RATIOS:
        hws = []
        for side in SCALE_SIDES:
            w = math.sqrt(side * side / ratio)
            hws.append((int(np.round(w * ratio)), int(np.round(w))))
        real_ratio = hws[-1][0] / hws[-1][1]
        templates[int(real_ratio * 1000) / 1000] = hws
        if ratio != 1.0:
            templates[int(1 / real_ratio * 1000) / 1000] = [(w, h) for h, w in hws]
    return templates


TEMPLATE_SCALES = _template_scales()


def nearest_template(h_div_w: float) -> float:
    """The aspect-ratio template (h/w) closest to ``h_div_w``, as the official code picks it."""
    templates = np.array(list(TEMPLATE_SCALES))
    return float(templates[np.argmin(np.abs(templates - h_div_w))])


def scale_schedule(h_div_w: float, size: str, duration: int) -> list[Scale]:
    """(t, h, w) of every scale: the image clip, then one clip per 20 latent frames (``duration`` seconds
    at 16 fps make ``4 * duration`` latent frames after the first). ``duration`` 0 is an image."""
    if size not in SCALES_PER_SIZE:
        raise ValueError(f"unknown size {size!r}; supported: {list(SCALES_PER_SIZE)}")
    if not isinstance(duration, int) or isinstance(duration, bool) or duration < 0:
        raise ValueError(f"duration = {duration!r}: must be a whole number of seconds >= 0 (0: an image)")
    hws = TEMPLATE_SCALES[nearest_template(h_div_w)][: SCALES_PER_SIZE[size]]
    frames = LATENT_FRAMES_PER_SECOND * duration
    full, rest = divmod(frames, FRAMES_PER_CLIP)
    clips = [FRAMES_PER_CLIP] * full + ([rest] if rest else [])
    if len(set(clips)) > 1:  # upstream sums every video clip's codes at the last clip's size
        raise ValueError(f"duration = {duration} s makes video clips of {clips} latent frames; only durations "
                         f"whose clips are equal are supported (1 to 5 s, or a multiple of 5 s)")
    return [(t, h, w) for t in [1, *clips] for h, w in hws]


def scales_per_clip(schedule: Sequence[Scale]) -> int:
    """Scales of one clip: up to and including the first that has the last scale's (h, w)."""
    return next(si for si, (_, h, w) in enumerate(schedule) if (h, w) == tuple(schedule[-1][1:])) + 1


@dataclass(frozen=True)
class ScaleContext:
    """What the scale sees: ``ref_sids``, the earlier scales whose keys its queries attend to (besides the
    text and itself), and its frames ``frame_ss`` .. ``frame_ee`` - 1 in the rotary positions."""

    ref_sids: tuple[int, ...]
    frame_ss: int
    frame_ee: int


def scale_contexts(schedule: Sequence[Scale]) -> list[ScaleContext]:
    """Per scale, the official context of the released models: a scale of the image clip sees only the
    text and itself; a scale of video clip c also sees the largest scale of clip c - 1."""
    per_clip = scales_per_clip(schedule)
    contexts = []
    for si in range(len(schedule)):
        clip = si // per_clip
        clip_frames = schedule[(clip + 1) * per_clip - 1][0]
        if clip == 0:
            contexts.append(ScaleContext((), 0, clip_frames))
        else:
            first = schedule[0][0] + (clip - 1) * FRAMES_PER_CLIP
            contexts.append(ScaleContext((clip * per_clip - 1,), first, first + clip_frames))
    return contexts


# ----------------------------------------------------------------------------- 4-D rotary positions


def rope_angles(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """cos / sin of tokens at ``positions`` (L, 4) = (scale, frame, height, width): (2, L, head_dim // 2).

    Each axis gets a quarter of the rotated channel pairs, in that order, with the same frequencies.
    """
    n = head_dim // 8
    inv_freq = 1.0 / (base ** (torch.arange(n, dtype=torch.int64).float() / n))
    angles = torch.cat([torch.outer(positions[:, axis].float(), inv_freq) for axis in range(4)], dim=-1)
    return torch.stack([torch.cos(angles), torch.sin(angles)])


def text_positions(length: int) -> torch.Tensor:
    """Text token i sits at scale position i, frame, height and width 0."""
    positions = torch.zeros(length, 4, dtype=torch.int64)
    positions[:, 0] = torch.arange(length)
    return positions


def visual_positions(schedule: Sequence[Scale], si: int, step: int, context: ScaleContext,
                     text_maxlen: int) -> torch.Tensor:
    """Positions of the (t, h, w) tokens of step ``step`` (scale ``si``): scale ``text_maxlen + step``, so
    repetitions differ only there; frames of the scale's clip; rows and columns placed on the grid of
    the last scale, so every scale of the pyramid shares one frame of reference."""
    t, h, w = schedule[si]
    _, H, W = schedule[-1]
    rows = (torch.arange(h) * (H / h)).round().int()
    cols = (torch.arange(w) * (W / w)).round().int()
    frames = torch.arange(context.frame_ss, context.frame_ee)
    grid = torch.stack(torch.meshgrid(frames, rows.long(), cols.long(), indexing="ij"), dim=-1).reshape(-1, 3)
    return torch.cat([torch.full((t * h * w, 1), text_maxlen + step, dtype=torch.int64), grid], dim=1)


def rotate(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i + 1) of x (B, H, L, D) by the angles of ``rope`` (2, L, D / 2), or per
    batch row (2, B, 1, L, D / 2)."""
    pairs = x.unflatten(-1, (-1, 2))
    cos, sin = rope[0], rope[1]
    return torch.stack([cos * pairs[..., 0] - sin * pairs[..., 1], sin * pairs[..., 0] + cos * pairs[..., 1]],
                       dim=-1).flatten(-2)


# ----------------------------------------------------------------------------- layers


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, L, D) -> (B, Hkv * groups, L, D): query head i uses key/value head i // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def bf16_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention as the official call makes it: q, k, v (B, H, L, D) rounded to bfloat16, the output
    (B, L, H * D) in bfloat16. flash-attn when it can run, else SDPA: in bfloat16 on CUDA (its flash kernel),
    in float32 on the rounded values on the CPU (where the reference outputs were made that way)."""
    B, H, L, D = q.shape
    q, k, v = q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)
    if flash_available(q):
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                               softmax_scale=scale).reshape(B, L, H * D)
    if not q.is_cuda:
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(B, L, H * D).to(torch.bfloat16)


TextGroups = list[tuple[torch.Tensor, int]] | None


def text_groups(text_lens: torch.Tensor) -> TextGroups:
    """Rows grouped by text length (row indices, length), or None when every row has the same: in a
    batch, each group attends to its own text length, so no row's sums see the others' padding."""
    lengths = text_lens.tolist()
    if len(set(lengths)) == 1:
        return None
    return [(torch.tensor([row for row, n in enumerate(lengths) if n == length]), length)
            for length in sorted(set(lengths))]


def rows_of(parts: list[torch.Tensor], names: list[str | int | None], rows: torch.Tensor, n: int) -> torch.Tensor:
    """The keys (or values) of ``rows``, concatenated, with the text part cut to its first n tokens."""
    return torch.cat([p[rows, :, :n] if name == "t0" else p[rows] for p, name in zip(parts, names)], dim=2)


class ScaleKVCache:
    """Keys (after RoPE) and values of one block per scale key: ``'t0'`` for the text, ``si`` for a
    visual scale. Only the scales that a later scale refers to are kept."""

    def __init__(self, keep: set[int]):
        self.keep = keep
        self.entries: dict[str | int, tuple[torch.Tensor, torch.Tensor]] = {}

    def store(self, key: str | int, k: torch.Tensor, v: torch.Tensor) -> None:
        if key == "t0" or key in self.keep:
            self.entries[key] = (k, v)

    def context(self, keys: Sequence[str | int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [self.entries[key][0] for key in keys], [self.entries[key][1] for key in keys]

    def keep_rows(self, rows: int) -> None:
        """Drop every row from ``rows`` on (the unconditional rows, when guidance stops)."""
        self.entries = {key: (k[:rows], v[:rows]) for key, (k, v) in self.entries.items()}


class SelfAttention(nn.Module):
    """Grouped-query attention with per-head RMSNorm on q and k, 4-D RoPE and a per-scale KV cache."""

    def __init__(self, embed_dim: int, num_heads: int, num_key_value_heads: int, bias: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.num_key_value_heads = num_key_value_heads
        self.q_proj = nn.Linear(embed_dim, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, embed_dim, bias=bias)
        self.q_norm = FastRMSNorm(self.head_dim)
        self.k_norm = FastRMSNorm(self.head_dim)
        self.kv_cache: ScaleKVCache | None = None

    def kv_caching(self, keep: set[int] | None) -> None:
        """Cache the text and the scales in ``keep`` from now on; None stops and frees the cache."""
        self.kv_cache = None if keep is None else ScaleKVCache(keep)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, store_as: str | int | None,
                context: Sequence[str | int], text_groups: TextGroups) -> torch.Tensor:
        """``store_as``: the cache key of this scale (None: a repetition that is not the last);
        ``context``: the cached keys attended before this scale's own; ``text_groups``: see ``text_groups``."""
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).unflatten(-1, (-1, self.head_dim))).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).unflatten(-1, (-1, self.head_dim))).transpose(1, 2)
        v = self.v_proj(x).unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
        q, k = rotate(q, rope), rotate(k, rope)
        keys, values, names = [k], [v], [store_as]
        if self.kv_cache is not None:
            if store_as is not None:
                self.kv_cache.store(store_as, k, v)
            ks, vs = self.kv_cache.context(context)
            keys, values, names = [*ks, k], [*vs, v], [*context, store_as]
        if text_groups is None:
            return self.o_proj(self.attend(q, torch.cat(keys, dim=2), torch.cat(values, dim=2)))
        out = q.new_zeros(B, L, self.num_heads * self.head_dim, dtype=self.o_proj.weight.dtype)
        for rows, n in text_groups:  # each row attends to its own text length, as it would alone
            queries = n if store_as == "t0" else L  # the text beyond a row's length is never read
            out[rows, :queries] = self.attend(q[rows, :, :queries], rows_of(keys, names, rows, n),
                                              rows_of(values, names, rows, n))
        return self.o_proj(out)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        groups = self.num_heads // self.num_key_value_heads
        out = bf16_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), self.head_dim**-0.5)
        return out.to(self.o_proj.weight.dtype)


class SwiGLU(nn.Module):
    def __init__(self, embed_dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(embed_dim, hidden, bias=False)
        self.up_proj = nn.Linear(embed_dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SelfAttnBlock(nn.Module):
    """Pre-norm qwen block: RMSNorm, attention, residual; RMSNorm, SwiGLU, residual."""

    def __init__(self, embed_dim: int, num_heads: int, num_key_value_heads: int, mlp_ratio: float, bias: bool):
        super().__init__()
        self.attn = SelfAttention(embed_dim, num_heads, num_key_value_heads, bias)
        self.mlp = SwiGLU(embed_dim, round(embed_dim * mlp_ratio / 256) * 256)
        self.input_layernorm = FastRMSNorm(embed_dim)
        self.post_attention_layernorm = FastRMSNorm(embed_dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, store_as: str | int | None,
                context: Sequence[str | int], text_groups: TextGroups) -> torch.Tensor:
        x = x + self.attn(self.input_layernorm(x), rope, store_as, context, text_groups)
        return x + self.mlp(self.post_attention_layernorm(x))


class MultipleLayers(nn.Module):
    """A chunk of blocks (the official checkpoints group their blocks in ``block_chunks``)."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.module = nn.ModuleList(blocks)


# ----------------------------------------------------------------------------- guidance and codes


def adaptive_projected_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float,
                                norm_threshold: float) -> torch.Tensor:
    """APG (eta 0) on logits (B, L, V) of the prompt and unconditional rows: the difference is clipped
    to an RMS of ``norm_threshold`` and only its part orthogonal to ``cond`` (per row, in float64) is
    added, ``scale - 1`` times."""
    diff = cond - uncond
    if norm_threshold > 0:
        rms = 1 / math.sqrt(cond.shape[1] * cond.shape[2]) * diff.norm(p=2, dim=[-1, -2], keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(diff), norm_threshold / rms)
    direction = F.normalize(cond.double(), dim=[-1, -2])
    parallel = (diff.double() * direction).sum(dim=[-1, -2], keepdim=True) * direction
    orthogonal = (diff.double() - parallel).to(cond.dtype)
    return cond + (scale - 1) * (orthogonal + 0 * parallel.to(cond.dtype))


def bits_to_codes(bits: torch.Tensor) -> torch.Tensor:
    """Bits (B, t, h, w, d) -> BSQ codes (B, d, t, h, w): the +-1 vector normalised to unit length."""
    return F.normalize(bits.float() * 2 - 1, dim=-1).permute(0, 4, 1, 2, 3)


def stretch_codes(codes: torch.Tensor, channels: int, target: Scale) -> torch.Tensor:
    """Codes (B, d, t, h, w) -> (B, channels, t, H, W): trilinear over (channel, height, width), so
    semantic codes (16 channels) are stretched over the 64 latent channels; frames are untouched."""
    _, H, W = target
    out = F.interpolate(codes.transpose(1, 2), size=(channels, H, W), mode="trilinear")
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Checkpoint:
    """Sampling facts of a checkpoint: the first ``semantic_scales`` scales of a clip use the 16-bit
    semantic head, and how often each scale of the image and of the video clips runs. (Upstream also
    picks a quantizer per scale by token count; both of its quantizers turn bits into the same codes.)"""

    semantic_scales: int
    image_scale_repetition: tuple[int, ...]
    video_scale_repetition: tuple[int, ...]

    def repetitions(self, schedule: Sequence[Scale]) -> list[int]:
        per_clip = scales_per_clip(schedule)
        if len(self.image_scale_repetition) != per_clip or len(self.video_scale_repetition) != per_clip:
            raise ValueError(f"the schedule has {per_clip} scales per clip; the repetitions are given for "
                             f"{len(self.image_scale_repetition)} (image) and {len(self.video_scale_repetition)}"
                             f" (video)")
        return [(self.image_scale_repetition if si < per_clip else self.video_scale_repetition)[si % per_clip]
                for si in range(len(schedule))]


class InfinityStar(nn.Module):
    """Text-conditional bitwise next-scale transformer over spacetime pyramids (qwen blocks).

    The configuration of the released checkpoints: GQA with q/k RMSNorm, SwiGLU, 4-D RoPE, the text as a
    prefix that every scale attends to, a 16-bit semantic head and a 64-bit detail head.
    """

    def __init__(
        self, text_channels: int = 2048, text_maxlen: int = 512, embed_dim: int = 4096, depth: int = 36,
        num_heads: int = 32, num_key_value_heads: int = 8, mlp_ratio: float = 4.0, block_chunks: int = 6,
        codebook_dim: int = 64, semantic_scale_dim: int = 16, qwen_qkvo_bias: bool = False,
    ):
        super().__init__()
        if depth % block_chunks or num_heads % num_key_value_heads or embed_dim % num_heads:
            raise ValueError(f"depth {depth} must divide into block_chunks {block_chunks}, num_heads {num_heads} "
                             f"into num_key_value_heads {num_key_value_heads}, embed_dim {embed_dim} into heads")
        self.config = dict(text_channels=text_channels, text_maxlen=text_maxlen, embed_dim=embed_dim, depth=depth,
                           num_heads=num_heads, num_key_value_heads=num_key_value_heads, mlp_ratio=mlp_ratio,
                           block_chunks=block_chunks, codebook_dim=codebook_dim,
                           semantic_scale_dim=semantic_scale_dim, qwen_qkvo_bias=qwen_qkvo_bias)
        self.C, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.codebook_dim, self.text_maxlen = codebook_dim, text_maxlen
        self.rng = torch.Generator()

        self.cfg_uncond = nn.Parameter(torch.zeros(text_maxlen, text_channels))  # the learned null text
        self.sos_token = nn.Parameter(torch.zeros(1, 1, embed_dim))  # kept for the keys; unused at inference
        self.text_proj = nn.Linear(text_channels, embed_dim)
        self.word_embed = nn.Linear(codebook_dim, embed_dim)
        blocks = [SelfAttnBlock(embed_dim, num_heads, num_key_value_heads, mlp_ratio, qwen_qkvo_bias)
                  for _ in range(depth)]
        per_chunk = depth // block_chunks
        self.block_chunks = nn.ModuleList(MultipleLayers(blocks[i : i + per_chunk]) for i in range(0, depth, per_chunk))
        self.norm_hidden_sates = FastRMSNorm(embed_dim)  # sic: the official key
        self.head = nn.Linear(embed_dim, 2 * codebook_dim)
        self.semantic_head2 = nn.Linear(embed_dim, 2 * semantic_scale_dim)

    @property
    def unregistered_blocks(self) -> list[SelfAttnBlock]:
        """Every block in order."""
        return [block for chunk in self.block_chunks for block in chunk.module]

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """As upstream loads it: a ``cfg_uncond`` of another text length is cut, or completed with this model's
        rows (zeros for a model built on the meta device). ``fastvar.hub.load_checkpoint`` calls it."""
        old, new = state_dict.get("cfg_uncond"), self.cfg_uncond
        if old is not None and len(old) != len(new):
            n = min(len(old), len(new))
            rest = torch.zeros(len(new) - n, new.shape[1]) if new.is_meta else new.detach()[n:]
            state_dict = {**state_dict, "cfg_uncond": torch.cat((old[:n], rest.to(old)))}
        return state_dict

    def prefix(self, label_B_or_BLT: tuple, negative_label_B_or_BLT: tuple | None,
               guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The text prefix of every row (rows, T, C), prompts then unconditional rows, and each row's text
        length (rows,). A prompt's two rows are zero-padded to the longer of its two texts and are not
        masked there, as upstream; in a batch, a row's attention ignores what lies beyond its own length."""
        kv_compact, lens, _, _ = label_B_or_BLT
        lens = [int(n) for n in lens]
        texts = list(torch.split(kv_compact, lens))
        own = list(lens)
        if guided:
            if negative_label_B_or_BLT is None:
                texts += [self.cfg_uncond[:n].to(kv_compact.dtype) for n in lens]
                own += lens
            else:
                neg_compact, neg_lens = negative_label_B_or_BLT[0], [int(n) for n in negative_label_B_or_BLT[1]]
                texts += list(torch.split(neg_compact, neg_lens))
                own = [max(a, b) for a, b in zip(lens, neg_lens)] * 2
        rows = len(texts)
        width = max(own)
        proj = self.text_proj(torch.cat(texts).to(self.text_proj.weight.dtype))
        prefix = proj.new_zeros(rows, width, self.C)
        start = 0
        for row, text in enumerate(texts):
            prefix[row, : len(text)] = proj[start : start + len(text)]
            start += len(text)
        return prefix, torch.tensor(own)

    def embed(self, latent: torch.Tensor, rows: int) -> torch.Tensor:
        """Tokens of a latent map (B, d, t, h, w) in (t, h, w) raster order, repeated for the CFG rows."""
        tokens = self.word_embed(latent.flatten(2).transpose(1, 2).to(self.word_embed.weight.dtype))
        return tokens.repeat(rows // latent.shape[0], 1, 1)

    def logits(self, x: torch.Tensor, semantic: bool) -> torch.Tensor:
        """(rows, L, 2 d) in float32: pairs (2c, 2c + 1) are the logits of bit c being 0 and 1."""
        head = self.semantic_head2 if semantic else self.head
        with torch.autocast(x.device.type, enabled=False):  # float32 under a half-precision autocast too
            return F.linear(self.norm_hidden_sates(x).float(), head.weight.float(), head.bias.float())

    def rope(self, positions: torch.Tensor) -> torch.Tensor:
        return rope_angles(positions, self.C // self.num_heads).to(self.word_embed.weight.device)

    def run_blocks(self, x: torch.Tensor, rope: torch.Tensor, store_as: str | int | None,
                   context: Sequence[str | int], text_groups: TextGroups) -> torch.Tensor:
        for block in self.unregistered_blocks:
            x = block(x, rope, store_as, context, text_groups)
        return x

    @torch.no_grad()
    def autoregressive_infer(
        self, vae: nn.Module | None, scale_schedule: Sequence[Scale], label_B_or_BLT: tuple,
        checkpoint: Checkpoint, B: int = 1, negative_label_B_or_BLT: tuple | None = None,
        g_seed: int | Sequence[int] | None = None, cfg_list: Sequence[float] = (), tau_list: Sequence[float] = (),
        apg_norm_threshold: float = 0.05, gt_leak: int = -1, gt_ls_Bl: Sequence[torch.Tensor] | None = None,
        repetitions: Sequence[int] | None = None, trunk_scale: int = 1000, guided_scales: int | None = None,
        return_summed_code_only: bool = False, progress: bool = False,
        on_step: Callable[[int, int], None] | None = None,
        on_step_logits: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """The official sampling call (``ar_infer_infinity_elegant``) for B prompts at once.

        ``label_B_or_BLT`` = (kv_compact, lens, cu_seqlens_k, max_seqlen_k) packs the B prompts' text
        features; ``negative_label_B_or_BLT`` the same for B negative prompts (else the learned null text).
        ``cfg_list`` / ``tau_list``: APG scale and temperature per scale. ``g_seed``: one generator for the
        batch (drawn row after row), or one seed per row: row i is then what the prompt gives alone with
        seed ``g_seed[i]``. ``gt_leak`` / ``gt_ls_Bl``: the bits (B, t, h, w, d) of every step of the
        first ``gt_leak`` scales are given instead of sampled. ``repetitions``: runs per scale (default:
        the checkpoint's). ``trunk_scale``: only the scales before it run; the latent is what they summed.
        From scale ``guided_scales`` on the unconditional rows are not run: those scales sample from the
        prompt's logits alone (the cfg-1 path) at half the batch. ``on_step(si, repetition)`` is called
        before the blocks run a step;
        ``on_step_logits(step, raw, guided)`` sees the logits before the temperature (all rows) and those
        handed to the softmax.

        Returns the summed latent (B, 64, T, H, W) if ``return_summed_code_only``, else ``vae.decode`` of it.
        """
        K = len(scale_schedule)
        reps = checkpoint.repetitions(scale_schedule) if repetitions is None else list(repetitions)
        self.check_call(scale_schedule, label_B_or_BLT, B, negative_label_B_or_BLT, g_seed, cfg_list, tau_list,
                        reps, gt_leak, gt_ls_Bl)
        device = self.word_embed.weight.device
        generators = self.generators(g_seed, B, device)
        contexts = scale_contexts(scale_schedule)
        per_clip = scales_per_clip(scale_schedule)
        guided = any(c != 1 for c in cfg_list[:K])
        rows = 2 * B if guided else B

        prefix, text_lens = self.prefix(label_B_or_BLT, negative_label_B_or_BLT, guided)
        T = prefix.shape[1]
        groups = text_groups(text_lens)
        referenced = {ref for c in contexts for ref in c.ref_sids}
        for block in self.unregistered_blocks:
            block.attn.kv_caching(referenced)
        try:
            self.run_blocks(prefix, self.rope(text_positions(T)), "t0", [], groups)
            latent = torch.zeros(B, self.codebook_dim, *scale_schedule[0], device=device)
            summed = [latent]
            x = self.embed(latent, rows)
            step = 0
            steps = tqdm(total=sum(reps), desc="steps", leave=False) if progress else None
            for si, (t, h, w) in enumerate(scale_schedule[: min(K, trunk_scale)]):
                if si == guided_scales and rows > B:  # the unconditional rows stop here
                    rows, x, text_lens = B, x[:B], text_lens[:B]
                    groups = text_groups(text_lens)
                    for block in self.unregistered_blocks:
                        block.attn.kv_cache.keep_rows(B)
                target = scale_schedule[per_clip - 1] if si < per_clip else scale_schedule[-1]
                semantic = si % per_clip < checkpoint.semantic_scales
                context = [*contexts[si].ref_sids, "t0"]
                for rep in range(reps[si]):
                    if on_step is not None:
                        on_step(si, rep)
                    rope = self.rope(visual_positions(scale_schedule, si, step, contexts[si], self.text_maxlen))
                    x = self.run_blocks(x, rope, si if rep == reps[si] - 1 else None, context, groups)
                    raw = self.logits(x, semantic)
                    logits = raw.mul(1 / tau_list[si])
                    if rows > B:
                        logits = adaptive_projected_guidance(logits[:B], logits[B:], cfg_list[si], apg_norm_threshold)
                    if on_step_logits is not None:
                        on_step_logits(step, raw, logits)
                    bits = self.sample(logits, generators).view(B, t, h, w, -1)
                    if si < gt_leak:
                        bits = gt_ls_Bl[step].to(device)
                    if rep == reps[si] - 1:  # a scale's final bits, for runs compared draw by draw
                        record_draws(bits)
                    codes = stretch_codes(bits_to_codes(bits), self.codebook_dim, target)
                    summed[-1] = F.interpolate(summed[-1], size=target, mode="trilinear") + codes
                    if rep < reps[si] - 1:
                        x = self.embed(F.interpolate(summed[-1], size=(t, h, w), mode="area"), rows)
                    step += 1
                    if steps is not None:
                        steps.update()
                if si < min(K, trunk_scale) - 1:
                    if (h, w) == tuple(scale_schedule[-1][1:]):  # a clip ends: the next starts from zeros
                        summed.append(torch.zeros(B, self.codebook_dim, *scale_schedule[si + 1], device=device))
                        x = self.embed(summed[-1], rows)
                    else:
                        x = self.embed(F.interpolate(summed[-1], size=scale_schedule[si + 1], mode="area"), rows)
        finally:
            for block in self.unregistered_blocks:
                block.attn.kv_caching(None)
        latent = torch.cat(summed, dim=2)
        return latent if return_summed_code_only else vae.decode(latent)

    @staticmethod
    def generators(g_seed: int | Sequence[int] | None, B: int, device: torch.device) -> list | None:
        """None (unseeded), or the generators the rows draw from, in order."""
        if g_seed is None:
            return None
        if isinstance(g_seed, int):
            return [torch.Generator(device=device).manual_seed(g_seed)]
        return [torch.Generator(device=device).manual_seed(seed) for seed in g_seed]

    @staticmethod
    def sample(logits: torch.Tensor, generators: list | None) -> torch.Tensor:
        """One bit per (row, token, channel) from logits (B, L, 2 d); one generator for the whole batch,
        or one per row."""
        probs = logits.reshape(logits.shape[0], -1, 2).softmax(dim=-1)
        if generators is None or len(generators) == 1:
            rng = None if generators is None else generators[0]
            return torch.multinomial(probs.view(-1, 2), 1, replacement=True, generator=rng).view(len(probs), -1)
        return torch.stack([torch.multinomial(p, 1, replacement=True, generator=g).view(-1)
                            for p, g in zip(probs, generators)])

    def check_call(self, schedule: Sequence[Scale], label: tuple, B: int, negative: tuple | None,
                   g_seed: int | Sequence[int] | None, cfg_list: Sequence[float], tau_list: Sequence[float],
                   reps: Sequence[int], gt_leak: int, gt_ls_Bl: Sequence[torch.Tensor] | None) -> None:
        """Refuse, before any compute, a call upstream would fail on or that means nothing."""
        K = len(schedule)
        if not K or any(len(s) != 3 or min(s) < 1 for s in schedule):
            raise ValueError(f"scale_schedule must be a non-empty list of (t, h, w), sides >= 1, got {schedule}")
        check_sampling(B, 0, 0.0, list(cfg_list[:K]), list(tau_list[:K]))
        if len(cfg_list) < K or len(tau_list) < K:
            raise ValueError(f"cfg_list and tau_list need one entry per scale ({K}), got {len(cfg_list)}, "
                             f"{len(tau_list)}")
        for what, text in (("label_B_or_BLT", label), ("negative_label_B_or_BLT", negative)):
            if text is None:
                continue
            lens = [int(n) for n in text[1]]
            if len(lens) != B or min(lens) < 1 or max(lens) > self.text_maxlen or sum(lens) != len(text[0]):
                raise ValueError(f"{what} must pack B = {B} texts of 1 to {self.text_maxlen} tokens each "
                                 f"(lens {lens}, {len(text[0])} token rows)")
        seeds = [g_seed] if g_seed is None or isinstance(g_seed, int) else list(g_seed)
        if len(seeds) not in (1, B):
            raise ValueError(f"g_seed: one seed, or one per row (B = {B}), got {len(seeds)}")
        for seed in seeds:
            check_seed(seed, "g_seed")
        if len(reps) != K or any(not isinstance(r, int) or r < 1 for r in reps):
            raise ValueError(f"repetitions must give an int >= 1 per scale ({K}), got {list(reps)}")
        forced = sum(reps[: max(gt_leak, 0)])
        if forced and (gt_ls_Bl is None or len(gt_ls_Bl) < forced):
            raise ValueError(f"gt_leak = {gt_leak} needs the bits of {forced} steps in gt_ls_Bl")


# ----------------------------------------------------------------------------- official configurations


@dataclass(frozen=True)
class Official:
    """A released checkpoint: its pixel budget, sampling facts and the durations its script generates
    (0: an image)."""

    size: str
    checkpoint: Checkpoint
    durations: tuple[int, ...]


ARCHITECTURE = dict(text_channels=2048, text_maxlen=512, embed_dim=4096, depth=36, num_heads=32, num_key_value_heads=8,
                    mlp_ratio=4.0, block_chunks=6)  # infinity_qwen8b, both checkpoints
OFFICIAL = {
    "infinitystar-8b-720p": Official("0.90M", Checkpoint(12, (3,) * 15, (3,) * 12 + (2, 1, 1)), (0, 5)),
    "infinitystar-8b-480p": Official("0.40M", Checkpoint(11, (3,) * 14, (3,) * 12 + (2, 1)), (0, 5, 10)),
}
SAMPLING = dict(cfg=34.0, tau_image=1.0, tau_video=0.4, apg_norm_threshold=0.05)  # the official scripts'


def build(depth: int | None = None) -> InfinityStar:
    """The official architecture with random weights; ``depth`` keeps the width and cuts the blocks (for
    timing the full schedule on small machines)."""
    kwargs = dict(ARCHITECTURE)
    if depth is not None:
        if not isinstance(depth, int) or not 1 <= depth <= kwargs["depth"]:
            raise ValueError(f"depth must be in 1..{kwargs['depth']} for InfinityStar-8B, got {depth!r}")
        kwargs.update(depth=depth, block_chunks=math.gcd(depth, kwargs["block_chunks"]))
    return InfinityStar(**kwargs)
