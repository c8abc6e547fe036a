"""KV budgets reproduce the official ScaleKV code (``scalekv/`` reference sets): every bit, every kept index
per CFG row and head, every cache length, and the settings the official code crashes on are refused.

fastvar does not cut the cache after the last scale (no later scale reads it, and the planned KV cache does
not store that scale at all), so the official cut there is not compared: its keys are attended to as there.
Bits are compared as in test_infinity_reference.py: exactly wherever the reference decision is clear of the
logit tolerance, and on every scale before the first near tie that went the other way.
"""

from __future__ import annotations

import pytest
import torch
from conftest import InfinityReference, bit_decision_margins, load_reference, reference_cases, reference_sets

import fastvar
import fastvar.state as state_module
from fastvar import FastVARConfig
from fastvar.kv_budget import KVBudget

LOGIT_TOL = 1e-2
SCORE_RTOL = 1e-4
POOLING = {"maxpool": "max", "avgpool": "avg", "pool": "avg"}  # the official names
LOADER_BLOCKS = {"enable_scale_kv_2b": 32, "enable_scale_kv_8b": 40}  # blocks each official loader reads


def budget_of(reference: InfinityReference, case: dict, depth: int) -> KVBudget:
    """The budget the case's official loader builds, as the model of ``depth`` blocks uses it."""
    settings = case["scalekv"]
    assert LOADER_BLOCKS[case["loader"]] >= depth  # the official loader reads that many blocks, the model uses its own
    return KVBudget.from_file(reference.dir / "budgets" / f"{case['budget']}.json", blocks=depth,
                              window=settings["window_size"], threshold=settings["max_capacity"],
                              kernel_size=settings["kernel_size"], pooling=POOLING[settings["pooling"]])


def sampling_kwargs(case: dict) -> dict:
    call = case["call"]
    return {k: call[k] for k in ("B", "g_seed", "cfg_list", "tau_list", "top_k", "top_p", "cfg_insertion_layer",
                                 "vae_type")}


