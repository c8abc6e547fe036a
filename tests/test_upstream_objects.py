"""fastvar's upstream path on real numbers: objects with the interface of FoundationVision/Infinity's
(the test double in upstream_infinity.py), patched, against the official FastVAR outputs.

fastvar's own Infinity is checked by test_infinity_reference.py; the patched upstream block and root
(``make_upstream_block_class``, ``make_root_class``) are not reached from there. Tolerances follow
test_infinity_reference.py: bits are compared exactly wherever the reference decision is further than
LOGIT_TOL from its boundary, and everywhere on every scale before the first bit that lies within it.
"""

from __future__ import annotations

import contextlib
import functools
from unittest import mock

import pytest
import torch
import upstream_infinity
from conftest import (
    InfinityReference,
    assert_same_selection,
    bit_decision_margins,
    load_reference,
    random_text,
    reference_cases,
)

import fastvar
from fastvar.state import FastVARState

LOGIT_TOL = 1e-2
# Kept tokens may trade places where their scores (~700 here) are this close, relative to the largest: the
# official code takes the mean over the map with adaptive_avg_pool2d, and later pruned branches see inputs
# that went through the bf16-rounded cross-attention; tiny/a_1M_sq needs 2.8e-5.
SCORE_RTOL = 1e-4
FASTVAR_CASES = reference_cases("infinity", where=lambda case: case["run_fastvar"])


def tokens(case: dict) -> int:
    return sum(t * h * w for t, h, w in case["scale_schedule"])


def cheapest_case_per_set() -> list:
    """reference_cases, one per set: the case with the fewest tokens (unpatched, a 1M case runs for ~4 s on
    2 cores, tiny/b_025M_sq for 0.4 s)."""
    cheapest = {}
    for param in reference_cases("infinity"):
        set_dir, case = param.values
        if set_dir not in cheapest or tokens(case) < tokens(cheapest[set_dir].values[1]):
            cheapest[set_dir] = param
    return list(cheapest.values())


def upstream_call(reference: InfinityReference, case: dict, vae) -> dict:
    """Every keyword of the case's recorded upstream call, except that the image is not decoded."""
    call = {k: v for k, v in case["call"].items() if k != "function"}
    call.update(vae=vae, scale_schedule=[tuple(s) for s in case["scale_schedule"]],
                label_B_or_BLT=reference.text_input(case["name"]), ret_img=False)
    return call


@contextlib.contextmanager
def recording():
    """The logits handed to the double's bit sampler (one per scale) and every FastVAR selection,
    ``{(si, layer, branch): (branch input, kept indices)}``."""
    seen = {"logits": [], "keep": {}}
    sample, select = upstream_infinity.sample_with_top_k_top_p_, FastVARState._select

    def record_sample(logits, **kwargs):
        seen["logits"].append(logits.clone())  # the sampler masks them in place
        return sample(logits, **kwargs)

    def record_select(state, x, keep, si, layer, name):
        seen["keep"][si, layer, name] = (x.clone(), idx := select(state, x, keep, si, layer, name))
        return idx

    with mock.patch.object(upstream_infinity, "sample_with_top_k_top_p_", record_sample), \
            mock.patch.object(FastVARState, "_select", record_select):
        yield seen


def compare(outputs: dict, case: dict, bits: list, summed: torch.Tensor, logits: list) -> int | None:
    """A free run against the reference: logits to LOGIT_TOL and exact bits while the inputs agree. Returns
    the scale where a bit within LOGIT_TOL of its boundary went the other way (later scales legitimately
    follow another path), or None when every scale and the summed codes agree."""
    name = case["name"]
    executed = sum(f"{name}.bits.{si}" in outputs for si in range(len(case["scale_schedule"])))
    assert len(bits) == len(logits) == executed, "executed scales"
    ref_logits = [outputs[f"{name}.logits.{si}"] for si in range(executed)]
    margins = bit_decision_margins(case["g_seed"], ref_logits)
    for si in range(executed):
        torch.testing.assert_close(logits[si], ref_logits[si].reshape(logits[si].shape), atol=LOGIT_TOL, rtol=0,
                                   msg=lambda m, si=si: f"{name}: logits of scale {si}: {m}")
        same = bits[si].to(torch.uint8).flatten() == outputs[f"{name}.bits.{si}"].flatten()
        assert same[margins[si] >= LOGIT_TOL].all(), f"{name}: bits differ at scale {si} where the reference is clear"
        if not same.all():
            return si
    assert torch.equal(summed.squeeze(2), outputs[f"{name}.summed_codes"]), f"{name}: summed codes"
    return None


