"""patch on HART: the official FastVAR HART outputs reproduced, any batch size, kept K/V only, the text
stage never pruned or cached, skipping, and the cost model."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    HartReference,
    assert_same_selection,
    attended_keys,
    hart_text,
    load_reference,
    reference_cases,
    tiny_hart,
)

import fastvar
import fastvar.models.hart as hart_module
import fastvar.state as state_module
from fastvar import FastVARConfig
from fastvar.adapters.hart import HartAdapter
from fastvar.hub import parameters_on_meta
from fastvar.models.hart import build


def sampling_margins(logits: torch.Tensor, rng_state: torch.Tensor) -> torch.Tensor:
    """Per token (B, l), how far the drawn entry is ahead of the runner-up. The sampler is an
    exponential race (argmax of log p - log E, E drawn from the generator row by row, as the reference
    README says), so a logit error below the margin cannot change the draw."""
    B, l, V = logits.shape
    rng = torch.Generator().set_state(rng_state)
    exponential = torch.empty(B * l, V).exponential_(generator=rng)
    top2 = (logits.reshape(-1, V).log_softmax(-1) - exponential.log()).topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).view(B, l)


def record(monkeypatch, model, teacher: dict | None = None):
    """The sampled indices and their sampling margins of every scale, the inputs and kept indices of
    every pruned branch call and f_hat. With ``teacher`` (reference outputs of a case) every scale's
    indices and token map are replaced by the reference's after they are recorded."""
    seen = {"idx": [], "margin": [], "logits": [], "keep": [], "f_hat": None}
    sample, select = hart_module.sample_with_top_k_top_p_, state_module.select_pivotal
    tokenizer = model.vae_proxy[0]
    quant, decode = model.vae_quant_proxy[0], tokenizer.fhat_to_img
    next_input = quant.get_next_autoregressive_input

    def record_sample(logits, **kwargs):
        si, state = len(seen["idx"]), kwargs["rng"].get_state()
        seen["logits"].append(logits.clone())
        idx = sample(logits, **kwargs)  # masks the logits in place, as the draw sees them
        seen["margin"].append(sampling_margins(logits, state))
        seen["idx"].append(idx)
        return idx if teacher is None else teacher[f"idx.{si}"].view(idx.shape).long()

    def record_select(x, keep):
        seen["keep"].append((x.clone(), select(x, keep)))
        return seen["keep"][-1][1]

    def record_next_input(si, SN, f_hat, h_BChw, patch_nums=None):
        if teacher is not None and si < SN - 1:
            h_BChw = teacher[f"h.{si}"].clone()
        return next_input(si, SN, f_hat, h_BChw, patch_nums)

    def record_decode(f_hat):
        seen["f_hat"] = f_hat.clone()
        return decode(f_hat)

    monkeypatch.setattr(hart_module, "sample_with_top_k_top_p_", record_sample)
    monkeypatch.setattr(state_module, "select_pivotal", record_select)
    monkeypatch.setattr(quant, "get_next_autoregressive_input", record_next_input)
    monkeypatch.setattr(tokenizer, "fhat_to_img", record_decode)
    return seen