def pooled_scores(keys: torch.Tensor, queries: torch.Tensor, window: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """ScaleKV's score of every cached key (rows, H, L), written out here: the window queries' dot products
    over sqrt(D), the window keys left out, summed, max-pooled along the cache; the window itself -inf."""
    window = window.view(1, 1, -1).expand(*keys.shape[:2], -1)
    weights = queries @ keys.transpose(2, 3) / keys.shape[3] ** 0.5
    weights = weights.scatter(3, window[:, :, None].expand(-1, -1, weights.shape[2], -1), float("-inf"))
    pooled = torch.nn.functional.max_pool1d(weights.sum(dim=2), kernel_size, padding=kernel_size // 2, stride=1)
    return pooled.scatter(2, window, float("-inf"))


def assert_same_cut(scores: torch.Tensor, kept: torch.Tensor, expected: torch.Tensor, where: str) -> None:
    """``kept`` and ``expected`` (rows, H, n) keep the same positions, but where the scores are tied up to
    float rounding at the boundary (the reference ran on another CPU: the bf16-rounded cross-attention moves
    the residual stream by bf16 steps, the scores by up to about 1e-4 of their largest)."""
    tol = SCORE_RTOL * scores.masked_fill(scores.isinf(), 0).abs().amax(dim=-1, keepdim=True)
    ours, theirs = (torch.zeros_like(scores, dtype=torch.bool).scatter(2, k, True) for k in (kept, expected))
    boundary = scores.masked_fill(~theirs | scores.isinf(), float("inf")).amin(dim=-1, keepdim=True)  # the weakest
    differing = ours != theirs
    assert ((scores - boundary).abs() <= tol)[differing].all(), f"{where}: a kept position far from the boundary"


class Recorder:
    """Per (scale, block): the keys attended to, the cache length after the call, and the kept positions of
    every cut; the logits handed to the sampler per scale. With ``teacher`` (the reference outputs of a case),
    every cut is checked against the reference's and then keeps the reference's positions, so that a near tie
    decided the other way on this CPU does not change what later scales see."""

    def __init__(self, model, monkeypatch, teacher: tuple[str, dict] | None = None):
        self.attended, self.length, self.kept, self.logits = {}, {}, {}, {}
        self.model = model
        for layer, block in enumerate(model.unregistered_blocks):
            block.sa.register_forward_pre_hook(lambda m, args, layer=layer: self.attended.__setitem__(
                (model._fastvar.scale, layer), m.kv_cache.length + args[0].shape[1]))
            block.sa.register_forward_hook(lambda m, args, out, layer=layer: self.length.__setitem__(
                (model._fastvar.scale, layer), m.kv_cache.length))
        cut, kept = state_module.FastVARState.cut_kv, state_module.kept_positions

        def record_cut(state, layer, *args):
            self.layer = layer
            cut(state, layer, *args)

        def record_kept(keys, queries, window, capacity, kernel_size, pooling):
            positions = kept(keys, queries, window, capacity, kernel_size, pooling)
            where = (model._fastvar.scale, self.layer)
            self.kept[where] = positions
            if teacher is None:
                return positions
            name, outputs = teacher
            expected = outputs[f"{name}.scalekv.keep.{where[0]}.{where[1]}"].long()
            assert_same_cut(pooled_scores(keys, queries, window, kernel_size), positions, expected, f"{name} {where}")
            return expected

        monkeypatch.setattr(state_module.FastVARState, "cut_kv", record_cut)
        monkeypatch.setattr(state_module, "kept_positions", record_kept)

    def on_logits(self, si: int, logits: torch.Tensor) -> None:
        self.logits[si] = logits.clone()


def run(reference: InfinityReference, case: dict, budget: KVBudget, monkeypatch, teacher_forced: bool) -> tuple:
    model, vae = reference.build()
    fastvar.patch(model, FastVARConfig(kv_budget=budget))
    recorder = Recorder(model, monkeypatch, (case["name"], reference.outputs) if teacher_forced else None)
    name, schedule = case["name"], [tuple(s) for s in case["scale_schedule"]]
    forced = {}
    if teacher_forced:
        K = len(schedule)
        forced = dict(gt_leak=K, gt_ls_Bl=[reference.outputs[f"{name}.scalekv.bits.{si}"].long() for si in range(K)])
    _, bits, summed = model.autoregressive_infer_cfg(vae, schedule, reference.text_input(name),
                                                     on_scale_logits=recorder.on_logits, **sampling_kwargs(case),
                                                     **forced)
    return model, recorder, bits, summed


@pytest.mark.parametrize("set_dir, case", reference_cases("scalekv"))
def test_budgets_reproduce_every_kept_index_and_cache_length(set_dir, case, monkeypatch):
    """Teacher forced (the reference's bits as inputs): every scale's logits, every cut's kept positions per
    CFG row and head, and every block's cache lengths."""
    reference = load_reference(InfinityReference, set_dir)
    name, outputs = case["name"], reference.outputs
    model, recorder, _, _ = run(reference, case, budget_of(reference, case, 32), monkeypatch, teacher_forced=True)
    K, depth = len(case["scale_schedule"]), len(model.unregistered_blocks)
    for si in range(K):
        torch.testing.assert_close(recorder.logits[si], outputs[f"{name}.scalekv.logits.{si}"].view_as(
            recorder.logits[si]), atol=LOGIT_TOL, rtol=0, msg=lambda m, si=si: f"{name}: logits of scale {si}: {m}")
    attended = torch.tensor([[recorder.attended[si, layer] for layer in range(depth)] for si in range(K)])
    assert torch.equal(attended, outputs[f"{name}.scalekv.kv_len_attn"].long()), "keys attended to"
    lengths = torch.tensor([[recorder.length[si, layer] for layer in range(depth)] for si in range(K - 1)])
    assert torch.equal(lengths, outputs[f"{name}.scalekv.kv_len"][: K - 1].long()), "cache lengths after each scale"
    expected = {tuple(map(int, key.split(".")[-2:])): value for key, value in outputs.items()
                if key.startswith(f"{name}.scalekv.keep.") and int(key.split(".")[-2]) < K - 1}
    assert sorted(recorder.kept) == sorted(expected), "the (scale, block) calls that cut the cache"


@pytest.mark.parametrize("set_dir, case", reference_cases("scalekv"))
def test_budgets_reproduce_every_bit(set_dir, case, monkeypatch):
    reference = load_reference(InfinityReference, set_dir)
    name, outputs = case["name"], reference.outputs
    _, recorder, bits, summed = run(reference, case, budget_of(reference, case, 32), monkeypatch,
                                    teacher_forced=False)
    K = len(case["scale_schedule"])
    assert len(bits) == K
    margins = bit_decision_margins(case["g_seed"], [outputs[f"{name}.scalekv.logits.{si}"] for si in range(K)])
    for si in range(K):
        same = bits[si].to(torch.uint8).flatten() == outputs[f"{name}.scalekv.bits.{si}"].flatten()
        assert same[margins[si] >= LOGIT_TOL].all(), f"{name}: bits differ at scale {si} where the reference is clear"
        if not same.all():
            return  # a near tie went the other way: later scales legitimately follow another path
    assert torch.equal(summed.squeeze(2), outputs[f"{name}.scalekv.summed_codes"])


@pytest.mark.parametrize("set_dir, case", reference_cases(
    "scalekv", where=lambda case: case["budget"] == "official_2b_10" and case["scalekv"] == dict(
        window_size=16, max_capacity=650, kernel_size=5, pooling="maxpool")))
def test_the_scalekv_10_preset_is_the_official_2b_budget(set_dir, case):
    reference = load_reference(InfinityReference, set_dir)
    assert KVBudget.packaged("scalekv-10", 32) == budget_of(reference, case, 32)
    model, _ = reference.build()
    fastvar.patch(model, "scalekv-10")
    assert model._fastvar.config.kv_budget == "scalekv-10" and model._fastvar.schedule.kv.budget.threshold == 650


@pytest.mark.parametrize("set_dir", reference_sets("scalekv"))
def test_settings_the_official_code_crashes_on_are_refused_before_any_compute(set_dir):
    """The probes: calls the official code failed on. A cache passing the threshold at a scale without a budget
    (its TypeError) is refused before the call's first block; a budget below the window (its
    UnboundLocalError) when the budget is made."""
    reference = load_reference(InfinityReference, set_dir)
    model, vae = reference.build()
    calls = []
    model.unregistered_blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    for probe in reference.probes:
        case = next(c for c in reference.cases if c["name"] == probe["of_case"])
        settings = {**case, "scalekv": probe["scalekv"], "budget": probe.get("budget", case["budget"])}
        if "UnboundLocalError" in probe["failed"]["error"]:
            with pytest.raises(ValueError, match=r"fewer than the window of \d+ that every cut keeps"):
                budget_of(reference, settings, 32)
            continue
        fastvar.patch(model, FastVARConfig(kv_budget=budget_of(reference, settings, 32)))
        failed, threshold = probe["failed"]["scale_ind"], probe["scalekv"]["max_capacity"]
        with pytest.raises(ValueError, match=rf"block \d+'s cache holds \d+ tokens at scale {failed}, past the "
                                             rf"threshold of {threshold}"):
            model.autoregressive_infer_cfg(vae, [tuple(s) for s in case["scale_schedule"]],
                                           reference.text_input(case["name"]), **sampling_kwargs(case))
    assert not calls  # refused before any compute
    with pytest.raises(ValueError, match=r"keeps 15 tokens, fewer than the window of 16"):
        KVBudget({-1: (15,) * 32})
