"""Infinity: text-to-image next-scale prediction with bitwise tokens (FoundationVision/Infinity).

State-dict keys (``block_chunks.{c}.module.{j}.…``) and constructor keyword arguments are those of
the official code, so ``infinity_2b_reg.pth`` and the 8B checkpoint load as they are. The file reads
top to bottom: scale schedules, 2-D rotary positions, attention, blocks, the model, then sampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastvar.models.bsq_vae import BSQVAE, official_vae
from fastvar.models.kv_cache import KVCache
from fastvar.models.sampling import check_sampling, generator_on, sample_with_top_k_top_p_

# ----------------------------------------------------------------------------- scale schedules

# (h, w) of the 13 scales of the 1M schedule per aspect-ratio template h/w (ratios below 1 mirror these).
TEMPLATE_SCALES = {
    1.000: [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40),
            (48, 48), (64, 64)],
    1.250: [(1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36),
            (55, 44), (70, 56)],
    1.333: [(1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36),
            (60, 45), (72, 54)],
    1.500: [(1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32),
            (63, 42), (78, 52)],
    1.750: [(1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32),
            (70, 40), (84, 48)],
    2.000: [(1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30),
            (74, 37), (90, 45)],
    2.500: [(1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26),
            (80, 32), (100, 40)],
    3.000: [(1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24),
            (90, 30), (111, 37)],
}
for _ratio, _hws in list(TEMPLATE_SCALES.items()):
    if _ratio != 1.0:  # the official key of the mirrored template truncates 1/ratio to 3 decimals
        TEMPLATE_SCALES[int(1 / _ratio * 1000) / 1000] = [(w, h) for h, w in _hws]
SIZES = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}  # scales per pixel budget: prefixes of the 1M schedule
# Zero-shot higher resolution: one scale beyond 1M (1344x1344, 960 high x 1920 wide, ...). Its rotary
# positions are placed on the 1M grid like every other scale's, so the model sees familiar positions.
EXTENDED_SCALE = {1.0: (84, 84), 0.5: (60, 120), 2.0: (120, 60), 1.333: (84, 63), 0.75: (63, 84)}
VAE_STRIDE = 16


def nearest_template(h_div_w: float) -> float:
    """The aspect-ratio template (h/w) closest to ``h_div_w``, as the official code picks it."""
    templates = np.array(list(TEMPLATE_SCALES))
    return float(templates[np.argmin(np.abs(templates - h_div_w))])


def scale_schedule(h_div_w: float, size: str = "1M") -> list[tuple[int, int, int]]:
    """(t, h, w) of every scale for an aspect ratio h/w and a pixel budget ('0.06M' ... '1M', or
    'extended': the 1M schedule plus one larger scale, for the templates in ``EXTENDED_SCALE``)."""
    template = nearest_template(h_div_w)
    if size == "extended":
        if template not in EXTENDED_SCALE:
            raise ValueError(f"no extended schedule for aspect ratio {template}; available for {list(EXTENDED_SCALE)}")
        return scale_schedule(template, "1M") + [(1, *EXTENDED_SCALE[template])]
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; supported: {[*SIZES, 'extended']}")
    return [(1, h, w) for h, w in TEMPLATE_SCALES[template][: SIZES[size]]]


# ----------------------------------------------------------------------------- 2-D rotary positions


def rope_table(schedule: Sequence[tuple[int, int, int]], head_dim: int, anchor_hw: tuple[int, int],
               base: float = 10000.0) -> torch.Tensor:
    """cos / sin of every token of ``schedule``: (2, L, head_dim // 2).

    A token at row i, column j of an (h, w) map sits at ``round(i * H / h), round(j * W / w)`` on the
    grid of the anchor scale (H, W) (the last scale of the template's 1M schedule), so all scales of
    a pyramid share one coordinate frame. The first half of the rotated pairs encode the row.
    """
    quarter = head_dim // 4
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim // 2, 2, dtype=torch.int64).float() / (head_dim // 2)))
    H, W = anchor_hw
    tables = []
    for _, h, w in schedule:
        rows = (torch.arange(h) * (H / h)).round().int().float()
        cols = (torch.arange(w) * (W / w)).round().int().float()
        angles = torch.cat([torch.outer(rows, inv_freq)[:, None, :].expand(h, w, quarter),
                            torch.outer(cols, inv_freq)[None, :, :].expand(h, w, quarter)], dim=-1)
        tables.append(torch.stack([torch.cos(angles), torch.sin(angles)]).reshape(2, h * w, 2 * quarter))
    return torch.cat(tables, dim=1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate channel pairs of q, k (B, H, L, D) by ``rope`` (2, L, D/2) or per row (2, B, 1, L, D/2)."""
    qk = torch.stack((q, k)).unflatten(-1, (-1, 2))
    cos, sin = rope[0], rope[1]
    qk = torch.stack([cos * qk[..., 0] - sin * qk[..., 1], sin * qk[..., 0] + cos * qk[..., 1]], dim=-1)
    return qk.flatten(-2).unbind(0)


# ----------------------------------------------------------------------------- layers


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))) * weight


