"""HART: text-to-image hybrid autoregressive transformer (mit-han-lab/hart), and its hybrid tokenizer.

State-dict keys and constructor keyword arguments are those of the official code (``HARTForT2I``
with the fields of ``llm/config.json``, the tokenizer with those of ``tokenizer/config.json``), so
the official HART-0.7B checkpoints load as they are. The text encoder (Qwen2) is not part of this
file: the model takes its last hidden states.

Next-scale prediction as in VAR, with three differences: scale 0 is the text (``context_token``
tokens, padding included), positions are rotary (1-D over the text, 2-D over the token maps), and
the last 64x64 map gets a continuous residual from a small diffusion head on top of the sampled
discrete tokens. The file reads top to bottom: the tokenizer, rotary positions, layers, the model,
then the official configuration. The diffusion head is in ``fastvar.models.diffusion``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastvar.attention import attention
from fastvar.models.diffusion import DiffusionHead
from fastvar.models.kv_cache import KVCache
from fastvar.models.sampling import generator_on, sample_with_top_k_top_p_
from fastvar.models.var import PATCH_NUMS_256, VQVAE, VectorQuantizer2, gumbel_softmax

PATCH_NUMS_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)
CONFIG_METADATA = {"architectures", "model_type", "transformers_version", "torch_dtype", "_name_or_path"}

# ----------------------------------------------------------------------------- hybrid tokenizer


class HybridQuantizer(VectorQuantizer2):
    """VAR's multi-scale quantizer, except at the last scale: its map (discrete tokens plus the
    diffusion residual) is added to ``f_hat`` as it is, without a Phi conv."""

    def get_next_autoregressive_input(
        self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor, patch_nums: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add scale ``si``'s map to ``f_hat`` (in place); return it and the next scale's input map.
        ``patch_nums`` is the transformer's schedule (upstream passes it; default: the tokenizer's)."""
        patch_nums = self.v_patch_nums if patch_nums is None else patch_nums
        if si == SN - 1:
            return f_hat.add_(h_BChw), f_hat
        final, nxt = patch_nums[-1], patch_nums[si + 1]
        f_hat.add_(self.phi(si, SN)(F.interpolate(h_BChw, size=(final, final), mode="bicubic")))
        return f_hat, F.interpolate(f_hat, size=(nxt, nxt), mode="area")


# Official tokenizer fields that only matter for training (or are never read at inference).
TOKENIZER_TRAINING_OPTIONS = {"levels", "hybrid", "disable_quant_resi", "freeze_codebook_for_hybrid"}


class HARTTokenizer(VQVAE):
    """The HART tokenizer: the VAR VQVAE with configurable ``ch_mult`` and the hybrid quantizer.

    Keyword arguments are the fields of the official ``tokenizer/config.json`` (upstream defaults);
    only ``quantizer_type='var_hybrid'`` without the training-time second decoder is implemented.
    """

    def __init__(
        self, vocab_size: int = 4096, z_channels: int = 32, ch: int = 160, dropout: float = 0.0, beta: float = 0.25,
        using_znorm: bool = False, quant_conv_ks: int = 3, quant_resi: float = 0.5, share_quant_resi: int = 4,
        default_qresi_counts: int = 0, v_patch_nums: Sequence[int] = PATCH_NUMS_256,
        test_mode: bool = False, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), quantizer_type: str = "var",
        double_decoder: bool = False, **training_options,
    ):
        unknown = sorted(set(training_options) - TOKENIZER_TRAINING_OPTIONS - CONFIG_METADATA)
        if unknown:
            raise TypeError(f"unknown HARTTokenizer argument(s) {unknown}")
        if quantizer_type != "var_hybrid" or double_decoder:
            raise ValueError(f"unsupported HART tokenizer options quantizer_type={quantizer_type!r}, double_decoder="
                             f"{double_decoder}; supported: quantizer_type='var_hybrid', double_decoder=False (the "
                             "official tokenizer; VAR's is fastvar.models.var.VQVAE)")
        super().__init__(vocab_size, z_channels, ch, dropout, beta, using_znorm, quant_conv_ks, quant_resi,
                         share_quant_resi, default_qresi_counts, v_patch_nums, test_mode=False, ch_mult=ch_mult)
        self.quantize = HybridQuantizer(vocab_size, z_channels, v_patch_nums, quant_resi, share_quant_resi)
        self.config = dict(vocab_size=vocab_size, z_channels=z_channels, ch=ch, quant_conv_ks=quant_conv_ks,
                           quant_resi=quant_resi, share_quant_resi=share_quant_resi, v_patch_nums=list(v_patch_nums),
                           ch_mult=list(ch_mult), quantizer_type=quantizer_type)  # HARTTokenizer(**config) rebuilds it
        if test_mode:
            self.eval().requires_grad_(False)

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The official checkpoint holds the tokenizer under ``vae.`` beside a training discriminator
        (``disc.``): strip the one, drop the other. A codebook-usage statistic recorded for another
        number of scales is replaced by this model's, as the official loader does."""
        adapted = {}
        for key, value in state_dict.items():
            if key.startswith("disc."):
                continue
            adapted[key.removeprefix("vae.")] = value
        hits = "quantize.ema_vocab_hit_SV"
        if hits in adapted and adapted[hits].shape != self.quantize.ema_vocab_hit_SV.shape:
            adapted[hits] = self.quantize.ema_vocab_hit_SV.clone()
        return adapted


