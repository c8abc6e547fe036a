"""InfinityStar's video VAE, decoding side (``AutoencoderKLCogVideoX`` in FoundationVision/InfinityStar).

The transformer of InfinityStar sums its codes into a latent video z of shape (B, 64, T, H, W); ``VideoVAE.decode``
turns it into frames (B, 3, 1 + 4(T-1), 16H, 16W): the first latent frame becomes one frame (the video's first
frame, or the image), every later latent frame four. The decoder is CogVideoX-style: causal 3-D convolutions
(each output frame sees only the current and earlier frames), normalisations conditioned on the latent
("spatial norms"), and depth-to-space ("DC") up-samplers.

``state_dict()`` has the official decoder-side keys (``scale_learnable_parameters``, ``proj_up.*``, ``decoder.*``);
``VideoVAE.adapt_state_dict`` drops the encoder side of a full official state dict, so ``fastvar.hub.load_checkpoint``
loads it strictly.

The file reads in the order data flows: configuration, conv and norm building blocks, blocks, decoder, autoencoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# A causal conv's last input frames, per conv, handed from one chunk of latent frames to the next.
ConvCache = dict[nn.Module, torch.Tensor]


@dataclass(frozen=True)
class VideoVAEConfig:
    """Decoder sizes; the defaults are the official ``infinitystar_videovae.pth`` (``video_vae_model()``).

    Upstream names in brackets. ``block_out_channels`` [same] lists the widths from the output end: the decoder
    runs them reversed, one up block per adjacent pair, so it has ``len(block_out_channels) - 1`` up blocks, each
    with ``layers_per_block + 1`` residual blocks. The last ``spatial_upsamplings`` up blocks double height and
    width [``len(spatial_compression_list)``]; the last ``temporal_upsamplings`` also double time
    [``len(temporal_compression_list)``, whose entries are all 2]. ``latent_channels`` [same] is the decoder's
    input width; InfinityStar's codes pack 2x2 latent positions into ``4 * latent_channels`` channels.
    """

    latent_channels: int = 16
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (96, 192, 384, 384, 384)
    layers_per_block: int = 2
    spatial_upsamplings: int = 3
    temporal_upsamplings: int = 2

    @property
    def code_channels(self) -> int:
        """Channels of the latent ``decode`` takes (upstream hard-codes 64)."""
        return 4 * self.latent_channels


# ----------------------------------------------------------------------------- building blocks


def swish(x: torch.Tensor) -> torch.Tensor:
    # The up-samplers spell SiLU out; F.silu rounds differently in the last float32 bit.
    return x * torch.sigmoid(x)


class CausalConv3d(nn.Module):
    """A 3-D conv that pads time on the past side only, so output frame t sees input frames t-k+1 … t.

    Space is zero-padded to keep its size. Before the first chunk of a video the past is the first frame repeated;
    afterwards it is the previous chunk's last ``k - 1`` input frames, taken from and put back into ``cache``.
    The conv sits one level down, so keys read ``….conv.weight`` as in the official checkpoint.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.past = kernel_size - 1
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size)

    def forward(self, x: torch.Tensor, cache: ConvCache) -> torch.Tensor:
        if self.past:
            past = cache.get(self)
            if past is None:
                past = torch.cat([x[:, :, :1]] * self.past, dim=2)
            x = torch.cat([past, x], dim=2)
            cache[self] = x[:, :, -self.past:].clone()  # a copy, so that the padded chunk can be freed
        pad = self.past // 2
        return self.conv(F.pad(x, (pad, pad, pad, pad)))


class RMSNorm(nn.Module):
    """Per position, scale the channel vector to norm sqrt(C), then by a learned per-channel gain."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = channels**0.5
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


def resize_latent(zq: torch.Tensor, frames: int, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of the latent (B, C, t, h, w) to (frames, *size) at a feature map of ``frames``.

    An odd frame count > 1 means the first feature frame stands for the first latent frame alone (it was
    decoded as an image), so the first latent frame is resized on its own and the rest spread over the others.
    """
    if frames > 1 and frames % 2 == 1:
        return torch.cat([F.interpolate(zq[:, :, :1], size=(1, *size)),
                          F.interpolate(zq[:, :, 1:], size=(frames - 1, *size))], dim=2)
    return F.interpolate(zq, size=(frames, *size))


