"""A test double of the objects the upstream repository (FoundationVision/Infinity) builds.

fastvar patches two kinds of Infinity: its own (``fastvar.models.infinity``) and upstream's, whose block
and root have other call signatures (``fastvar.adapters.infinity.make_upstream_block_class`` and
``make_root_class``). The upstream package is not installed here (it imports flash-attn at module level),
so this module presents upstream's *interface* over the modules and weights of a loaded fastvar ``Infinity``:

* ``Infinity`` (the class name fastvar recognises): ``autoregressive_infer_cfg`` with upstream's
  parameter names, which runs upstream's loop and tells fastvar nothing about which scale runs; the
  rotary table ``rope2d_freqs_grid`` as upstream keeps it (a dict keyed by ``str(tuple(scale_schedule))``
  holding the template's whole 1M table, zero-padded, shaped (2, 1, 1, 1, L, head_dim / 2));
* ``CrossAttnBlock``: upstream's ``forward`` signature and the attributes the patched block reads;
* ``SelfAttention``: upstream's call signature; it slices its rotary rows from the table as upstream's
  ``apply_rotary_emb`` does and keeps upstream's growing KV cache (``torch.cat``), so only the tokens a
  pruned scale runs enter it.

The numerics are fastvar's (which reproduce upstream's): the double shares the fastvar model's
parameters. Nothing is copied from upstream; its source was read for facts only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastvar.models import infinity as fast
from fastvar.models.sampling import sample_with_top_k_top_p_

PAD_TO_MULTIPLIER = 128  # the official loader's: upstream pads its rotary tables to a multiple of this


def fused_ada_layer_norm(C: int, eps: float, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Upstream's ``fused_ada_layer_norm`` (a torch.compile'd function there), keyword signature included."""
    return fast.ada_layer_norm(x, scale, shift, eps)


class SelfAttention(nn.Module):
    """Upstream's self-attention interface over fastvar's ``SelfAttention`` parameters (``inner``)."""

    def __init__(self, inner: fast.SelfAttention):
        super().__init__()
        self.inner = inner
        self.caching, self.cached_k, self.cached_v = False, None, None

    def kv_caching(self, enable: bool) -> None:
        self.caching, self.cached_k, self.cached_v = enable, None, None

    def forward(self, x, attn_bias_or_two_vector, attn_fn=None, scale_schedule=None, rope2d_freqs_grid=None,
                scale_ind=0):
        assert attn_bias_or_two_vector is None and attn_fn is None, "inference only"
        m, (B, L, C) = self.inner, x.shape
        bias = torch.cat((m.q_bias, m.zero_k_bias, m.v_bias))
        q, k, v = F.linear(x, m.mat_qkv.weight, bias).view(B, L, 3, m.num_heads, m.head_dim).permute(
            2, 0, 3, 1, 4).unbind(0)
        q = F.normalize(q, dim=-1, eps=1e-12).mul(m.scale_mul_1H11.clamp_max(m.max_scale_mul).exp())
        k = F.normalize(k, dim=-1, eps=1e-12)
        # apply_rotary_emb: this call's L rows, from the offset of scale ``scale_ind`` in the schedule
        start = sum(t * h * w for t, h, w in scale_schedule[:scale_ind])
        table = rope2d_freqs_grid[str(tuple(scale_schedule))]
        assert start + L <= table.shape[4]
        q, k = fast.apply_rope(q, k, table[:, :, :, :, start : start + L])  # rows broadcast over (B, H)
        if self.caching:
            if self.cached_k is not None:
                k, v = torch.cat((self.cached_k, k), dim=2), torch.cat((self.cached_v, v), dim=2)
            self.cached_k, self.cached_v = k, v
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        return m.proj(out.transpose(1, 2).reshape(B, L, C))