class FastRMSNorm(nn.Module):
    def __init__(self, C: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps).to(x.dtype)


class FloatLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever its weights are stored in, as CUDA autocast runs it for the
    bfloat16 blocks of the official inference (CPU autocast would refuse the mixed dtypes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)


def ada_layer_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps).mul(scale.add(1)).add_(shift)


def varlen_attention(q: torch.Tensor, kv: torch.Tensor, cu_seqlens_k: torch.Tensor, scale: float) -> torch.Tensor:
    """Each of the B query rows (B, Lq, H, c) attends to its own segment of the packed kv (N, 2, H, c).

    As the official flash-attn call on float32 inputs: q and kv are rounded to bf16, the attention is
    computed in float32 on those values and its output rounded to bf16, then returned as float32.
    """
    q, kv = q.to(torch.bfloat16).float(), kv.to(torch.bfloat16).float()
    bounds = cu_seqlens_k.tolist()
    outs = []
    for b in range(q.shape[0]):
        k, v = kv[bounds[b] : bounds[b + 1]].unbind(1)  # (len, H, c)
        weights = torch.einsum("qhc,khc->hqk", q[b], k).mul(scale).softmax(dim=-1)
        outs.append(torch.einsum("hqk,khc->qhc", weights, v))
    return torch.stack(outs).to(torch.bfloat16).float()


class SelfAttention(nn.Module):
    """Cosine attention (L2-normalised q, k, learned per-head temperature) with 2-D RoPE and a KV cache."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.max_scale_mul = torch.log(torch.tensor(100.0, device="cpu")).item()
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.kv_cache: KVCache | None = None

    def kv_caching(self, enable: bool, capacity: int | None = None) -> None:
        """Start caching keys and values (for ``capacity`` tokens, if known), or stop and free the cache."""
        self.kv_cache = KVCache(capacity) if enable else None

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        q, k, v = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim).permute(
            2, 0, 3, 1, 4).unbind(0)
        q = F.normalize(q, dim=-1, eps=1e-12).mul(self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()).contiguous()
        k = F.normalize(k, dim=-1, eps=1e-12).contiguous()
        q, k = apply_rope(q, k, rope)
        v = v.contiguous()
        if self.kv_cache is not None:
            k, v = self.kv_cache.append(k, v)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class CrossAttention(nn.Module):
    """Attention of image tokens (or, for pooling, one learned query) to the packed text tokens."""

    def __init__(self, embed_dim: int, kv_dim: int, num_heads: int, for_attn_pool: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.scale = 1 / math.sqrt(self.head_dim)
        if for_attn_pool:
            self.mat_q = nn.Parameter(torch.zeros(1, num_heads, self.head_dim))
        else:
            self.mat_q = nn.Linear(embed_dim, embed_dim)
        self.mat_kv = nn.Linear(kv_dim, 2 * embed_dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor | None, ca_kv: tuple[torch.Tensor, torch.Tensor, int]) -> torch.Tensor:
        kv_compact, cu_seqlens_k, _ = ca_kv
        kv = F.linear(kv_compact, self.mat_kv.weight, torch.cat((self.zero_k_bias, self.v_bias)))
        kv = kv.view(-1, 2, self.num_heads, self.head_dim)
        if x is None:  # attention pool: one learned query per text
            q = self.mat_q.expand(cu_seqlens_k.shape[0] - 1, -1, -1).unsqueeze(1)
        else:
            q = self.mat_q(x).unflatten(-1, (self.num_heads, self.head_dim))
        out = varlen_attention(q, kv, cu_seqlens_k, self.scale)
        return self.proj(out.flatten(2))


class TextAttentivePool(nn.Module):
    def __init__(self, Ct5: int, D: int):
        super().__init__()
        num_heads = Ct5 // (64 if D > 4096 else 128)
        self.ca = CrossAttention(D, Ct5, num_heads, for_attn_pool=True)

    def forward(self, ca_kv: tuple[torch.Tensor, torch.Tensor, int]) -> torch.Tensor:
        return self.ca(None, ca_kv).squeeze(1)


class FFN(nn.Module):
    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CrossAttnBlock(nn.Module):
    """Self-attention, cross-attention to the text, FFN; shared AdaLN modulates the first and last."""

    def __init__(self, embed_dim: int, num_heads: int, mlp_ratio: float, norm_eps: float):
        super().__init__()
        self.C, self.norm_eps = embed_dim, norm_eps
        self.sa = SelfAttention(embed_dim, num_heads)
        self.ca = CrossAttention(embed_dim, embed_dim, num_heads)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio / 256) * 256)
        self.ca_norm = FloatLayerNorm(embed_dim, eps=norm_eps)
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim**0.5)

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor, ca_kv: tuple, rope: torch.Tensor) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + cond_BD).unbind(2)
        x = x + self.sa(ada_layer_norm(x, scale1, shift1, self.norm_eps), rope).mul_(gamma1)
        x = x + self.ca(self.ca_norm(x), ca_kv).float()
        return x + self.ffn(ada_layer_norm(x, scale2, shift2, self.norm_eps)).mul(gamma2)


class MultipleLayers(nn.Module):
    """A chunk of blocks (the official checkpoints group their blocks in ``block_chunks``)."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.module = nn.ModuleList(blocks)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, D: int, norm_eps: float):
        super().__init__()
        self.C, self.norm_eps = C, norm_eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * C))

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return ada_layer_norm(x, scale, shift, self.norm_eps)


