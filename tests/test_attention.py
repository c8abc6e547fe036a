"""Attention dispatch: SDPA on CPU and in float32, flash-attn only where it can run."""

from __future__ import annotations

import torch

import fastvar.attention as attn_module
from fastvar.attention import attention, flash_available


def test_sdpa_path_is_softmax_attention_with_heads_merged():
    q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64) for n in (5, 7, 7))
    mask = torch.zeros(5, 7, dtype=torch.float64)
    mask[:, -2:] = -torch.inf
    out = attention(q, k, v, scale=0.3, mask=mask)
    weights = (q @ k.transpose(-1, -2) * 0.3 + mask).softmax(dim=-1)
    torch.testing.assert_close(out, (weights @ v).transpose(1, 2).reshape(2, 5, 24))


def test_flash_is_used_only_when_installed_on_cuda_in_half_precision(monkeypatch):
    calls = []
    monkeypatch.setattr(attn_module, "flash_attn_func", lambda *a, **k: calls.append(a))
    assert not flash_available(torch.zeros(1, dtype=torch.float16))  # CPU tensor
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert flash_available(torch.zeros(1, dtype=torch.bfloat16))
    assert not flash_available(torch.zeros(1, dtype=torch.float32))
    monkeypatch.setattr(attn_module, "flash_attn_func", None)
    assert not flash_available(torch.zeros(1, dtype=torch.float16))


def test_flash_receives_sequence_major_tensors_and_the_scale(monkeypatch):
    seen = {}

    def fake_flash(q, k, v, softmax_scale):
        seen.update(shapes=(q.shape, k.shape, v.shape), scale=softmax_scale)
        return torch.ones(q.shape, dtype=q.dtype)

    monkeypatch.setattr(attn_module, "flash_attn_func", fake_flash)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    q, k, v = (torch.randn(2, 4, n, 8, dtype=torch.float16) for n in (3, 6, 6))
    out = attention(q, k, v, scale=0.5)
    assert seen == {"shapes": ((2, 3, 4, 8), (2, 6, 4, 8), (2, 6, 4, 8)), "scale": 0.5}
    assert out.shape == (2, 3, 32)
    seen.clear()
    attention(q, k, v, scale=0.5, mask=torch.zeros(3, 6, dtype=torch.float16))  # flash-attn takes no mask
    attention(q, k, v, scale=0.5, use_flash=False)
    assert seen == {}
