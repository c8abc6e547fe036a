"""fastvar's InfinityStar reproduces the unmodified upstream InfinityStar (``ar_infer_infinity_elegant``).

Each case of every ``infinitystar`` set is run teacher-forced (the reference bits as inputs, so every
step's logits before and after APG can be compared) and free-running (every bit, the summed latent and
the decoded frames). The sampler draws an Exp(1) pair per bit from the seeded generator whatever the
logits, so how far each reference decision lies from flipping is known: a free run may leave the
reference path only at a bit closer to its boundary than the logit tolerance (none on the public set).
"""

from __future__ import annotations

import pytest
import torch
from conftest import InfinityStarReference, load_reference, reference_cases

from fastvar.models.infinitystar import scale_contexts, scale_schedule

LOGIT_TOL = 1e-5
BATCH_LOGIT_TOL = 1e-2
FRAME_TOL = 1e-5
OTHER_SEED = 12345


def call_kwargs(reference: InfinityStarReference, case: dict) -> dict:
    call = case["call"]
    assert call["B"] == 1 and call["gt_leak"] == -1 and case["apg_kwargs"]["eta"] == 0
    assert all(cfg == case["apg_kwargs"]["guidance_scale"] for cfg in call["cfg_list"])
    return dict(checkpoint=reference.checkpoint, cfg_list=call["cfg_list"], tau_list=call["tau_list"],
                apg_norm_threshold=case["apg_kwargs"]["norm_threshold"], return_summed_code_only=True)


def reference_steps(reference: InfinityStarReference, case: dict, kind: str) -> list[torch.Tensor]:
    return [reference.outputs[f"{case['name']}.{kind}.{k}"] for k in range(case["n_steps"])]


def decision_margins(g_seed: int, logits: list[torch.Tensor]) -> torch.Tensor:
    """Per bit of a run, |(l1 - l0) - (log E1 - log E0)|: how far the multinomial's choice is from flipping.
    CPU ``multinomial(p, 1)`` takes argmax(p / E), E ~ Exp(1) drawn two per bit, step after step."""
    rng = torch.Generator().manual_seed(g_seed)
    margins = []
    for step_logits in logits:
        pairs = step_logits.reshape(-1, 2)
        e = torch.empty_like(pairs).exponential_(generator=rng).log()
        margins.append(((pairs[:, 1] - pairs[:, 0]) - (e[:, 1] - e[:, 0])).abs())
    return torch.cat(margins)


def sampled_bits(model, kwargs: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The summed latent of a run and every step's bits (recorded from the guided logits' sampler)."""
    bits = []
    sample = model.sample

    def recording(logits, generators):
        drawn = sample(logits, generators)
        bits.append(drawn.clone())
        return drawn
    model.sample = recording
    try:
        latent = model.autoregressive_infer(None, **kwargs)
    finally:
        del model.sample
    return latent, bits


def assert_same_path(bits: list[torch.Tensor], expected: list[torch.Tensor], margins: torch.Tensor, what: str,
                     tol: float = LOGIT_TOL) -> bool:
    """Every bit equal, or equal up to the first one whose reference decision is within ``tol``.
    Returns whether the whole run followed the reference."""
    ours = torch.cat([b.flatten() for b in bits]).to(torch.uint8)
    theirs = torch.cat([b.flatten() for b in expected])
    assert ours.shape == theirs.shape, f"{what}: {ours.numel()} bits sampled, the reference has {theirs.numel()}"
    differ = (ours != theirs).nonzero()
    if not len(differ):
        return True
    first = differ[0].item()
    assert margins[first] < tol, f"{what}: bit {first} differs where the reference decision is clear"
    return False


@pytest.mark.parametrize("set_dir, case", reference_cases("infinitystar"))
def test_schedule_context_and_steps(set_dir, case):
    """The schedule, each scale's context and every step's (scale, head, temperature) are upstream's."""
    reference = load_reference(InfinityStarReference, set_dir)
    schedule = scale_schedule(case["h_div_w"], reference.args["pn"], case["duration"])
    assert schedule == [tuple(s) for s in case["scale_schedule"]]
    contexts = scale_contexts(schedule)
    for si, info in case["context_info"].items():
        c = contexts[int(si)]
        assert (list(c.ref_sids), c.frame_ss, c.frame_ee) == (info["ref_sids"], info["frame_ss"], info["frame_ee"])
    reps = reference.checkpoint.repetitions(schedule)
    scale_of_step = [si for si, n in enumerate(reps) for _ in range(n)]
    assert scale_of_step == [step["si"] for step in case["steps"]]
    per_clip = len(reference.checkpoint.image_scale_repetition)
    for step in case["steps"]:
        semantic = step["si"] % per_clip < reference.checkpoint.semantic_scales
        assert step["head"] == ("semantic_head2" if semantic else "head")
        assert step["tau"] == case["call"]["tau_list"][step["si"]]