@functools.cache
def patched_run(set_dir, name: str, model: str, B: int = 1) -> tuple:
    """Bits, summed codes and recordings of a case's free run under the paper preset, by the double
    (``model`` 'upstream'; 'upstream-unfused': its blocks' fused_norm_func None) or by fastvar's own Infinity
    ('fastvar'); with ``B`` > 1, on B random prompts of different lengths instead of the case's. Shared by
    the tests."""
    reference = load_reference(InfinityReference, set_dir)
    case = next(c for c in reference.cases if c["name"] == name)
    fast, vae = reference.build()
    sampler = fast if model == "fastvar" else upstream_infinity.Infinity(fast, fused_norm=model == "upstream")
    fastvar.patch(sampler, "paper")
    call = upstream_call(reference, case, vae)
    if B > 1:
        text = random_text([4 + 5 * i for i in range(B)], channels=fast.Ct5, seed=B)
        call.update(B=B, label_B_or_BLT=text)
    with recording() as seen:
        _, bits, summed = sampler.autoregressive_infer_cfg(**call)
    return bits, summed, seen


def assert_same_run(run: tuple, own: tuple) -> None:
    """A run of the double and one of fastvar's own Infinity: the same bits, codes and kept tokens."""
    (bits, summed, seen), (own_bits, own_summed, own_seen) = run, own
    assert len(own_bits) == len(bits)
    for si, (own_scale, double_scale) in enumerate(zip(own_bits, bits)):
        assert torch.equal(own_scale, double_scale), f"bits of scale {si}"
    assert torch.equal(own_summed, summed)
    assert seen["keep"] and sorted(own_seen["keep"]) == sorted(seen["keep"]), "pruned (scale, block, branch)"
    for key, (x, keep) in seen["keep"].items():
        # identical here; rounding may differ elsewhere
        assert_same_selection(x, keep, own_seen["keep"][key][1], SCORE_RTOL)


@pytest.mark.parametrize("set_dir, case", cheapest_case_per_set())
def test_unpatched_double_reproduces_upstream(set_dir, case):
    """The double itself is upstream: bits, logits and summed codes of the unmodified upstream code."""
    reference = load_reference(InfinityReference, set_dir)
    model, vae = reference.build()
    with recording() as seen:
        _, bits, summed = upstream_infinity.Infinity(model).autoregressive_infer_cfg(
            **upstream_call(reference, case, vae))
    compare(reference.outputs, case, bits, summed, seen["logits"])


@pytest.mark.parametrize("set_dir, case", FASTVAR_CASES)
def test_patched_double_reproduces_the_official_fastvar_code(set_dir, case):
    """Bits of every executed scale (none after the skipped ones), summed codes and the tokens every
    block branch kept."""
    reference = load_reference(InfinityReference, set_dir)
    bits, summed, seen = patched_run(set_dir, case["name"], "upstream")
    assert compare(reference.fastvar_outputs, case, bits, summed, seen["logits"]) is None
    prefix = f"{case['name']}.keep."
    expected = {}
    for key, value in reference.fastvar_outputs.items():
        if key.startswith(prefix):
            si, layer, branch = key[len(prefix) :].split(".")
            expected[int(si), int(layer), branch] = value
    assert sorted(seen["keep"]) == sorted(expected), "pruned (scale, block, branch)"
    for key, (x, keep) in seen["keep"].items():
        assert_same_selection(x, keep, expected[key], SCORE_RTOL)


@pytest.mark.parametrize("model", ["upstream", "upstream-unfused"])
@pytest.mark.parametrize("set_dir, case", reference_cases("infinity"))
def test_patched_double_matches_fastvars_own_patched_infinity(set_dir, case, model):
    """The same numerics through the two block classes (the upstream one with either norm), on every case's
    schedule (other sizes and aspect ratios than the official FastVAR outputs have)."""
    load_reference(InfinityReference, set_dir)  # skips without the reference data
    assert_same_run(patched_run(set_dir, case["name"], model), patched_run(set_dir, case["name"], "fastvar"))


@pytest.mark.parametrize("set_dir, case", cheapest_case_per_set())
def test_patched_double_matches_fastvars_own_patched_infinity_on_a_batch(set_dir, case):
    """Three prompts: six CFG rows, each with its own kept tokens and rotary rows (the official code's
    rotary gather hard-codes the two rows of one image)."""
    load_reference(InfinityReference, set_dir)
    name = case["name"]
    assert_same_run(patched_run(set_dir, name, "upstream", B=3), patched_run(set_dir, name, "fastvar", B=3))