class CrossAttnBlock(nn.Module):
    """Upstream's block interface over a fastvar block's sub-modules.

    Upstream's forward passes ``scale_ind`` to its self-attention only on its fused-norm branch (the
    official configuration, ``fused_norm=True``, which the reference ran); its unfused branch drops it.
    This double always takes the fused branch's calls, with ``fused_norm_func`` None meaning the plain
    ada-LN (the patched block makes the same substitution).
    """

    def __init__(self, block: fast.CrossAttnBlock, fused_norm: bool):
        super().__init__()
        self.sa = SelfAttention(block.sa)
        self.ca, self.ffn, self.ca_norm, self.ada_gss = block.ca, block.ffn, block.ca_norm, block.ada_gss
        self.C, self.norm_eps = block.C, block.norm_eps
        self.fused_norm_func = fused_ada_layer_norm if fused_norm else None
        self.ca_gamma = 1  # upstream's value for cross_attn_layer_scale=-1, the official one

    def forward(self, x, cond_BD, ca_kv, attn_bias_or_two_vector, attn_fn=None, scale_schedule=None,
                rope2d_freqs_grid=None, scale_ind=0):
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + cond_BD).unbind(2)
        norm = self.fused_norm_func or (lambda C, eps, x, scale, shift: fast.ada_layer_norm(x, scale, shift, eps))
        x_sa = self.sa(norm(C=self.C, eps=self.norm_eps, x=x, scale=scale1, shift=shift1), attn_bias_or_two_vector,
                       attn_fn, scale_schedule, rope2d_freqs_grid, scale_ind=scale_ind)
        x = x + x_sa.mul_(gamma1)
        x = x + self.ca(self.ca_norm(x), ca_kv).float().mul_(self.ca_gamma)
        return x + self.ffn(norm(C=self.C, eps=self.norm_eps, x=x, scale=scale2, shift=shift2)).mul(gamma2)


def upstream_rope_table(schedule, head_dim: int) -> torch.Tensor:
    """What upstream's ``precompute_rope2d_freqs_grid`` stores under the key of ``schedule``: the rows of
    the template's whole 1M schedule (``schedule`` must be a prefix of it, or upstream has no key),
    zero-padded to a multiple of PAD_TO_MULTIPLIER, shaped (2, 1, 1, 1, L, head_dim / 2)."""
    _, h, w = schedule[-1]
    template = fast.TEMPLATE_SCALES[fast.nearest_template(h / w)]
    assert [(h, w) for _, h, w in schedule] == template[: len(schedule)], "upstream keys only template prefixes"
    table = fast.rope_table([(1, h, w) for h, w in template], head_dim, template[-1])
    table = F.pad(table, (0, 0, 0, -table.shape[1] % PAD_TO_MULTIPLIER))
    return table[:, None, None, None]