@pytest.mark.parametrize("teacher_forced", [False, True], ids=["free-running", "teacher-forced"])
@pytest.mark.parametrize("set_dir, case", reference_cases("hart", where=lambda case: case["run_fastvar"]))
def test_paper_preset_reproduces_the_official_fastvar_hart_code(set_dir, case, monkeypatch, teacher_forced):
    """Bit for bit on the reference CPU. Elsewhere matmuls round differently (about 1e-6) and the
    soft embeddings magnify it, so a draw may differ only where the reference's sampler was nearly tied
    (the reference has one token with a margin of 5e-6), and a kept token may trade places only with
    one of nearly equal score. Teacher forcing feeds every scale the reference's inputs and checks the
    numerics: logits, selections, latent."""
    reference = load_reference(HartReference, set_dir)
    model, _ = reference.build()
    fastvar.patch(model, "paper")
    kv_lengths = []
    model.blocks[0].attn.register_forward_hook(lambda m, a, out: kv_lengths.append(attended_keys(m, a[0])))
    name = case["name"]
    ref = {k.removeprefix(f"{name}."): v for k, v in reference.fastvar_outputs.items() if k.startswith(f"{name}.")}
    seen = record(monkeypatch, model, ref if teacher_forced else None)
    torch.manual_seed(case["torch_global_seed"])
    model.autoregressive_infer_cfg(**reference.call(case))
    monkeypatch.undo()
    K = len(model.patch_nums)
    for si in range(K):
        expected = ref[f"idx.{si}"]
        clear = seen["margin"][si].view(expected.shape) > 1e-4
        assert torch.equal(seen["idx"][si].view(expected.shape).int()[clear], expected[clear]), f"indices at {si}"
    pruned = sorted({int(k.split(".")[1]) for k in ref if k.startswith("keep.")})
    expected = [ref[f"keep.{si}.{layer}.{branch}"] for si in pruned for layer in range(model.depth)
                for branch in ("attn", "ffn")]
    assert pruned == [K - 2, K - 1] and len(seen["keep"]) == len(expected)
    assert kv_lengths == case["fastvar_result"]["kv_tokens_block0_after_scale"]
    summary = fastvar.summary(model)
    official = case["fastvar_result"]["pruned_scales"]
    assert {str(r.index): [r.kept] for r in summary.rows if r.kept is not None} == {
        si: scale["kept"] for si, scale in official.items()}
    assert summary.rows[-3].cached and summary.rows[0].text
    if not teacher_forced:
        return
    for (x, keep), keep_expected in zip(seen["keep"], expected):
        assert_same_selection(x, keep, keep_expected)
    for si in range(K):
        rows = ref[f"logits.{si}"].shape[1]
        torch.testing.assert_close(seen["logits"][si][:, :rows], ref[f"logits.{si}"], atol=2e-5, rtol=0,
                                   msg=lambda m, si=si: f"logits at scale {si}: {m}")
    torch.testing.assert_close(seen["f_hat"], ref["f_hat"], atol=1e-3, rtol=0)


def teacher_forced_logits(model, monkeypatch, prompt, idx_per_scale):
    """Logits of every scale when the sampler is made to return ``idx_per_scale`` (one row per prompt)."""
    seen = []

    def forced(logits, **kwargs):
        seen.append(logits.clone())
        return idx_per_scale[len(seen) - 1]

    monkeypatch.setattr(hart_module, "sample_with_top_k_top_p_", forced)
    model.autoregressive_infer_cfg(**prompt, g_seed=0, cfg=3.0, more_smooth=False, final_stage=1)
    monkeypatch.undo()
    return seen


def test_batched_rows_match_single_prompts(monkeypatch):
    """Each CFG row selects its own tokens and gathers its own rotary rows: batching changes nothing."""
    model = tiny_hart()
    fastvar.patch(model, FastVARConfig(prune={-3: 0.4, -2: 0.5, -1: 0.75}))
    prompts = hart_text([2, 6, 4], seed=3)
    drawn = []
    sample = hart_module.sample_with_top_k_top_p_
    monkeypatch.setattr(hart_module, "sample_with_top_k_top_p_", lambda lg, **kw: drawn.append(sample(lg, **kw))
                        or drawn[-1])
    model.autoregressive_infer_cfg(**prompts, g_seed=0, cfg=3.0, more_smooth=False, final_stage=1)
    monkeypatch.undo()
    batched = teacher_forced_logits(model, monkeypatch, prompts, drawn)
    for row in range(3):
        single = {k: v[row : row + 1] if torch.is_tensor(v) else 1 for k, v in prompts.items()}
        logits = teacher_forced_logits(model, monkeypatch, single, [d[row : row + 1] for d in drawn])
        for si, (a, b) in enumerate(zip(logits, batched)):
            torch.testing.assert_close(a[0], b[row], atol=1e-5, rtol=1e-5, msg=lambda m, si=si: f"scale {si}: {m}")


def test_only_kept_tokens_enter_the_kv_cache():
    model = tiny_hart()
    fastvar.patch(model, FastVARConfig(prune={-2: 0.5, -1: 0.75}, layers=[1]))
    schedule = model._fastvar.schedule
    lengths = {layer: [] for layer in range(2)}
    for layer, block in enumerate(model.blocks):
        block.attn.register_forward_hook(lambda m, a, out, layer=layer: lengths[layer].append(attended_keys(m, a[0])))
    model.autoregressive_infer_cfg(**hart_text([3, 5]), g_seed=1, cfg=2.0)
    for layer in range(2):
        run = [schedule.tokens_run(si, layer) for si in range(len(schedule.tokens))]
        assert lengths[layer] == [sum(run[: si + 1]) for si in range(len(run))]
    assert lengths[1][-1] < lengths[0][-1]