# ----------------------------------------------------------------------------- rotary positions


def inverse_frequencies(head_dim: int, step: int, base: int = 10000) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, step, dtype=torch.int64).float() / head_dim))


def context_rope(position_ids: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Llama's 1-D rotary table of the text tokens: cos, sin stacked, (2, B, T, head_dim)."""
    freqs = position_ids.float()[:, :, None] * inverse_frequencies(head_dim, 2).to(position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return torch.stack((emb.cos(), emb.sin()))


def image_rope(pn: int, final_pn: int, offsets: torch.Tensor, head_dim: int) -> torch.Tensor:
    """2-D rotary table of a pn x pn map, (2, B, pn*pn, head_dim), one table per row of ``offsets`` (B,).

    A token at (i, j) sits at the unrounded float position ``(i, j) / pn * final_pn`` shifted on
    both axes by its row's offset (the last text position id). The first half of the head gets the
    row angles (twice over, head_dim/4 frequencies), the second half the column angles; with
    rotate-half pairing channel c is rotated against channel c + head_dim/2, so each pair mixes a
    row and a column angle (upstream's layout, not a true 2-D rotation).
    """
    device = offsets.device
    axis = torch.arange(pn, device=device)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(1, pn * pn, 2)
    coords = grid / pn * final_pn + offsets[:, None, None]  # (B, L, 2): float32 row, column
    freqs = coords[..., None] * inverse_frequencies(head_dim, 4).to(device)  # (B, L, 2, D/4)
    emb = torch.cat((freqs, freqs), dim=-1).flatten(2)  # (B, L, D): row angles twice, then column angles twice
    return torch.stack((emb.cos(), emb.sin()))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q, k (B, H, L, D) by ``rope`` (2, B or 1, L, D): one table per batch row, for all heads."""
    cos, sin = rope.unsqueeze(2).unbind(0)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """RMSNorm as HART's fused kernel computes it: float32 statistics, the normalised input rounded to
    the input dtype, then the weight. Every HART norm has a weight, also those upstream builds with
    ``elementwise_affine=False`` (the kernel ignores the flag), hence ``ln_wo_grad.weight``."""

    def __init__(self, C: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight.to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention with rotary positions and a KV cache (``LlamaAttention`` upstream).

    Inference attends without a mask: each scale sees the cached keys of the text and of every
    earlier scale, padded text tokens included.
    """

    def __init__(self, embed_dim: int, num_heads: int, attn_l2_norm: bool, flash_if_available: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:  # cosine attention with a learned per-head temperature, clamped at 100
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = torch.log(torch.tensor(100.0)).item()  # float32 log, as upstream
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.qkv_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.using_flash = flash_if_available
        self.kv_cache: KVCache | None = None

    def kv_caching(self, enable: bool, capacity: int | None = None) -> None:
        """Start caching keys and values (for ``capacity`` tokens, if known), or stop and free the cache."""
        self.kv_cache = KVCache(capacity) if enable else None

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """x (B, L, C); ``rope`` (2, B or 1, L, head_dim): cos, sin of exactly the tokens of x."""
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv_proj.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, head_dim)
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp())
            k = F.normalize(k, dim=-1)
        q, k = apply_rope(q, k, rope.to(v.dtype))
        q, k = q.to(v.dtype), k.to(v.dtype)  # under autocast the l2-norm temperature promotes q to float32
        if self.kv_cache is not None:
            k, v = self.kv_cache.append(k, v)
        return self.proj(attention(q, k, v, scale=self.scale, use_flash=self.using_flash))


class LlamaMLP(nn.Module):
    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.gate_proj = nn.Linear(in_features, hidden_features, bias=False)
        self.up_proj = nn.Linear(in_features, hidden_features, bias=False)
        self.down_proj = nn.Linear(hidden_features, in_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block without AdaLN (``disable_aln``): the text conditions the image
    through attention only. Both branches share one RMSNorm."""

    def __init__(self, embed_dim: int, num_heads: int, mlp_ratio: float, norm_eps: float, attn_l2_norm: bool,
                 flash_if_available: bool):
        super().__init__()
        self.attn = SelfAttention(embed_dim, num_heads, attn_l2_norm, flash_if_available)
        hidden = int(embed_dim * mlp_ratio * 2 / 3 + 255) // 256 * 256  # 2/3 of mlp_ratio, up to a multiple of 256
        self.ffn = LlamaMLP(embed_dim, hidden)
        self.ln_wo_grad = RMSNorm(embed_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_wo_grad(x), rope)
        return x + self.ffn(self.ln_wo_grad(x))


class AdaLNBeforeHead(nn.Module):
    """The output norm, modulated by the text: its tokens max-pooled over the sequence, padding included."""

    def __init__(self, C: int, D: int, norm_eps: float):
        super().__init__()
        self.C = C
        self.ln_wo_grad = RMSNorm(C, eps=norm_eps)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * C))

    def forward(self, x: torch.Tensor, cond_BTD: torch.Tensor) -> torch.Tensor:
        pooled = cond_BTD.max(dim=1, keepdim=True).values
        scale, shift = self.ada_lin(pooled).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


# ----------------------------------------------------------------------------- model

# Official constructor fields that only matter for training, for kernels fastvar does not use, or
# that upstream reads and never applies (``context_norm_scale``: its fused norm ignores it).
TRAINING_OPTIONS = {
    "vae_path", "drop_rate", "attn_drop_rate", "drop_path_rate", "cond_drop_rate", "fused_if_available",
    "diffusion_batch_mul", "diffusion_head_repeats", "context_norm_scale",
}
SUPPORTED = dict(attn_type="llama", mlp_type="llama", disable_aln=True, shared_aln=False, use_timestep_embed=False,
                 sep_aln_pooling_mode="max", use_cross_attn=False, sampler="iddpm")


class HART(nn.Module):
    """Text-conditional hybrid next-scale transformer (``HARTForT2I``).

    Keyword arguments are the fields of the official ``llm/config.json``, with upstream's defaults.
    Only the architecture of the released model is implemented (llama attention and MLP, no AdaLN in
    the blocks, IDDPM diffusion head); other values of those fields are refused. The tokenizer is
    held outside the module tree (``vae_proxy``), as upstream, so ``state_dict`` matches the official
    checkpoints; ``.to()`` moves it along.
    """

    def __init__(
        self, tokenizer: HARTTokenizer, context_token: int = 77, context_dim: int = 768, depth: int = 16,
        embed_dim: int = 1024, num_heads: int = 16, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
        shared_aln: bool = False, attn_l2_norm: bool = False, patch_nums: Sequence[int] = PATCH_NUMS_256,
        flash_if_available: bool = True, mlp_type: str = "gpt2", attn_type: str = "gpt2", disable_aln: bool = False,
        use_timestep_embed: bool = False, sep_aln_pooling_mode: str = "max", use_cross_attn: bool = False,
        diff_width: int = 1024, diff_depth: int = 6, num_sampling_steps: str = "8", sampler: str = "iddpm",
        use_context_norm: bool = False, **training_options,
    ):
        super().__init__()
        unknown = sorted(set(training_options) - TRAINING_OPTIONS - CONFIG_METADATA)
        if unknown:
            raise TypeError(f"unknown HART argument(s) {unknown}")
        given = dict(attn_type=attn_type, mlp_type=mlp_type, disable_aln=disable_aln, shared_aln=shared_aln,
                     use_timestep_embed=use_timestep_embed, sep_aln_pooling_mode=sep_aln_pooling_mode,
                     use_cross_attn=use_cross_attn, sampler=sampler)
        unsupported = {k: v for k, v in given.items() if v != SUPPORTED[k]}
        if unsupported:
            raise ValueError(f"unsupported HART option(s) {unsupported}; supported: {SUPPORTED}, the released "
                             "architecture (fastvar.models.hart.build() makes one)")
        head_dim = embed_dim // num_heads
        if embed_dim % num_heads or head_dim % 4:
            raise ValueError(f"embed_dim={embed_dim} must split into num_heads={num_heads} heads of a multiple of 4 "
                             "channels (2-D rotary positions)")
        if context_token < 1 or len(patch_nums) < 2:
            raise ValueError(f"need context_token >= 1 and at least two scales, got context_token={context_token}, "
                             f"patch_nums={tuple(patch_nums)}")
        self.config = dict(context_token=context_token, context_dim=context_dim, depth=depth, embed_dim=embed_dim,
                           num_heads=num_heads, mlp_ratio=mlp_ratio, norm_eps=norm_eps, attn_l2_norm=attn_l2_norm,
                           patch_nums=list(patch_nums), flash_if_available=flash_if_available, diff_width=diff_width,
                           diff_depth=diff_depth, num_sampling_steps=num_sampling_steps,
                           use_context_norm=use_context_norm, **SUPPORTED)  # HART(tokenizer, **config) rebuilds it
        self.Cvae, self.V = tokenizer.Cvae, tokenizer.vocab_size
        self.depth, self.C, self.num_heads, self.head_dim = depth, embed_dim, num_heads, head_dim
        self.context_token, self.context_dim = context_token, context_dim
        self.patch_nums = tuple(patch_nums)
        self.rng = torch.Generator()
        self.vae_proxy = (tokenizer,)
        self.vae_quant_proxy = (tokenizer.quantize,)

        self.context_norm = RMSNorm(context_dim, eps=norm_eps) if use_context_norm else nn.Identity()
        self.context_embed = nn.Linear(context_dim, embed_dim)
        self.word_embed = nn.Linear(self.Cvae, embed_dim)
        self.lvl_embed = nn.Embedding(len(self.patch_nums), embed_dim)
        # Level of every position: the text is level 0 (it stands in for the 1x1 first map).
        levels = [torch.zeros(context_token, dtype=torch.int64)]
        levels += [torch.full((pn * pn,), si, dtype=torch.int64) for si, pn in enumerate(self.patch_nums) if si > 0]
        self.register_buffer("lvl_1L", torch.cat(levels).view(1, -1))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, norm_eps, attn_l2_norm, flash_if_available) for _ in range(depth)
        )
        self.head_nm = AdaLNBeforeHead(embed_dim, embed_dim, norm_eps)
        self.head = nn.Linear(embed_dim, self.V)
        self.decoder_norm = RMSNorm(embed_dim, eps=norm_eps)
        self.diffloss = DiffusionHead(self.Cvae, embed_dim, diff_width, diff_depth, num_sampling_steps)

    def _apply(self, fn, recurse=True):
        self.vae_proxy[0]._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Drop the training attention mask ``attn_bias_for_masking`` (a derived constant, 359 MB at
        full size) that the official checkpoints may carry."""
        return {k: v for k, v in state_dict.items() if k != "attn_bias_for_masking"}

    def get_logits(self, h: torch.Tensor, cond_BTD: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(h.float(), cond_BTD).float()).float()

    def diffusion_residual(self, x: torch.Tensor, idx_Bl: torch.Tensor, cfg: float,
                           generator: torch.Generator | None) -> torch.Tensor:
        """Continuous residual (B, l, Cvae) of the last scale's tokens, conditioned on the last block's
        output ``x`` plus the embedding of the sampled discrete tokens. ``x`` holds both CFG halves (2B, l, C),
        or the conditional rows alone (B, l, C) when guidance is off: their residual at guidance weight 0."""
        B = idx_Bl.shape[0]
        discrete = self.word_embed(self.vae_quant_proxy[0].embedding(idx_Bl))
        if x.shape[0] == B:
            cond = self.decoder_norm(x + discrete).reshape(-1, self.C)
            return self.diffloss.sample_conditional(cond, generator=generator).view(B, -1, self.Cvae)
        cond = self.decoder_norm(x + torch.cat((discrete, discrete)))
        residual = self.diffloss.sample(cond.reshape(-1, self.C), cfg=cfg, generator=generator)
        return residual.view(2 * B, -1, self.Cvae)[:B]

    @torch.no_grad()
    def autoregressive_infer_cfg(
        self, B: int, label_B: torch.Tensor, g_seed: int | None = None, cfg: float = 1.5, top_k: int = 0,
        top_p: float = 0.0, more_smooth: bool = False, context_position_ids: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None, final_stage: int = 0, num_maskgit_iters: int = 1, *,
        generator: torch.Generator | None = None, progress: bool = False,
    ) -> torch.Tensor:
        """Sample B images (B, 3, H, W) in [0, 1] from text features, as the official call does.

        ``label_B`` (B, context_token, context_dim): the text encoder's last hidden states, padding
        included; ``context_position_ids`` (B, context_token): their position ids (``cumsum(mask) - 1``);
        ``context_mask`` is required as upstream but not read (padded tokens are attended to and pooled).
        The unconditional half is all-zero text at position 0. Guidance at scale si is
        ``cfg * si / (K-1)``; the last scale reuses the previous scale's ratio (guidance and Gumbel
        temperature). The token sampler keeps the top 600 logits for the first 7 scales and 300
        after, whatever ``top_k`` says (``top_p`` applies). One generator seeded with ``g_seed``
        (torch's global one when None) feeds, per scale, the token draw then, with ``more_smooth``,
        the Gumbel draw; the Gumbel-weighted codebook mix then builds the image and the sampled
        indices only condition the diffusion head.

        ``final_stage`` 0 adds the diffusion head's residual to the last scale, 1 leaves it out.
        ``generator`` draws the diffusion noise; None uses torch's global generator as upstream does
        (its CPU generator for the initial noise, that of the model's device for each step), so
        ``torch.manual_seed`` before the call fixes it. ``progress`` shows a bar over scales.
        """
        return generate(self, B, label_B, g_seed, cfg, top_k, top_p, more_smooth, context_position_ids, context_mask,
                        final_stage, num_maskgit_iters, generator=generator, progress=progress)

    def check_call(self, B: int, label_B: torch.Tensor | None, context_position_ids: torch.Tensor | None,
                   context_mask: torch.Tensor | None, final_stage: int, num_maskgit_iters: int) -> None:
        if num_maskgit_iters != 1:
            raise ValueError(f"num_maskgit_iters={num_maskgit_iters} is not supported: only the one-pass last scale "
                             "of the official sampling (num_maskgit_iters=1) is implemented")
        if final_stage not in (0, 1):
            raise ValueError(f"final_stage={final_stage} is not supported: 0 adds the diffusion residual to the last "
                             "scale, 1 leaves it out")
        text_shape = (B, self.context_token, self.context_dim)
        if not isinstance(label_B, torch.Tensor) or tuple(label_B.shape) != text_shape:
            got = tuple(label_B.shape) if isinstance(label_B, torch.Tensor) else type(label_B).__name__
            raise ValueError(f"label_B must be the text features (B, context_token, context_dim) = {text_shape}, "
                             f"got {got}")
        for name, value in (("context_position_ids", context_position_ids), ("context_mask", context_mask)):
            if value is None:
                raise ValueError(f"{name} is required (B, context_token) = {(B, self.context_token)}, as upstream")
            if tuple(value.shape) != (B, self.context_token):
                raise ValueError(f"{name} must have shape {(B, self.context_token)}, got {tuple(value.shape)}")


# ----------------------------------------------------------------------------- sampling


@torch.no_grad()
def generate(
    hart: nn.Module, B: int, label_B: torch.Tensor, g_seed: int | None = None, cfg: float = 1.5, top_k: int = 0,
    top_p: float = 0.0, more_smooth: bool = False, context_position_ids: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None, final_stage: int = 0, num_maskgit_iters: int = 1, *,
    generator: torch.Generator | None = None, progress: bool = False, num_scales: int | None = None,
    guided_scales: int | None = None, on_scale: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """The HART sampling loop (``HART.autoregressive_infer_cfg``). ``num_scales`` < K runs only the
    first scales and decodes what they accumulated (scale skipping: no diffusion residual then). From
    scale ``guided_scales`` on only the conditional rows run, at guidance weight 0 (the diffusion head's
    too), drawing the same random numbers as with guidance. ``on_scale(si)`` is called before the blocks
    run scale ``si`` (0: the text), so that fastvar's patch knows the scale whatever its token count."""
    hart.check_call(B, label_B, context_position_ids, context_mask, final_stage, num_maskgit_iters)
    K, final_pn = len(hart.patch_nums), hart.patch_nums[-1]
    num_scales = K if num_scales is None else num_scales
    device = hart.lvl_1L.device
    rng = None if g_seed is None else generator_on(hart, device).manual_seed(g_seed)
    quant, tokenizer = hart.vae_quant_proxy[0], hart.vae_proxy[0]

    sos = cond_BTD = hart.context_embed(hart.context_norm(torch.cat((label_B, torch.zeros_like(label_B)))))
    positions = torch.cat((context_position_ids, torch.zeros_like(context_position_ids)))
    offsets = positions[:, -1]  # image positions start at the last text position id of their row
    lvl_pos = hart.lvl_embed(hart.lvl_1L)
    x = sos + lvl_pos[:, : hart.context_token]
    begin = hart.context_token
    f_hat = sos.new_zeros(B, hart.Cvae, final_pn, final_pn)

    scale_tokens = [hart.context_token] + [pn * pn for pn in hart.patch_nums[1:]]
    for block in hart.blocks:
        block.attn.kv_caching(True, capacity=sum(scale_tokens[: num_scales - 1]))  # the last scale is not stored
    bar = tqdm(total=num_scales + 1, desc="scales", disable=not progress, leave=False)  # the scales, then decoding
    guided_scales = K if guided_scales is None else guided_scales
    for si in range(num_scales):
        pn = hart.patch_nums[si]
        if si < K - 1:  # the last scale keeps the previous scale's ratio
            ratio = si / (K - 1)
        if si == guided_scales:  # the unconditional rows stop here
            x, cond_BTD, positions, offsets = x[:B], cond_BTD[:B], positions[:B], offsets[:B]
        rope = context_rope(positions, hart.head_dim) if si == 0 else image_rope(pn, final_pn, offsets,
                                                                                  hart.head_dim)
        if on_scale is not None:
            on_scale(si)
        for block in hart.blocks:
            x = block(x, rope)
        logits = hart.get_logits(x, cond_BTD)
        t = cfg * ratio if si < guided_scales else 0.0
        if si < guided_scales:
            logits = (1 + t) * logits[:B] - t * logits[B:]
        if si == 0:  # the first map is predicted from the last text row
            logits = logits[:, [-1], :]
        idx = sample_with_top_k_top_p_(logits, top_k=600 if si < 7 else 300, top_p=top_p, rng=rng)
        if more_smooth:
            tau = max(0.27 * (1 - ratio * 0.95), 0.005)
            h = gumbel_softmax(logits.mul(1 + ratio), tau, rng) @ quant.embedding.weight.unsqueeze(0)
        else:
            h = quant.embedding(idx)
        if si == K - 1 and final_stage == 0:
            h = h + hart.diffusion_residual(x, idx, t, generator)
        h = h.transpose_(1, 2).reshape(B, hart.Cvae, pn, pn)
        f_hat, next_map = quant.get_next_autoregressive_input(si, K, f_hat, h, patch_nums=hart.patch_nums)
        if si < num_scales - 1:
            n = hart.patch_nums[si + 1] ** 2
            x = hart.word_embed(next_map.view(B, hart.Cvae, -1).transpose(1, 2)) + lvl_pos[:, begin : begin + n]
            if si + 1 < guided_scales:
                x = x.repeat(2, 1, 1)  # both CFG halves get the same input
            begin += n
        bar.update()
    for block in hart.blocks:
        block.attn.kv_caching(False)
    bar.set_description("decoding")
    image = tokenizer.fhat_to_img(f_hat).add_(1).mul_(0.5)
    bar.update()
    bar.close()
    return image


# ----------------------------------------------------------------------------- official configuration

# HART-0.7B at 1024 px, as the fields of its llm/config.json. From the source code: the llama
# blocks without AdaLN, the 14-scale schedule, the 300 text tokens (``max_token_length`` of
# sample.py), the diffusion head's width and depth (HARTForT2IConfig defaults: 36.6M parameters,
# the paper's 37M) and 8 sampling steps. From the model's size: 24 blocks of width 1536 with
# 64-channel heads (VAR's depth-width rule; 730M parameters in all). ``context_dim`` 1536 is the
# hidden size of the text encoder (Qwen2-1.5B-Instruct). Assumed, in neither the source nor its
# docs: ``attn_l2_norm`` and ``use_context_norm`` (they add or remove keys; a real checkpoint
# comes with its config.json, which decides).
OFFICIAL = dict(
    context_token=300, context_dim=1536, depth=24, embed_dim=1536, num_heads=24, mlp_ratio=4.0, norm_eps=1e-6,
    attn_l2_norm=True, patch_nums=list(PATCH_NUMS_1024), diff_width=1024, diff_depth=6, num_sampling_steps="8",
    use_context_norm=True, **SUPPORTED,
)
# Its tokenizer: HARTAutoEncoderConfig's defaults (VAR's tokenizer: 4096 codes of 32 channels, 16x
# downsampling, so 64x64 latents at 1024 px) with the hybrid quantizer and the 1024 px schedule.
OFFICIAL_TOKENIZER = dict(
    vocab_size=4096, z_channels=32, ch=160, ch_mult=[1, 1, 2, 2, 4], quant_conv_ks=3, quant_resi=0.5,
    share_quant_resi=4, v_patch_nums=list(PATCH_NUMS_1024), quantizer_type="var_hybrid",
)


def build(depth: int | None = None) -> tuple[HART, HARTTokenizer]:
    """HART-0.7B and its tokenizer with random weights; ``depth`` keeps the width and cuts the blocks
    (for timing the full schedule on small machines)."""
    kwargs = dict(OFFICIAL)
    if depth is not None:
        if not 1 <= depth <= OFFICIAL["depth"]:
            raise ValueError(f"depth must be in 1..{OFFICIAL['depth']}, got {depth}")
        kwargs["depth"] = depth
    tokenizer = HARTTokenizer(test_mode=True, **OFFICIAL_TOKENIZER)
    return HART(tokenizer, **kwargs).eval().requires_grad_(False), tokenizer