class Infinity(nn.Module):
    """Upstream's root interface over a fastvar ``Infinity`` (``model``), whose parameters it shares."""

    def __init__(self, model: fast.Infinity, fused_norm: bool = True):
        super().__init__()
        self.model = model
        self.unregistered_blocks = [CrossAttnBlock(b, fused_norm) for b in model.unregistered_blocks]
        self.lvl_embed, self.word_embed = model.lvl_embed, model.word_embed
        self.C, self.V, self.num_heads = model.C, model.V, model.num_heads
        self.apply_spatial_patchify = model.apply_spatial_patchify
        self.rng = torch.Generator()
        self.rope2d_freqs_grid = {}  # upstream fills it for every template at construction; here on first use

    @torch.no_grad()
    def autoregressive_infer_cfg(
        self, vae=None, scale_schedule=None, label_B_or_BLT=None, B=1, negative_label_B_or_BLT=None,
        force_gt_Bhw=None, g_seed=None, cfg_list=(), tau_list=(), cfg_sc=3, top_k=0, top_p=0.0, returns_vemb=0,
        ratio_Bl1=None, gumbel=0, norm_cfg=False, cfg_exp_k=0.0, cfg_insertion_layer=(-5,), vae_type=0,
        softmax_merge_topk=-1, ret_img=False, trunk_scale=1000, gt_leak=0, gt_ls_Bl=None, inference_mode=False,
        save_img_path=None, sampling_per_bits=1,
    ):
        """Upstream's sampling loop (bit labels only). Teacher forcing (``gt_leak``) takes (B, h, w, d) bits
        and the return value is fastvar's, ``([], bits of every executed scale, summed codes or image)``:
        upstream returns neither bits nor codes (the reference recorded them by wrapping)."""
        unsupported = (force_gt_Bhw, ratio_Bl1, gumbel, norm_cfg, cfg_exp_k, softmax_merge_topk, sampling_per_bits)
        assert vae_type != 0 and returns_vemb and unsupported == (None, None, 0, False, 0.0, -1, 1)
        model, blocks, K = self.model, self.unregistered_blocks, len(scale_schedule)
        rng = None if g_seed is None else self.rng.manual_seed(g_seed)
        patchify = self.apply_spatial_patchify
        vae_schedule = [(t, 2 * h, 2 * w) for t, h, w in scale_schedule] if patchify else scale_schedule
        key = str(tuple(scale_schedule))
        if key not in self.rope2d_freqs_grid:
            self.rope2d_freqs_grid[key] = upstream_rope_table(scale_schedule, self.C // self.num_heads)

        bs = 2 * B if any(c != 1 for c in cfg_list) else B
        cond_BD, ca_kv = model.encode_text(label_B_or_BLT, negative_label_B_or_BLT, bs > B)
        x = cond_BD.unsqueeze(1).expand(bs, 1, -1) + model.pos_start.expand(bs, 1, -1)
        gss = model.shared_ada_lin(cond_BD.float()).float().contiguous()
        mix_layers = {len(blocks) + i for i in cfg_insertion_layer if i < 0}
        for b in blocks:
            b.sa.kv_caching(True)
        summed_codes, bits_list = 0, []
        for si, (t, h, w) in enumerate(scale_schedule):
            if si >= trunk_scale:
                break
            cfg = cfg_list[si]
            x[:, : t * h * w] += self.lvl_embed(torch.full((bs, t * h * w), si, dtype=torch.int, device=x.device))
            for layer, b in enumerate(blocks):
                x = b(x=x, cond_BD=gss, ca_kv=ca_kv, attn_bias_or_two_vector=None, attn_fn=None,
                      scale_schedule=scale_schedule, rope2d_freqs_grid=self.rope2d_freqs_grid, scale_ind=si)
                if cfg != 1 and layer in mix_layers:
                    x = cfg * x[:B] + (1 - cfg) * x[B:]
                    x = torch.cat((x, x))
            if cfg != 1 and 0 in cfg_insertion_layer:
                logits = model.get_logits(x, cond_BD).mul(1 / tau_list[si])
                logits = cfg * logits[:B] + (1 - cfg) * logits[B:]
            else:
                logits = model.get_logits(x[:B], cond_BD[:B]).mul(1 / tau_list[si])
            bits = sample_with_top_k_top_p_(logits.reshape(B, -1, 2), top_k=top_k, top_p=top_p, rng=rng)
            bits = gt_ls_Bl[si] if si < gt_leak else bits.reshape(B, h, w, -1)
            bits_list.append(bits)
            codes = vae.bits_to_codes(bits)
            if si == K - 1:
                summed_codes = summed_codes + codes
                break
            summed_codes = summed_codes + F.interpolate(codes, size=vae_schedule[-1], mode="trilinear")
            x = F.interpolate(summed_codes, size=vae_schedule[si + 1], mode="trilinear").squeeze(-3)
            if patchify:
                x = F.pixel_unshuffle(x, 2)
            x = self.word_embed(x.flatten(2).transpose(1, 2)).repeat(bs // B, 1, 1)
        for b in blocks:
            b.sa.kv_caching(False)
        if not ret_img:
            return [], bits_list, summed_codes
        image = (vae.decode(summed_codes.squeeze(-3)) + 1) / 2
        return [], bits_list, image.permute(0, 2, 3, 1).mul_(255).to(torch.uint8).flip(dims=(3,))
