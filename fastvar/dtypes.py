"""The precisions fastvar runs in, and the names by which the pipelines, the summary and the CLI take them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def resolve_dtype(dtype: torch.dtype | str | None, accepted: Sequence[torch.dtype] = tuple(DTYPES.values()),
                  what: str = "dtype") -> torch.dtype:
    """``dtype`` as a torch dtype: one of ``accepted``, given as a torch dtype or by name ('fp32', 'bf16',
    'fp16'); None is float32. ``ValueError`` naming the accepted ones otherwise."""
    if dtype is None:
        return torch.float32
    resolved = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if resolved not in accepted:
        names = [f"{dtype_name(d)} (torch.{str(d).removeprefix('torch.')})" for d in accepted]
        raise ValueError(f"{what} {dtype!r} is not supported; supported: {', '.join(names)}")
    return resolved