def test_the_text_stage_is_never_pruned_or_cached():
    model = tiny_hart()
    with pytest.raises(ValueError, match=r"the cache scale \(index 0\) would be the text stage"):
        fastvar.patch(model, prune={-1: 0.5}, cache_scale=0)
    with pytest.raises(ValueError, match=r"scale 0 holds the text tokens, not a token map: it cannot be pruned"):
        fastvar.patch(model, prune={0: 0.5})
    with pytest.raises(ValueError, match=r"the cache scale \(index 0\) would be the text stage"):
        fastvar.patch(model, prune={1: 0.5})  # its default cache, the scale before, is the text
    assert not fastvar.is_patched(model)


def test_skipping_the_last_scale_leaves_out_the_diffusion_head(monkeypatch):
    model = tiny_hart()
    unpatched = record(monkeypatch, model)
    full = model.autoregressive_infer_cfg(**hart_text([4]), g_seed=2, cfg=2.0)
    monkeypatch.undo()
    fastvar.patch(model, "skip-last")
    diffusion_calls = []
    model.diffloss.register_forward_pre_hook(lambda *_: diffusion_calls.append(1))
    monkeypatch.setattr(model.diffloss, "sample", lambda *a, **k: pytest.fail("the diffusion head ran"))
    skipped = record(monkeypatch, model)
    image = model.autoregressive_infer_cfg(**hart_text([4]), g_seed=2, cfg=2.0)
    K = len(model.patch_nums)
    assert len(skipped["idx"]) == K - 1 and image.shape == full.shape
    assert all(torch.equal(a, b) for a, b in zip(unpatched["idx"][: K - 2], skipped["idx"][: K - 2]))
    assert [r.skipped for r in fastvar.summary(model).rows] == [False] * (K - 1) + [True]


def test_patched_preset_that_prunes_nothing_is_bit_identical():
    model = tiny_hart()
    torch.manual_seed(0)
    expected = model.autoregressive_infer_cfg(**hart_text([3, 6]), g_seed=4, cfg=3.0, more_smooth=True)
    fastvar.patch(model, "none")
    torch.manual_seed(0)
    assert torch.equal(model.autoregressive_infer_cfg(**hart_text([3, 6]), g_seed=4, cfg=3.0, more_smooth=True),
                       expected)


def test_cost_model_counts_swiglu_text_keys_and_the_diffusion_head():
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_attention(query, key, value, *args, out_shape=None, **kwargs):  # not counted by default on the CPU
        return sdpa_flop_count(query, key, value)

    model = tiny_hart()
    counted = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention}
    with FlopCounterMode(display=False, custom_mapping=counted) as counter:
        model.autoregressive_infer_cfg(**hart_text([3]), g_seed=0, cfg=2.0)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    # everything but the tokenizer (its decoder, the Phi convs, post_quant_conv): blocks, heads, embeddings
    measured = counts["Global"] - counts["Decoder"] - counts["Phi"] - counts["Conv2d"]
    cost = HartAdapter.cost_model(model)
    schedule = FastVARConfig().resolve(HartAdapter.scale_shapes(model), model.depth, HartAdapter.text_scales)
    modelled = 2 * sum(cost.schedule_flops(schedule, patched=False))  # two CFG rows
    assert modelled == pytest.approx(measured, rel=0.02)


@pytest.mark.parametrize("family, preset, expected", [
    ("var", "default", 0.704), ("infinity", "paper", 0.236), ("infinity", "prune-only", 0.891),
    ("infinity", "skip-only", 0.318), ("hart", "paper", 0.514), ("hart", "skip-last", 0.324),
])
def test_documented_ideal_ratios_of_the_official_architectures(family, preset, expected):
    from fastvar.models import infinity, var

    with parameters_on_meta():
        model = {"var": lambda: var.build(16)[1], "infinity": lambda: infinity.build("infinity-2b")[0],
                 "hart": lambda: build()[0]}[family]()
    fastvar.patch(model, preset)  # Infinity: its default schedule, the square 1M one
    assert round(fastvar.summary(model).flop_ratio, 3) == expected
