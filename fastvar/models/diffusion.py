"""HART's residual diffusion head: a small AdaLN MLP that denoises the continuous residual of each
last-scale token, and the IDDPM sampler it was trained for (mit-han-lab/hart, after MAR's DiffLoss).

Inference only: a cosine schedule over 1000 steps respaced to a few, learned-range variance,
epsilon prediction, x0 clipped to [-1, 1], temperature 1. The schedule is computed in float64 numpy and each
coefficient rounded to float32 where it meets the tensors, as upstream does, so samples match it
bit for bit on the same generator draws.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

VAE_SCALE = 0.6  # the head is trained on residuals divided by this; samples are scaled back

# ----------------------------------------------------------------------------- the denoiser


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (original, not respaced) timestep, then an MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat((torch.cos(args), torch.sin(args)), dim=-1))


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 2 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """Predicts (epsilon, variance interpolation) of a noisy token given its timestep and the
    transformer's condition vector: 2 x ``in_channels`` outputs."""

    def __init__(self, in_channels: int, model_channels: int, z_channels: int, num_res_blocks: int):
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList(ResBlock(model_channels) for _ in range(num_res_blocks))
        self.final_layer = FinalLayer(model_channels, 2 * in_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, cfg: float) -> torch.Tensor:
        """Rows are [conditional; unconditional]. Both halves denoise the conditional half's x; only
        epsilon is guided, each half keeps its own variance output."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat((half, half)), t, c)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels :]
        cond_eps, uncond_eps = eps.split(len(eps) // 2)
        guided = cond_eps * (1 + cfg) - cfg * uncond_eps
        return torch.cat((torch.cat((guided, guided)), rest), dim=1)


# ----------------------------------------------------------------------------- the sampler


def cosine_betas(num_steps: int = 1000, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                     for i in range(num_steps)])


def respaced_timesteps(num_steps: int, section_counts: str) -> list[int]:
    """The kept timesteps: the process split into equal sections, each strided evenly to its count
    ("8": 8 steps over 1000; "10,5": 10 in the first half, 5 in the second)."""
    try:
        counts = [int(c) for c in str(section_counts).split(",")]
    except ValueError:
        raise ValueError(f"num_sampling_steps={section_counts!r} is not supported; give step counts per section "
                         "as a comma-separated string of integers (official: '8')") from None
    size_per, extra = divmod(num_steps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"num_sampling_steps={section_counts!r}: cannot take {count} steps from a section of "
                             f"{size}")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += size
    return sorted(set(steps))


class IDDPMSampler:
    """Ancestral sampling of the respaced process (learned-range variance, epsilon prediction)."""

    def __init__(self, num_sampling_steps: str, num_steps: int = 1000):
        base_cumprod = np.cumprod(1.0 - cosine_betas(num_steps))
        self.timestep_map = respaced_timesteps(num_steps, num_sampling_steps)
        betas, last = [], 1.0
        for t in self.timestep_map:
            betas.append(1 - base_cumprod[t] / last)
            last = base_cumprod[t]
        betas = np.array(betas, dtype=np.float64)
        cumprod = np.cumprod(1.0 - betas)
        cumprod_prev = np.append(1.0, cumprod[:-1])
        posterior_variance = betas * (1.0 - cumprod_prev) / (1.0 - cumprod)
        self.coefficients = dict(
            min_log=np.log(np.append(posterior_variance[1], posterior_variance[1:])),
            max_log=np.log(betas),
            recip=np.sqrt(1.0 / cumprod),
            recipm1=np.sqrt(1.0 / cumprod - 1),
            mean_x0=betas * np.sqrt(cumprod_prev) / (1.0 - cumprod),
            mean_xt=(1.0 - cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - cumprod),
        )

    def coefficient(self, name: str, i: int, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.coefficients[name][i], device=device).float()

    def sample(self, model, noise: torch.Tensor, generator: torch.Generator | None = None,
               draw_rows: int | None = None) -> torch.Tensor:
        """Denoise ``noise`` (N, C) through every kept step; ``model(x, t)`` returns (N, 2C). Each step's
        noise is drawn for ``draw_rows`` rows (default N), of which the first N are used."""
        x, C = noise, noise.shape[1]
        for i in reversed(range(len(self.timestep_map))):
            c = {name: self.coefficient(name, i, x.device) for name in self.coefficients}
            t = torch.full((x.shape[0],), self.timestep_map[i], device=x.device)
            eps, var_values = model(x, t).split(C, dim=1)
            frac = (var_values + 1) / 2
            log_variance = frac * c["max_log"] + (1 - frac) * c["min_log"]
            x0 = (c["recip"] * x - c["recipm1"] * eps).clamp(-1, 1)
            mean = c["mean_x0"] * x0 + c["mean_xt"] * x
            step_noise = draw_normal((draw_rows or x.shape[0], C), x.device, generator)[: x.shape[0]]  # at t = 0 too
            x = mean + float(i != 0) * torch.exp(0.5 * log_variance) * step_noise
        return x


def draw_normal(shape: torch.Size | tuple, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """N(0, 1) noise from ``generator``, or from torch's global generator of ``device``."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


class DiffusionHead(nn.Module):
    """The residual head (``diffloss`` upstream): samples the continuous residual of each token."""

    def __init__(self, target_channels: int, z_channels: int, width: int, depth: int, num_sampling_steps: str):
        super().__init__()
        self.in_channels = target_channels
        self.net = SimpleMLPAdaLN(target_channels, width, z_channels, depth)
        self.sampler = IDDPMSampler(num_sampling_steps)

    def sample(self, z: torch.Tensor, cfg: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Residuals (N, C) for the condition rows ``z`` (N, z_channels), already scaled by ``VAE_SCALE``.

        With guidance (``cfg`` != 1) the rows are [conditional; unconditional] and both halves start
        from the same noise; ``cfg`` == 1 runs every row unguided on its own noise (upstream's branch).
        The initial noise comes from the CPU generator when ``generator`` is None (upstream draws it
        there on any device), the per-step noise from the global generator of z's device.
        """
        if cfg != 1.0:
            noise = draw_normal((z.shape[0] // 2, self.in_channels), torch.device("cpu"), generator).to(z.device)
            noise = torch.cat((noise, noise))

            def model(x, t):
                return self.net.forward_with_cfg(x, t, z, cfg)
        else:
            noise = draw_normal((z.shape[0], self.in_channels), torch.device("cpu"), generator).to(z.device)

            def model(x, t):
                return self.net(x, t, z)
        return self.sampler.sample(model, noise, generator) * VAE_SCALE

    def sample_conditional(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Residuals (N, C) for conditional rows ``z`` alone, as the guided ``sample`` makes them at guidance
        weight 0, and from the same draws: the initial noise of N rows, and each step's drawn for the doubled
        batch (whose first half the conditional rows use)."""
        noise = draw_normal((z.shape[0], self.in_channels), torch.device("cpu"), generator).to(z.device)
        denoised = self.sampler.sample(lambda x, t: self.net(x, t, z), noise, generator, draw_rows=2 * z.shape[0])
        return denoised * VAE_SCALE
