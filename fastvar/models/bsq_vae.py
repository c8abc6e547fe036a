"""BSQ-VAE: the binary spherical quantization image tokenizer of Infinity (FoundationVision/Infinity).

Generation uses only the decoding side. The transformer predicts, at every scale, one bit per latent
channel and position; ``BSQVAE.bits_to_codes`` turns the bits into codes, the sampling loop sums every
scale's codes at the last scale's resolution, and ``BSQVAE.decode`` turns the sum into an image.
``state_dict()`` has the keys, shapes and buffers of the official ``AutoEncoder``'s (encoder, decoder
and the codebook's bit mask), so its state dicts load strictly. The encoder is kept for those keys and
because it is small; the multi-scale residual quantization that trains the tokenizer is left out.

The file reads top to bottom: conv building blocks, encoder, decoder, codebook, the autoencoder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- building blocks


def swish(x: torch.Tensor) -> torch.Tensor:
    # Spelled as upstream computes it; F.silu rounds differently in the last float32 bit.
    return x * torch.sigmoid(x)


class Conv(nn.Module):
    """A Conv2d one level down, so that keys read ``….conv.weight`` as in the official checkpoints."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Normalize(nn.Module):
    """GroupNorm (32 groups, or 24 where 32 does not divide the channels), keys ``….norm.weight``."""

    def __init__(self, channels: int):
        super().__init__()
        groups = 32 if channels % 32 == 0 else 24
        if channels % groups:
            raise ValueError(f"GroupNorm needs channels divisible by 32 or 24, got {channels}")
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = Conv(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = Conv(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = Conv(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return self.nin_shortcut(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv; the padding is on the right and bottom only, as in the official tokenizer."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


# ----------------------------------------------------------------------------- encoder and decoder


class Encoder(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> continuous latent (B, z_channels, H/p, W/p), p = patch_size.

    Level ``i`` halves the resolution while ``i < log2(patch_size)``.
    """

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, patch_size: int):
        super().__init__()
        num_down = int(math.log2(patch_size))
        self.conv_in = Conv(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
            if i < num_down:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = Conv(block_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.block_1(h))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, 3, h*p, w*p), unclamped.

    ``up`` is indexed by level (0 = full resolution) and run from the deepest level; level ``i``
    doubles the resolution after its blocks while ``1 <= i <= log2(patch_size)``.
    """

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, patch_size: int):
        super().__init__()
        num_up = int(math.log2(patch_size))
        block_in = ch * ch_mult[-1]
        self.conv_in = Conv(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        stages = []
        for i in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, ch * ch_mult[i]))
                block_in = ch * ch_mult[i]
            if 1 <= i <= num_up:
                stage.upsample = Upsample(block_in)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = Normalize(block_in)
        self.conv_out = Conv(block_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


# ----------------------------------------------------------------------------- codebook


class BinarySphericalCodebook(nn.Module):
    """BSQ's implicit codebook: ``dim`` bits name the corner ``(2*bits - 1) / sqrt(dim)`` of the cube
    inscribed in the unit sphere. ``mask`` (bit weights, most significant first) only converts bits to
    integer indices; it is a buffer because the official checkpoints carry it."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("mask", 2 ** torch.arange(dim - 1, -1, -1))

    def forward(self, bits: torch.Tensor) -> torch.Tensor:
        """Bits (..., dim) of 0/1 -> float32 codes (..., dim) of norm 1."""
        scale = 1 / math.sqrt(self.dim)
        codes = (2 * bits.float() - 1) * scale
        # Upstream normalizes the already unit-norm corner once more. In float32 that can move the values
        # by an ulp (d = 14, 32; a no-op when d is a power of 4), so do the same.
        return F.normalize(codes, dim=-1)


class MultiScaleBSQ(nn.Module):
    """Holds the codebook under the official key path ``quantizer.lfq``. The encoder-side residual
    quantization over scales is training and reconstruction machinery and is not implemented."""

    def __init__(self, dim: int):
        super().__init__()
        self.lfq = BinarySphericalCodebook(dim)


# ----------------------------------------------------------------------------- autoencoder


class BSQVAE(nn.Module):
    """Infinity's BSQ-VAE with the official ``AutoEncoder``'s state-dict keys.

    Arguments (official names in brackets):

    * ``codebook_dim`` [``codebook_dim``, ``vae_type``]: latent channels = bits per latent position;
      the codebook has ``2**codebook_dim`` entries (upstream's ``codebook_size``, always that power).
    * ``patch_size`` [``patch_size``]: pixels per latent position along each side.
    * ``base_ch``, ``ch_mult``, ``num_res_blocks`` [``base_ch``, ``encoder_ch_mult`` = ``decoder_ch_mult``,
      ``num_res_blocks``]: conv widths and depth.
    * ``spatial_patchify`` [the transformer's ``apply_spatial_patchify``]: the transformer predicts each
      2x2 block of latent positions as one token of ``4 * codebook_dim`` bits; ``bits_to_codes`` then
      undoes that packing. It does not change the weights.

    The official checkpoints (``load_visual_tokenizer`` in ``tools/run_infinity.py``, with the
    ``vae_model`` defaults ``base_ch=128``, ``num_res_blocks=2``) are built by ``official_vae``:

    * Infinity-2B, ``infinity_vae_d32reg.pth``: ``codebook_dim=32, patch_size=16, ch_mult=(1, 2, 4, 4, 4)``;
      the other patch-16 tokenizers (``infinity_vae_d16/d24/d32/d64.pth``) differ only in ``codebook_dim``.
    * Infinity-8B, ``infinity_vae_d56_f8_14_patchify.pth``: ``codebook_dim=14, patch_size=8,
      ch_mult=(1, 2, 4, 4), spatial_patchify=True`` (56 = 4 * 14 bits per transformer token).
    """

    derived_buffers = ("quantize.lfq.mask", "quantizer.lfq.mask")  # a constant of codebook_dim

    def __init__(
        self, codebook_dim: int = 32, patch_size: int = 16, base_ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4, 4), num_res_blocks: int = 2, spatial_patchify: bool = False,
    ):
        super().__init__()
        self.config = dict(codebook_dim=codebook_dim, patch_size=patch_size, base_ch=base_ch, ch_mult=tuple(ch_mult),
                           num_res_blocks=num_res_blocks, spatial_patchify=spatial_patchify)  # BSQVAE(**config)
        self.codebook_dim = codebook_dim
        self.patch_size = patch_size
        self.spatial_patchify = spatial_patchify
        arch = dict(ch=base_ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=codebook_dim,
                    patch_size=patch_size)
        self.encoder = Encoder(**arch)
        self.decoder = Decoder(**arch)
        self.quantizer = MultiScaleBSQ(codebook_dim)
        self.quantize = self.quantizer  # the official model registers it under both names (two mask keys)

    @property
    def bits_per_token(self) -> int:
        """Bits the transformer predicts per token (its ``d_vae``)."""
        return 4 * self.codebook_dim if self.spatial_patchify else self.codebook_dim

    def bits_to_codes(self, bits: torch.Tensor) -> torch.Tensor:
        """Bit labels (B, h, w, bits_per_token) of 0/1 -> codes (B, codebook_dim, 1, h', w'), float32.

        Each code vector is ``(2*bits - 1) / sqrt(codebook_dim)`` (unit norm). With ``spatial_patchify``
        a token's bits are a 2x2 block of positions (pixel shuffle), so ``(h', w') = (2h, 2w)``;
        otherwise ``(h, w)``. The singleton axis is the time axis upstream carries through accumulation.
        """
        if bits.ndim != 4 or bits.shape[-1] != self.bits_per_token:
            raise ValueError(f"expected bits (B, h, w, {self.bits_per_token}), got {tuple(bits.shape)}")
        if self.spatial_patchify:
            bits = F.pixel_shuffle(bits.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        codes = self.quantizer.lfq(bits)  # (B, h, w, d)
        return codes.permute(0, 3, 1, 2).unsqueeze(2)

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename plain ``nn.Conv2d`` / ``nn.GroupNorm`` keys (``x.weight``) to this model's wrapped
        spelling (``x.conv.weight``, ``x.norm.weight``): the official loader accepts both."""
        own = self.state_dict().keys()
        renamed = {}
        for key, value in state_dict.items():
            stem, _, leaf = key.rpartition(".")
            wrapped = [f"{stem}.{inner}.{leaf}" for inner in ("conv", "norm") if f"{stem}.{inner}.{leaf}" in own]
            renamed[wrapped[0] if key not in own and wrapped else key] = value
        return renamed

    def decode(self, summed_codes: torch.Tensor) -> torch.Tensor:
        """Latent (B, codebook_dim, H, W), or (B, codebook_dim, 1, H, W) as accumulated from
        ``bits_to_codes``, -> image (B, 3, H*patch_size, W*patch_size) in [-1, 1], RGB.

        The decoder runs channels-last whatever layout the latent has: upstream's accumulated codes are
        a permuted view of (B, h, w, d) bits, hence channels-last, and the convolutions and group norms
        round differently in that layout (up to ~1e-4 on the image on CPU).
        """
        if summed_codes.ndim == 5:
            if summed_codes.shape[2] != 1:
                raise ValueError(f"expected a single time step, got latent shape {tuple(summed_codes.shape)}")
            summed_codes = summed_codes.squeeze(2)
        return self.decoder(summed_codes.contiguous(memory_format=torch.channels_last)).clamp(-1, 1)


def official_vae(codebook_dim: int = 32, spatial_patchify: bool = False) -> BSQVAE:
    """The architecture of an official Infinity tokenizer, random weights (see ``BSQVAE``):
    ``official_vae(32)`` for Infinity-2B, ``official_vae(14, spatial_patchify=True)`` for Infinity-8B."""
    if spatial_patchify:
        return BSQVAE(codebook_dim, patch_size=8, ch_mult=(1, 2, 4, 4), spatial_patchify=True)
    return BSQVAE(codebook_dim, patch_size=16, ch_mult=(1, 2, 4, 4, 4))