@pytest.mark.parametrize("set_dir, case", reference_cases("infinitystar"))
def test_teacher_forced_logits(set_dir, case):
    reference = load_reference(InfinityStarReference, set_dir)
    name, model = case["name"], reference.model
    schedule = [tuple(s) for s in case["scale_schedule"]]
    text, negative = reference.texts(name)
    seen = {}
    latent = model.autoregressive_infer(
        None, schedule, text, negative_label_B_or_BLT=negative, g_seed=case["g_seed"],
        gt_leak=len(schedule), gt_ls_Bl=[b.long() for b in reference_steps(reference, case, "bits")],
        on_step_logits=lambda k, raw, guided: seen.__setitem__(k, (raw.clone(), guided.clone())),
        **call_kwargs(reference, case))
    raw_expected, guided_expected = reference_steps(reference, case, "logits_raw"), reference_steps(
        reference, case, "logits")
    assert sorted(seen) == list(range(case["n_steps"]))
    for k, (raw, guided) in seen.items():
        torch.testing.assert_close(raw.reshape(raw_expected[k].shape), raw_expected[k], atol=LOGIT_TOL, rtol=0,
                                   msg=lambda m, k=k: f"{name} step {k} raw logits: {m}")
        torch.testing.assert_close(guided.reshape(guided_expected[k].shape), guided_expected[k], atol=LOGIT_TOL,
                                   rtol=0, msg=lambda m, k=k: f"{name} step {k} guided logits: {m}")
    assert torch.equal(latent, reference.outputs[f"{name}.summed_codes"])


@pytest.mark.parametrize("set_dir, case", reference_cases("infinitystar"))
def test_free_running_bits_latent_and_frames(set_dir, case):
    reference = load_reference(InfinityStarReference, set_dir)
    name = case["name"]
    text, negative = reference.texts(name)
    kwargs = dict(scale_schedule=[tuple(s) for s in case["scale_schedule"]], label_B_or_BLT=text,
                  negative_label_B_or_BLT=negative, g_seed=case["g_seed"], **call_kwargs(reference, case))
    latent, bits = sampled_bits(reference.model, kwargs)
    margins = decision_margins(case["g_seed"], reference_steps(reference, case, "logits"))
    if not assert_same_path(bits, reference_steps(reference, case, "bits"), margins, name):
        pytest.skip(f"{name}: left the reference path at a bit within {LOGIT_TOL} of its boundary")
    assert torch.equal(latent, reference.outputs[f"{name}.summed_codes"])
    if f"{name}.frames" in reference.outputs:
        frames = reference.vae.decode(latent)
        torch.testing.assert_close(frames, reference.outputs[f"{name}.frames"], atol=FRAME_TOL, rtol=0)


@pytest.mark.parametrize("set_dir, case", reference_cases("infinitystar"))
def test_batch_rows_run_as_alone(set_dir, case):
    """Two prompts of different text lengths in one call, a seed each: the case's row follows the
    reference and the other row is what its prompt gives alone. Not bit for bit: BLAS rounds a matmul of
    a few rows (the first scales have 1 to 4 tokens) differently with the number of rows, and the bf16
    rounding of attention can make that 1e-4 in a logit, which APG multiplies by up to cfg - 1 = 33; hence
    BATCH_LOGIT_TOL, the tolerance of Infinity's bf16 attention."""
    reference = load_reference(InfinityStarReference, set_dir)
    model, name = reference.model, case["name"]
    schedule = [tuple(s) for s in case["scale_schedule"]]
    text, negative = reference.texts(name)
    other_len = max(1, len(text[0]) - 3)
    other = torch.randn(other_len, text[0].shape[1], generator=torch.Generator().manual_seed(OTHER_SEED))
    other_text = (other, [other_len], None, other_len)
    other_negative = None if negative is None else (negative[0][:1], [1], None, 1)
    kwargs = call_kwargs(reference, case)

    def packed(a, b):
        return None if a is None else (torch.cat([a[0], b[0]]), [*a[1], *b[1]], None, max(a[3], b[3]))

    batch = dict(scale_schedule=schedule, label_B_or_BLT=packed(text, other_text), B=2,
                 negative_label_B_or_BLT=packed(negative, other_negative), **kwargs)
    ref_bits, ref_logits = reference_steps(reference, case, "bits"), reference_steps(reference, case, "logits")
    _, bits = sampled_bits(model, dict(batch, g_seed=[case["g_seed"], OTHER_SEED]))
    margins = decision_margins(case["g_seed"], ref_logits)
    assert_same_path([b[:1] for b in bits], ref_bits, margins, name, BATCH_LOGIT_TOL)

    alone = dict(scale_schedule=schedule, label_B_or_BLT=other_text, negative_label_B_or_BLT=other_negative,
                 g_seed=OTHER_SEED, **kwargs)
    alone_logits, batch_logits = {}, {}
    _, alone_bits = sampled_bits(model, dict(alone, on_step_logits=lambda k, r, g: alone_logits.__setitem__(k, g)))
    forced = [torch.cat([ref.long(), b.view(ref.shape)]) for ref, b in zip(ref_bits, alone_bits)]
    model.autoregressive_infer(None, **batch, g_seed=0, gt_leak=len(schedule), gt_ls_Bl=forced,
                               on_step_logits=lambda k, r, g: batch_logits.__setitem__(k, g.clone()))
    for k, expected in enumerate(ref_logits):
        torch.testing.assert_close(batch_logits[k][:1].reshape(expected.shape), expected, atol=BATCH_LOGIT_TOL,
                                   rtol=0)
        torch.testing.assert_close(batch_logits[k][1:], alone_logits[k], atol=BATCH_LOGIT_TOL, rtol=0)
