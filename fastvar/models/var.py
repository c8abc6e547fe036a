"""VAR: class-conditional next-scale prediction (FoundationVision/VAR), and its multi-scale VQVAE.

State-dict keys and constructor keyword arguments are those of the official code, so the official
checkpoints (``var_d16.pth`` ... ``var_d36.pth``, ``vae_ch160v4096z32.pth``) load as they are.
The file reads top to bottom: the VQVAE (conv blocks, encoder, decoder, quantizer), then the
transformer (attention, FFN, block, VAR), then sampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastvar.attention import attention
from fastvar.models.kv_cache import KVCache, reserve_kv
from fastvar.models.sampling import check_sampling, generator_on, sample_with_top_k_top_p_

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)

# ----------------------------------------------------------------------------- VQVAE


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention of the VQVAE's lowest resolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)
        # Contiguous operands: the batched matmul then rounds as the official code does.
        w = torch.bmm(q.permute(0, 2, 1).contiguous(), k.contiguous()).mul_(C**-0.5).softmax(dim=2)  # (B, HWq, HWk)
        h = torch.bmm(v.contiguous(), w.permute(0, 2, 1).contiguous()).view(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, in_channels: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
                if level == len(ch_mult) - 1:
                    stage.attn.append(AttnBlock(block_in))
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, out_channels: int = 3):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        stages = []
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, ch * ch_mult[level]))
                block_in = ch * ch_mult[level]
                if level == len(ch_mult) - 1:
                    stage.attn.append(AttnBlock(block_in))
            if level != 0:
                stage.upsample = Upsample(block_in)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)  # indexed by level, run from the deepest
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """Residual refinement of a token map: ``(1 - r) * h + r * conv3x3(h)``."""

    def __init__(self, channels: int, resi_ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.resi_ratio = abs(resi_ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul_(self.resi_ratio)


class PhiPartiallyShared(nn.Module):
    """K Phi convs shared by all scales: scale ``si`` of ``SN`` uses the one whose tick is nearest ``si/(SN-1)``."""

    def __init__(self, channels: int, resi_ratio: float, count: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, resi_ratio) for _ in range(count))
        margin = 1 / 3 / count if count == 4 else 1 / 2 / count
        self.ticks = np.linspace(margin, 1 - margin, count)

    def __getitem__(self, at_from_0_to_1: float) -> Phi:
        return self.qresi_ls[int(np.argmin(np.abs(self.ticks - at_from_0_to_1)))]


class VectorQuantizer2(nn.Module):
    """Multi-scale residual quantizer; inference needs only the codebook and the Phi convs."""

    def __init__(
        self, vocab_size: int, Cvae: int, v_patch_nums: Sequence[int], quant_resi: float, share_quant_resi: int
    ):
        super().__init__()
        if share_quant_resi < 2 or abs(quant_resi) < 1e-6:
            raise ValueError(
                f"share_quant_resi={share_quant_resi}, quant_resi={quant_resi} is not supported; "
                "accepted: share_quant_resi >= 2 (official: 4) with a non-zero quant_resi (official: 0.5)"
            )
        self.vocab_size, self.Cvae = vocab_size, Cvae
        self.v_patch_nums = tuple(v_patch_nums)
        self.quant_resi = PhiPartiallyShared(Cvae, quant_resi, share_quant_resi)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.v_patch_nums), vocab_size))
        self.embedding = nn.Embedding(vocab_size, Cvae)

    def phi(self, si: int, num_scales: int) -> Phi:
        return self.quant_resi[si / (num_scales - 1)]

    def get_next_autoregressive_input(
        self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add scale ``si``'s token map to ``f_hat`` (in place); return it and the next scale's input map."""
        final = self.v_patch_nums[-1]
        if si == SN - 1:
            f_hat.add_(self.phi(si, SN)(h_BChw))
            return f_hat, f_hat
        f_hat.add_(self.phi(si, SN)(F.interpolate(h_BChw, size=(final, final), mode="bicubic")))
        nxt = self.v_patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(nxt, nxt), mode="area")

    def idxBl_to_var_input(self, gt_ms_idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input (B, L - first_l, Cvae) of ground-truth token indices at every scale."""
        B, SN, final = gt_ms_idx_Bl[0].shape[0], len(self.v_patch_nums), self.v_patch_nums[-1]
        f_hat = torch.zeros(B, self.Cvae, final, final, device=gt_ms_idx_Bl[0].device)
        inputs = []
        for si in range(SN - 1):
            pn, nxt = self.v_patch_nums[si], self.v_patch_nums[si + 1]
            h = self.embedding(gt_ms_idx_Bl[si]).transpose_(1, 2).view(B, self.Cvae, pn, pn)
            f_hat.add_(self.phi(si, SN)(F.interpolate(h, size=(final, final), mode="bicubic")))
            inputs.append(F.interpolate(f_hat, size=(nxt, nxt), mode="area").view(B, self.Cvae, -1).transpose(1, 2))
        return torch.cat(inputs, dim=1)


class VQVAE(nn.Module):
    """The VAR tokenizer. Keyword arguments as upstream; ``dropout``, ``beta``, ``using_znorm`` and
    ``default_qresi_counts`` only matter for tokenizer training and are accepted for compatibility."""

    def __init__(
        self, vocab_size: int = 4096, z_channels: int = 32, ch: int = 128, dropout: float = 0.0, beta: float = 0.25,
        using_znorm: bool = False, quant_conv_ks: int = 3, quant_resi: float = 0.5, share_quant_resi: int = 4,
        default_qresi_counts: int = 0, v_patch_nums: Sequence[int] = PATCH_NUMS_256, test_mode: bool = True,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
    ):
        super().__init__()
        self.V = self.vocab_size = vocab_size
        self.Cvae = z_channels
        arch = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=2, z_channels=z_channels)
        self.encoder = Encoder(**arch)
        self.decoder = Decoder(**arch)
        self.quantize = VectorQuantizer2(vocab_size, z_channels, v_patch_nums, quant_resi, share_quant_resi)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, padding=quant_conv_ks // 2)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, padding=quant_conv_ks // 2)
        if test_mode:
            self.eval().requires_grad_(False)

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Decode an accumulated latent to an image in [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    def img_to_f(self, img: torch.Tensor) -> torch.Tensor:
        """Encode an image in [-1, 1] to the continuous latent the quantizer takes."""
        return self.quant_conv(self.encoder(img))


# ----------------------------------------------------------------------------- transformer


class SelfAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, attn_l2_norm: bool, flash_if_available: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:  # cosine attention with a learned per-head temperature, clamped at 100
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = torch.log(torch.tensor(100.0, device="cpu")).item()  # float32 log, as upstream
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.using_flash = flash_if_available
        self.kv_cache: KVCache | None = None

    def kv_caching(self, enable: bool, capacity: int | None = None) -> None:
        """Start caching keys and values (for ``capacity`` tokens, if known), or stop and free the cache."""
        self.kv_cache = KVCache(capacity) if enable else None

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, head_dim)
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp())
            k = F.normalize(k, dim=-1)
        if self.kv_cache is not None:
            k, v = self.kv_cache.append(k, v)
        out = attention(q, k, v, scale=self.scale, mask=attn_bias, use_flash=self.using_flash)
        return self.proj(out)


class FFN(nn.Module):
    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AdaLNSelfAttn(nn.Module):
    """Transformer block whose LayerNorms are modulated by the class condition (AdaLN)."""

    def __init__(self, embed_dim: int, num_heads: int, mlp_ratio: float, norm_eps: float, shared_aln: bool,
                 attn_l2_norm: bool, flash_if_available: bool):
        super().__init__()
        self.C = embed_dim
        self.attn = SelfAttention(embed_dim, num_heads, attn_l2_norm, flash_if_available)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 6 * embed_dim))

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        if self.shared_aln:
            gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + cond_BD).unbind(2)
        else:
            gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        x = x + self.attn(self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1), attn_bias=attn_bias).mul_(gamma1)
        return x + self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)).mul(gamma2)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, D: int, norm_eps: float):
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * C))

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


class SharedAdaLin(nn.Linear):
    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return super().forward(cond_BD).view(-1, 1, 6, self.weight.shape[0] // 6)


class VAR(nn.Module):
    """Class-conditional next-scale prediction transformer.

    Keyword arguments as upstream. ``drop_rate``, ``attn_drop_rate``, ``drop_path_rate`` and
    ``fused_if_available`` are training options, accepted and not applied: this is an inference model.
    The VQVAE is held outside the module tree (``vae_proxy``), as upstream, so ``state_dict`` matches
    the official checkpoints; ``.to()`` moves it along.
    """

    derived_buffers = ("attn_bias_for_masking",)  # a constant of the schedule; some checkpoints leave it out

    def __init__(
        self, vae_local: VQVAE, num_classes: int = 1000, depth: int = 16, embed_dim: int = 1024, num_heads: int = 16,
        mlp_ratio: float = 4.0, drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6, shared_aln: bool = False, cond_drop_rate: float = 0.1, attn_l2_norm: bool = False,
        patch_nums: Sequence[int] = PATCH_NUMS_256, flash_if_available: bool = True, fused_if_available: bool = True,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.Cvae, self.V = vae_local.Cvae, vae_local.vocab_size
        self.depth, self.C = depth, embed_dim
        self.num_classes, self.cond_drop_rate = num_classes, cond_drop_rate
        self.patch_nums = tuple(patch_nums)
        self.L = sum(pn * pn for pn in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.rng = torch.Generator()
        self.vae_proxy = (vae_local,)
        self.vae_quant_proxy = (vae_local.quantize,)

        std = math.sqrt(1 / embed_dim / 3)
        self.word_embed = nn.Linear(self.Cvae, embed_dim)
        self.class_emb = nn.Embedding(num_classes + 1, embed_dim)  # the last row is the null class
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, embed_dim))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, embed_dim))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), embed_dim)
        for p in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(p.data, std=std)

        self.shared_ada_lin = (
            nn.Sequential(nn.SiLU(), SharedAdaLin(embed_dim, 6 * embed_dim)) if shared_aln else nn.Identity()
        )
        self.blocks = nn.ModuleList(
            AdaLNSelfAttn(embed_dim, num_heads, mlp_ratio, norm_eps, shared_aln, attn_l2_norm, flash_if_available)
            for _ in range(depth)
        )
        scale_of_token = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(self.patch_nums)]).view(1, self.L)
        self.register_buffer("lvl_1L", scale_of_token)
        causal = scale_of_token[0, :, None] >= scale_of_token[0, None, :]  # a token sees its scale and earlier ones
        self.register_buffer("attn_bias_for_masking", torch.where(causal, 0.0, -torch.inf).view(1, 1, self.L, self.L))
        self.head_nm = AdaLNBeforeHead(embed_dim, embed_dim, norm_eps)
        self.head = nn.Linear(embed_dim, self.V)

    def _apply(self, fn, recurse=True):
        self.vae_proxy[0]._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def get_logits(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(h.float(), cond_BD).float()).float()

    @torch.no_grad()
    def autoregressive_infer_cfg(
        self, B: int, label_B: torch.Tensor | int | None, g_seed: int | None = None, cfg: float = 1.5,
        top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False, progress: bool = False,
    ) -> torch.Tensor:
        """Sample B images (B, 3, H, W) in [0, 1] with classifier-free guidance, as upstream
        (``progress`` adds a bar over scales)."""
        return generate(self, B, label_B, g_seed=g_seed, cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth,
                        progress=progress)

    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, L, V). Labels are dropped to the null class with ``cond_drop_rate``,
        drawn from torch's global generator, in eval mode too (as upstream)."""
        B = x_BLCv_wo_first_l.shape[0]
        label_B = torch.where(torch.rand(B, device=label_B.device) < self.cond_drop_rate, self.num_classes, label_B)
        sos = cond_BD = self.class_emb(label_B)
        sos = sos.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
        x = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
        x += self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC
        cond = self.shared_ada_lin(cond_BD)
        for block in self.blocks:
            x = block(x=x, cond_BD=cond, attn_bias=self.attn_bias_for_masking)
        return self.get_logits(x.float(), cond_BD)


OFFICIAL_DEPTHS = (16, 20, 24, 30, 36)


def build(depth: int = 16, patch_nums: Sequence[int] | None = None, vae_ch: int = 160) -> tuple[VQVAE, VAR]:
    """The official architecture for ``depth`` (width 64·depth, depth heads); d36 is the shared-AdaLN
    512 px model. Weights are random: load a checkpoint or use it for timing."""
    if depth < 1:
        raise ValueError(f"depth must be positive, got {depth}; the official depths are {OFFICIAL_DEPTHS}")
    if patch_nums is None:
        patch_nums = PATCH_NUMS_512 if depth == 36 else PATCH_NUMS_256
    vae = VQVAE(vocab_size=4096, z_channels=32, ch=vae_ch, share_quant_resi=4, v_patch_nums=patch_nums)
    var = VAR(
        vae, depth=depth, embed_dim=64 * depth, num_heads=depth, drop_path_rate=0.1 * depth / 24,
        shared_aln=depth == 36, attn_l2_norm=True, patch_nums=patch_nums,
    )
    return vae, var


# ----------------------------------------------------------------------------- sampling


def gumbel_softmax(logits: torch.Tensor, tau: float, rng: torch.Generator | None) -> torch.Tensor:
    gumbels = -torch.empty_like(logits).exponential_(generator=rng).log()
    return ((logits + gumbels) / tau).softmax(dim=-1)


def check_labels(label_B: torch.Tensor | int | None, B: int, num_classes: int) -> None:
    """Class ids must name a class: ``0..num_classes-1``, one per image (an int, or None to draw them).
    Upstream's ``label_B = -1`` (an int) still asks for unconditional images."""
    if label_B is None or (isinstance(label_B, int) and not isinstance(label_B, bool) and label_B < 0):
        return
    ids = torch.as_tensor(label_B)
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.ndim > 1:
        raise ValueError(f"label_B must be an int or a 1-D tensor of int class ids, got {label_B!r}")
    if ids.ndim == 1 and ids.numel() != B:
        raise ValueError(f"label_B has {ids.numel()} class ids for B = {B} images")
    outside = ids[(ids < 0) | (ids >= num_classes)]
    if outside.numel():
        raise ValueError(f"class id {outside[0].item()} is out of range: this VAR has classes 0..{num_classes - 1} "
                         "(label_B=-1 samples unconditional images)")


@torch.no_grad()
def generate(
    var: nn.Module, B: int, label_B: torch.Tensor | int | None, g_seed: int | None = None, cfg: float = 1.5,
    top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False, progress: bool = False, *,
    num_scales: int | None = None, guided_scales: int | None = None, on_scale: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """The VAR sampling loop, on fastvar's VAR or the upstream object (same attributes).

    ``num_scales`` < K runs only the first scales and decodes what they accumulated (scale skipping).
    From scale ``guided_scales`` on only the conditional rows run, sampled from their own logits (guidance
    weight 0); that needs fastvar's attention, whose cache continues the conditional rows.
    ``on_scale(si)`` is called before the blocks run scale ``si`` (fastvar's patch learns the scale from it).
    One generator seeded with ``g_seed`` feeds, per scale, the token draw then the Gumbel draw.
    """
    check_sampling(B, top_k, top_p, cfg)
    check_labels(label_B, B, var.num_classes)
    K = len(var.patch_nums)
    num_scales = K if num_scales is None else num_scales
    guided_scales = K if guided_scales is None else guided_scales
    if guided_scales < num_scales and not all(isinstance(b.attn, SelfAttention) for b in var.blocks):
        raise ValueError("turning guidance off at late scales needs fastvar's VAR (fastvar.models.var), whose KV "
                         "cache goes on with the conditional rows alone; this model's attention is not fastvar's")
    device = var.lvl_1L.device
    rng = None if g_seed is None else generator_on(var, device).manual_seed(g_seed)
    if label_B is None:
        uniform = torch.full((1, var.num_classes), 1.0 / var.num_classes, device=device)
        label_B = torch.multinomial(uniform, num_samples=B, replacement=True, generator=rng).reshape(B)
    elif isinstance(label_B, int):
        label_B = torch.full((B,), var.num_classes if label_B < 0 else label_B, device=device)
    else:
        label_B = label_B.to(device)
    quant, vae = var.vae_quant_proxy[0], var.vae_proxy[0]

    sos = cond_BD = var.class_emb(torch.cat((label_B, torch.full_like(label_B, var.num_classes))))
    lvl_pos = var.lvl_embed(var.lvl_1L) + var.pos_1LC
    x = sos.unsqueeze(1).expand(2 * B, var.first_l, -1) + var.pos_start.expand(2 * B, var.first_l, -1)
    x = x + lvl_pos[:, : var.first_l]
    f_hat = sos.new_zeros(B, var.Cvae, var.patch_nums[-1], var.patch_nums[-1])
    begin = 0

    for block in var.blocks:
        block.attn.kv_caching(True)
        reserve_kv(block.attn, sum(pn * pn for pn in var.patch_nums[:num_scales - 1]))
    bar = tqdm(total=num_scales + 1, desc="scales", disable=not progress, leave=False)  # the scales, then decoding
    for si in range(num_scales):
        pn, ratio = var.patch_nums[si], si / (K - 1)
        begin += pn * pn
        if si == guided_scales:  # the unconditional rows stop here
            x, cond_BD = x[:B], cond_BD[:B]
        cond = var.shared_ada_lin(cond_BD)
        if on_scale is not None:
            on_scale(si)
        for block in var.blocks:
            x = block(x=x, cond_BD=cond, attn_bias=None)
        logits = var.get_logits(x, cond_BD)
        if si < guided_scales:
            t = cfg * ratio
            logits = (1 + t) * logits[:B] - t * logits[B:]
        idx = sample_with_top_k_top_p_(logits, top_k=top_k, top_p=top_p, rng=rng)
        if more_smooth:  # the soft, Gumbel-weighted codebook mix; idx is drawn but unused
            tau = max(0.27 * (1 - ratio * 0.95), 0.005)
            h = gumbel_softmax(logits.mul(1 + ratio), tau, rng) @ quant.embedding.weight.unsqueeze(0)
        else:
            h = quant.embedding(idx)
        h = h.transpose_(1, 2).reshape(B, var.Cvae, pn, pn)
        f_hat, next_map = quant.get_next_autoregressive_input(si, K, f_hat, h)
        if si + 1 < num_scales:
            nxt = var.patch_nums[si + 1]
            x = var.word_embed(next_map.view(B, var.Cvae, -1).transpose(1, 2)) + lvl_pos[:, begin : begin + nxt * nxt]
            if si + 1 < guided_scales:
                x = x.repeat(2, 1, 1)  # both CFG halves get the same input
        bar.update()
    for block in var.blocks:
        block.attn.kv_caching(False)
    bar.set_description("decoding")
    image = vae.fhat_to_img(f_hat).add_(1).mul_(0.5)
    bar.update()
    bar.close()
    return image