class SpatialNorm3D(nn.Module):
    """RMS norm of the features, then a per-position gain and bias predicted from the latent by 1x1x1 convs
    (spatially conditioned normalisation, arXiv:2209.09002): every level of the decoder sees the latent."""

    def __init__(self, channels: int, latent_channels: int):
        super().__init__()
        self.norm_layer = RMSNorm(channels)
        self.conv_y = CausalConv3d(latent_channels, channels, 1)
        self.conv_b = CausalConv3d(latent_channels, channels, 1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        zq = resize_latent(zq, f.shape[2], f.shape[-2:])
        conv_y, conv_b = self.conv_y(zq, {}), self.conv_b(zq, {})  # kernel 1 in time: nothing to carry
        return self.norm_layer(f) * conv_y + conv_b


class ResnetBlock3D(nn.Module):
    def __init__(self, channels: int, latent_channels: int):
        super().__init__()
        self.norm1 = SpatialNorm3D(channels, latent_channels)
        self.conv1 = CausalConv3d(channels, channels, 3)
        self.norm2 = SpatialNorm3D(channels, latent_channels)
        self.conv2 = CausalConv3d(channels, channels, 3)

    def forward(self, x: torch.Tensor, zq: torch.Tensor, cache: ConvCache) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, zq)), cache)
        h = self.conv2(F.silu(self.norm2(h, zq)), cache)
        return h + x


def depth_to_space(x: torch.Tensor, pt: int) -> torch.Tensor:
    """(B, pt*2*2*C, T, H, W) -> (B, C, T*pt, 2H, 2W), the channel index being ((it*2 + iy)*2 + ix)*C + c."""
    b, _, t, h, w = x.shape
    x = x.view(b, pt, 2, 2, -1, t, h, w).permute(0, 4, 5, 1, 6, 2, 7, 3)
    return x.reshape(b, -1, t * pt, 2 * h, 2 * w)


class DCUpsample3D(nn.Module):
    """Doubles height and width (and, if ``temporal``, time) by a conv to ``2x2(x2)`` times the channels and
    depth-to-space, plus a parameter-free shortcut: the input's channels tiled and rearranged alike.

    In time, a chunk of n frames would become 2n; where the chunk starts with the video's first frame, that
    frame's two outputs are averaged into one, so n frames become 2n - 1 (a single frame stays one).
    """

    def __init__(self, in_channels: int, out_channels: int, temporal: bool):
        super().__init__()
        self.pt = 2 if temporal else 1
        conv_channels = out_channels * 4 * self.pt
        if conv_channels % in_channels:
            raise ValueError(f"the shortcut tiles {in_channels} channels, which do not divide {conv_channels}")
        self.repeats = conv_channels // in_channels
        self.norm = RMSNorm(in_channels)
        self.conv = CausalConv3d(in_channels, conv_channels, 3)

    def forward(self, x: torch.Tensor, cache: ConvCache, first_frame_alone: bool) -> torch.Tensor:
        h = depth_to_space(self.conv(swish(self.norm(x)), cache), self.pt)
        shortcut = depth_to_space(x.repeat(1, self.repeats, 1, 1, 1), self.pt)
        if self.pt > 1 and (first_frame_alone or x.shape[2] % 2 == 1):
            h = torch.cat([h[:, :, :self.pt].mean(dim=2, keepdim=True), h[:, :, self.pt:]], dim=2)
            shortcut = torch.cat([shortcut[:, :, :self.pt].mean(dim=2, keepdim=True), shortcut[:, :, self.pt:]], dim=2)
        return h + shortcut


# ----------------------------------------------------------------------------- decoder


