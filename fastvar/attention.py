"""Multi-head attention: flash-attn when it is installed and can run, torch SDPA otherwise."""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from flash_attn import flash_attn_func
except ImportError:  # flash-attn is optional, for CUDA machines (the 'flash' extra)
    flash_attn_func = None

FLASH_DTYPES = (torch.float16, torch.bfloat16)


def flash_available(q: torch.Tensor) -> bool:
    """Whether flash-attn can take ``q``: installed, on CUDA, in half precision."""
    return flash_attn_func is not None and q.is_cuda and q.dtype in FLASH_DTYPES


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    mask: torch.Tensor | None = None, use_flash: bool = True,
) -> torch.Tensor:
    """Softmax attention of q (B, H, Lq, D) over k, v (B, H, Lk, D); returns (B, Lq, H*D).

    An additive ``mask`` forces the SDPA path (flash-attn takes none).
    """
    B, H, Lq, D = q.shape
    if use_flash and mask is None and flash_available(q):
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
        return out.reshape(B, Lq, H * D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(B, Lq, H * D)