class SharedAdaLin(nn.Linear):
    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return super().forward(cond_BD).reshape(-1, 1, 6, self.weight.shape[0] // 6)


# ----------------------------------------------------------------------------- model

# Official constructor arguments that only matter for training or for kernels fastvar does not use.
TRAINING_OPTIONS = {
    "selecting_idx", "drop_rate", "drop_path_rate", "rms_norm", "head_aln", "cond_drop_rate", "rand_uncond",
    "cross_attn_layer_scale", "nm0", "tau", "cos_attn", "swiglu", "raw_scale_schedule", "head_depth", "top_p",
    "top_k", "customized_flash_attn", "fused_mlp", "fused_norm", "checkpointing", "pad_to_multiplier",
    "use_flex_attn", "batch_size", "pn", "train_h_div_w_list", "video_frames", "always_training_scales",
    "inference_mode",
}


class Infinity(nn.Module):
    """Text-conditional bitwise next-scale transformer.

    Only the configuration of the released checkpoints is implemented: shared AdaLN, cosine
    self-attention, 2-D RoPE normalised to the template's last scale (``rope2d_normalized_by_hw=2``),
    level embedding added before the first block, bit labels. Other keyword arguments of the official
    constructor are accepted and must keep those values; training-only ones are ignored.
    """

    def __init__(
        self, vae_local: nn.Module, text_channels: int = 2048, text_maxlen: int = 512, embed_dim: int = 2048,
        depth: int = 32, num_heads: int = 16, mlp_ratio: float = 4.0, norm_eps: float = 1e-6, shared_aln: bool = True,
        block_chunks: int = 1, add_lvl_embeding_only_first_block: int = 1, use_bit_label: int = 1,
        rope2d_each_sa_layer: int = 1, rope2d_normalized_by_hw: int = 2, apply_spatial_patchify: int = 0,
        **training_options,
    ):
        super().__init__()
        unknown = sorted(set(training_options) - TRAINING_OPTIONS)
        if unknown:
            raise TypeError(f"unknown Infinity argument(s) {unknown}")
        required = dict(shared_aln=True, add_lvl_embeding_only_first_block=1, use_bit_label=1, rope2d_each_sa_layer=1,
                        rope2d_normalized_by_hw=2)
        given = dict(shared_aln=shared_aln, add_lvl_embeding_only_first_block=add_lvl_embeding_only_first_block,
                     use_bit_label=use_bit_label, rope2d_each_sa_layer=rope2d_each_sa_layer,
                     rope2d_normalized_by_hw=rope2d_normalized_by_hw)
        unsupported = {k: v for k, v in given.items() if v != required[k]}
        if unsupported or depth % block_chunks:
            raise ValueError(f"unsupported Infinity options {unsupported} (supported: {required}, depth divisible "
                             f"by block_chunks; got depth={depth}, block_chunks={block_chunks})")
        self.config = dict(text_channels=text_channels, text_maxlen=text_maxlen, embed_dim=embed_dim, depth=depth,
                           num_heads=num_heads, mlp_ratio=mlp_ratio, norm_eps=norm_eps, block_chunks=block_chunks,
                           apply_spatial_patchify=apply_spatial_patchify)  # to rebuild it: Infinity(vae, **config)
        self.C = self.D = embed_dim
        self.depth, self.num_heads, self.norm_eps = depth, num_heads, norm_eps
        self.apply_spatial_patchify = apply_spatial_patchify
        self.d_vae = vae_local.codebook_dim * (4 if apply_spatial_patchify else 1)
        self.V = 2 * self.d_vae  # two logits per bit
        self.Ct5, self.text_maxlen = text_channels, text_maxlen
        self.rng = torch.Generator()
        self._rope_cache: dict[tuple, torch.Tensor] = {}

        self.cfg_uncond = nn.Parameter(torch.zeros(text_maxlen, text_channels))  # the learned null text
        self.text_norm = FastRMSNorm(text_channels, eps=norm_eps)
        self.text_proj_for_sos = TextAttentivePool(text_channels, embed_dim)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(text_channels, embed_dim), nn.GELU(approximate="tanh"),
                                              nn.Linear(embed_dim, embed_dim))
        self.pos_start = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.lvl_embed = nn.Embedding(15, embed_dim)
        self.word_embed = nn.Linear(self.d_vae, embed_dim)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(embed_dim, 6 * embed_dim))
        blocks = [CrossAttnBlock(embed_dim, num_heads, mlp_ratio, norm_eps) for _ in range(depth)]
        if block_chunks == 1:
            self.blocks = nn.ModuleList(blocks)
        else:
            per_chunk = depth // block_chunks
            self.block_chunks = nn.ModuleList(MultipleLayers(blocks[i : i + per_chunk])
                                              for i in range(0, depth, per_chunk))
        self.head_nm = AdaLNBeforeHead(embed_dim, embed_dim, norm_eps)
        self.head = nn.Linear(embed_dim, self.V)

    @property
    def unregistered_blocks(self) -> list[CrossAttnBlock]:
        """Every block in order, whatever the chunking."""
        if hasattr(self, "blocks"):
            return list(self.blocks)
        return [block for chunk in self.block_chunks for block in chunk.module]

    def rope(self, schedule: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """RoPE table of a schedule (cached), anchored to its template's 1M last scale."""
        device = self.pos_start.device
        key = (tuple(tuple(s) for s in schedule), device)
        if key not in self._rope_cache:
            _, h, w = schedule[-1]
            anchor = TEMPLATE_SCALES[nearest_template(h / w)][-1]
            self._rope_cache[key] = rope_table(schedule, self.C // self.num_heads, anchor).to(device)
        return self._rope_cache[key]

    def encode_text(self, label_B_or_BLT: tuple, negative_label_B_or_BLT: tuple | None, cfg: bool):
        """cond_BD (rows, C) and the cross-attention kv of the prompts, with the CFG rows appended."""
        kv_compact, lens, cu_seqlens_k, max_seqlen_k = label_B_or_BLT
        if cfg:
            if negative_label_B_or_BLT is None:
                kv_un = torch.cat([self.cfg_uncond[:n] for n in lens]).to(kv_compact.dtype)
                cu_un = cu_seqlens_k
            else:
                kv_un, _, cu_un, max_un = negative_label_B_or_BLT
                max_seqlen_k = max(max_seqlen_k, max_un)
            kv_compact = torch.cat((kv_compact, kv_un))
            cu_seqlens_k = torch.cat((cu_seqlens_k, cu_un[1:] + cu_seqlens_k[-1]))
        kv_compact = self.text_norm(kv_compact)
        cond_BD = self.text_proj_for_sos((kv_compact, cu_seqlens_k, max_seqlen_k))
        return cond_BD, (self.text_proj_for_ca(kv_compact), cu_seqlens_k, max_seqlen_k)

    def get_logits(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(h.float(), cond_BD.float()))

    @torch.no_grad()
    def autoregressive_infer_cfg(
        self, vae: nn.Module, scale_schedule: Sequence[tuple[int, int, int]], label_B_or_BLT: tuple,
        B: int = 1, negative_label_B_or_BLT: tuple | None = None, g_seed: int | None = None,
        cfg_list: Sequence[float] = (), tau_list: Sequence[float] = (), top_k: int = 0, top_p: float = 0.0,
        cfg_insertion_layer: Sequence[int] = (0,), vae_type: int = 0, ret_img: bool = False, trunk_scale: int = 1000,
        gt_leak: int = 0, gt_ls_Bl: Sequence[torch.Tensor] | None = None, progress: bool = False,
        on_scale_logits=None, guided_scales: int | None = None, on_scale: Callable[[int], None] | None = None,
        **official_options,
    ):
        """The official sampling call. cfg_list / tau_list: guidance and temperature per scale.
        cfg_insertion_layer: 0 mixes CFG on the logits, a negative i on the output of block depth+i.
        trunk_scale: only the scales before it run; the image is decoded from what they accumulated.
        gt_leak / gt_ls_Bl: the bits (B, h, w, d) of the first ``gt_leak`` scales are given instead of
        sampled (teacher forcing). ``on_scale(si)`` is called before the blocks run scale ``si`` (fastvar's
        patch learns the scale from it); ``on_scale_logits(si, logits)`` sees the logits handed to the sampler.
        From scale ``guided_scales`` on the unconditional rows are not run: those scales take the cfg-1
        path (the conditional logits alone) at half the batch.

        Returns ``([], bits, out)``: the (B, h, w, d) bits of every executed scale, and the image as
        upstream returns it (uint8 (B, H, W, 3), BGR) when ``ret_img``, else the codes (B, d, 1, H, W).
        """
        check_official_options(official_options)
        if vae_type == 0:
            raise ValueError("only bit-label VAEs (vae_type = codebook_dim) are supported")
        K = len(scale_schedule)
        if len(cfg_list) < K or len(tau_list) < K:
            raise ValueError(f"cfg_list and tau_list need one entry per scale ({K}), got {len(cfg_list)}, "
                             f"{len(tau_list)}")
        check_sampling(B, top_k, top_p, list(cfg_list[:K]), list(tau_list[:K]))
        if len(label_B_or_BLT[1]) != B:
            raise ValueError(f"label_B_or_BLT packs {len(label_B_or_BLT[1])} prompts for B = {B} images")
        num_scales = min(K, trunk_scale)
        device = self.pos_start.device
        rng = None if g_seed is None else generator_on(self, device).manual_seed(g_seed)
        patchify = self.apply_spatial_patchify
        vae_schedule = [(t, 2 * h, 2 * w) for t, h, w in scale_schedule] if patchify else list(scale_schedule)

        use_cfg = any(c != 1 for c in cfg_list)
        rows = 2 * B if use_cfg else B
        cond_BD, ca_kv = self.encode_text(label_B_or_BLT, negative_label_B_or_BLT, use_cfg)
        x = cond_BD.unsqueeze(1).expand(rows, 1, -1) + self.pos_start.expand(rows, 1, -1)
        cond = self.shared_ada_lin(cond_BD.float()).float().contiguous()
        blocks = self.unregistered_blocks
        mix_layers = {len(blocks) + i for i in cfg_insertion_layer if i < 0}
        rope = self.rope(scale_schedule)
        summed_codes, begin, bits_list = 0, 0, []

        for block in blocks:
            block.sa.kv_caching(True, capacity=sum(t * h * w for t, h, w in scale_schedule[:num_scales - 1]))
        scales = tqdm(range(num_scales), desc="scales", leave=False) if progress else range(num_scales)
        for si in scales:
            t, h, w = scale_schedule[si]
            if si == guided_scales and rows > B:  # the unconditional rows stop here
                rows, x, cond, cond_BD = B, x[:B], cond[:B], cond_BD[:B]
                kv, cu_seqlens_k, max_seqlen_k = ca_kv
                ca_kv = (kv[: cu_seqlens_k[B]], cu_seqlens_k[: B + 1], max_seqlen_k)
            cfg, n = (cfg_list[si] if rows > B else 1), t * h * w
            x[:, :n] += self.lvl_embed(torch.full((rows, n), si, dtype=torch.int, device=device))
            scale_rope = rope[:, begin : begin + n]
            if on_scale is not None:
                on_scale(si)
            for layer, block in enumerate(blocks):
                x = block(x, cond, ca_kv, scale_rope)
                if cfg != 1 and layer in mix_layers:
                    x = cfg * x[:B] + (1 - cfg) * x[B:]
                    x = torch.cat((x, x))
            begin += n
            if cfg != 1 and 0 in cfg_insertion_layer:
                logits = self.get_logits(x, cond_BD).mul(1 / tau_list[si])
                logits = cfg * logits[:B] + (1 - cfg) * logits[B:]
            else:
                logits = self.get_logits(x[:B], cond_BD[:B]).mul(1 / tau_list[si])
            logits = logits.reshape(B, -1, 2)
            if on_scale_logits is not None:
                on_scale_logits(si, logits)
            bits = sample_with_top_k_top_p_(logits, top_k=top_k, top_p=top_p, rng=rng).reshape(B, h, w, -1)
            if si < gt_leak:
                bits = gt_ls_Bl[si]
            bits_list.append(bits)
            codes = vae.bits_to_codes(bits)  # (B, d, 1, h, w); 2h x 2w with spatial patchify
            if si == K - 1:
                summed_codes = summed_codes + codes
                break
            summed_codes = summed_codes + F.interpolate(codes, size=vae_schedule[-1], mode="trilinear")
            if si + 1 < num_scales:
                nxt = F.interpolate(summed_codes, size=vae_schedule[si + 1], mode="trilinear").squeeze(-3)
                if patchify:
                    nxt = F.pixel_unshuffle(nxt, 2)
                x = self.word_embed(nxt.flatten(2).transpose(1, 2)).repeat(rows // B, 1, 1)
        for block in blocks:
            block.sa.kv_caching(False)
        if not ret_img:
            return [], bits_list, summed_codes
        image = (vae.decode(summed_codes.squeeze(-3)) + 1) / 2
        return [], bits_list, image.permute(0, 2, 3, 1).mul_(255).to(torch.uint8).flip(dims=(3,))


# ----------------------------------------------------------------------------- sampling options

# Official sampling arguments for paths fastvar does not implement: accepted at these values only.
UNIMPLEMENTED_OPTIONS = dict(force_gt_Bhw=None, ratio_Bl1=None, gumbel=0, norm_cfg=False, cfg_exp_k=0.0,
                             softmax_merge_topk=-1, sampling_per_bits=1)
IGNORED_OPTIONS = {"cfg_sc", "returns_vemb", "inference_mode", "save_img_path"}  # no effect on sampling


def check_official_options(options: dict) -> None:
    unknown = sorted(set(options) - set(UNIMPLEMENTED_OPTIONS) - IGNORED_OPTIONS)
    if unknown:
        raise TypeError(f"unknown autoregressive_infer_cfg argument(s) {unknown}")
    changed = {k: v for k, v in options.items() if k in UNIMPLEMENTED_OPTIONS and v != UNIMPLEMENTED_OPTIONS[k]}
    if changed:
        raise ValueError(f"unsupported sampling options {changed}; only {UNIMPLEMENTED_OPTIONS} are implemented")


# ----------------------------------------------------------------------------- official configurations

OFFICIAL = {
    # name: transformer arguments, VAE (codebook_dim, spatial_patchify)
    "infinity-2b": (dict(depth=32, embed_dim=2048, num_heads=16, block_chunks=8), (32, False)),
    "infinity-8b": (dict(depth=40, embed_dim=3584, num_heads=28, block_chunks=8, apply_spatial_patchify=1), (14, True)),
}


def build(name: str = "infinity-2b", depth: int | None = None) -> tuple[Infinity, BSQVAE]:
    """The official architecture ``name`` with random weights; ``depth`` keeps the width and cuts the
    blocks (for timing the full schedule on small machines)."""
    if name not in OFFICIAL:
        raise ValueError(f"unknown Infinity model {name!r}; available: {list(OFFICIAL)}")
    kwargs, (codebook_dim, patchify) = OFFICIAL[name]
    kwargs = dict(kwargs)
    if depth is not None:
        if not 1 <= depth <= kwargs["depth"]:
            raise ValueError(f"depth must be in 1..{kwargs['depth']} for {name}, got {depth}")
        kwargs.update(depth=depth, block_chunks=math.gcd(depth, kwargs["block_chunks"]))
    vae = official_vae(codebook_dim, spatial_patchify=patchify)
    return Infinity(vae, text_channels=2048, **kwargs), vae