class UpBlock3D(nn.Module):
    """Residual blocks at the input width, then (for the last blocks) an up-sampler to the output width."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, latent_channels: int,
                 spatial: bool, temporal: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock3D(in_channels, latent_channels) for _ in range(num_layers))
        self.upsamplers = nn.ModuleList()
        if spatial or temporal:
            upsampler = nn.Module()  # keys ``upsamplers.0.conv.…``, as the official wrapper nests them
            upsampler.conv = DCUpsample3D(in_channels, out_channels, temporal)
            self.upsamplers.append(upsampler)

    def forward(self, x: torch.Tensor, zq: torch.Tensor, cache: ConvCache, first_frame_alone: bool) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, zq, cache)
        for upsampler in self.upsamplers:
            x = upsampler.conv(x, cache, first_frame_alone)
        return x


class Decoder3D(nn.Module):
    """Latent chunk (B, latent_channels, t, h, w) -> frames (B, out_channels, t', 8h, 8w) with the official
    sizes, t' = 1 + 4(t-1) for the first chunk of a video and 4t for later ones."""

    def __init__(self, config: VideoVAEConfig):
        super().__init__()
        widths = list(reversed(config.block_out_channels))
        n = len(widths) - 1
        if config.spatial_upsamplings < config.temporal_upsamplings or config.spatial_upsamplings > n:
            raise ValueError(f"need temporal_upsamplings <= spatial_upsamplings <= {n} up blocks, got {config}")
        latent = config.latent_channels
        self.conv_in = CausalConv3d(latent, widths[0], 3)
        self.mid_block = nn.Module()
        self.mid_block.resnets = nn.ModuleList(ResnetBlock3D(widths[0], latent) for _ in range(2))
        self.up_blocks = nn.ModuleList(
            UpBlock3D(widths[i], widths[i + 1], config.layers_per_block + 1, latent,
                      spatial=i >= n - config.spatial_upsamplings, temporal=i >= n - config.temporal_upsamplings)
            for i in range(n))
        self.norm_out = SpatialNorm3D(widths[-1], latent)
        self.conv_out = CausalConv3d(widths[-1], config.out_channels, 3)

    def forward(self, z: torch.Tensor, cache: ConvCache, first_frame_alone: bool = False) -> torch.Tensor:
        """``first_frame_alone``: z is a video's first chunk with an even number of frames (an odd count
        says so by itself)."""
        h = self.conv_in(z, cache)
        for resnet in self.mid_block.resnets:
            h = resnet(h, z, cache)
        for block in self.up_blocks:
            h = block(h, z, cache, first_frame_alone)
        return self.conv_out(F.silu(self.norm_out(h, z)), cache)


# ----------------------------------------------------------------------------- autoencoder


class VideoVAE(nn.Module):
    """The decoding half of InfinityStar's video VAE, with the official state-dict keys.

    Build ``VideoVAE()`` for the official ``infinitystar_videovae.pth`` (its weights are the checkpoint's
    ``"vae"`` entry, e.g. ``fastvar.hub.read_state_dict(path, wrapper_keys=("vae",))``), and load a full official
    state dict with ``fastvar.hub.load_checkpoint(vae, state_dict)``: ``adapt_state_dict`` drops the keys only
    encoding and training use (``encoder_side_prefixes``), the rest must match exactly (else ``ValueError``
    naming the keys).

    The decoder computes in its parameters' dtype, float32 unless cast; ``decode`` converts z to it.
    """

    # encoder, its projections and the quantizer (registered twice); proj_up_two serves only training.
    encoder_side_prefixes = ("encoder.", "proj_down.", "proj_down_two.", "proj_up_two.", "quantize.", "quantizer.")

    def __init__(self, config: VideoVAEConfig | None = None):
        super().__init__()
        self.config = config or VideoVAEConfig()
        self.scale_learnable_parameters = nn.Parameter(torch.ones(4))  # decoding uses entry 0 (the latent scale)
        self.proj_up = nn.Linear(self.config.code_channels, self.config.code_channels)
        self.decoder = Decoder3D(self.config)

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The official state dict without its encoder side (``encoder_side_prefixes``)."""
        return {k: v for k, v in state_dict.items() if not k.startswith(self.encoder_side_prefixes)}

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Summed codes (B, 64, T, H, W) -> frames (B, 3, 1 + 4(T-1), 16H, 16W), RGB, about [-1, 1], unclamped.

        As upstream's ``decode(z, slice=True)``: z is divided by the learned latent scale, projected by
        ``proj_up`` and unpacked from 64 channels at (H, W) to 16 at (2H, 2W); the rows of the batch are then
        decoded one at a time, each in chunks of latent frames:

        * T odd: frames 0-2 (just frame 0 when T = 1), then 3-4, 5-6, …;
        * T even: frames 0-3, then 4-5, 6-7, … (upstream fails on T = 2, which decodes here as one chunk).

        Each causal conv carries its last two input frames from one chunk to the next, so chunking saves
        memory without cutting the video: the first latent frame decodes to one frame, every other one to four.
        """
        if z.ndim != 5 or z.shape[1] != self.config.code_channels:
            raise ValueError(f"expected z (B, {self.config.code_channels}, T, H, W), got {tuple(z.shape)}")
        z = z.to(self.scale_learnable_parameters.dtype) / self.scale_learnable_parameters[0]
        z = self.proj_up(z.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        z = F.pixel_shuffle(z.transpose(1, 2), 2).transpose(1, 2)  # per frame: (64, H, W) -> (16, 2H, 2W)
        return torch.cat([self._decode_row(row) for row in z.split(1)])

    def _decode_row(self, z: torch.Tensor) -> torch.Tensor:
        frames = z.shape[2]
        first = min(frames, 3 if frames % 2 else 4)
        cache: ConvCache = {}
        out = [self.decoder(z[:, :, :first], cache, first_frame_alone=frames % 2 == 0)]
        for start in range(first, frames, 2):
            out.append(self.decoder(z[:, :, start:start + 2], cache))
        return torch.cat(out, dim=2)
