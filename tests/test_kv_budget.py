"""KV budgets beyond the official settings: the budget's shape checked, any aspect ratio, the cut's buffers,
skipping and guidance-off, and the summary's bytes against the caches' own."""

from __future__ import annotations

import hashlib
import json
from importlib import resources

import pytest
import torch
from conftest import random_text, tiny_infinity

import fastvar
from fastvar import FastVARConfig
from fastvar.kv_budget import PACKAGED, KVBudget, window_positions
from fastvar.models.infinity import scale_schedule

DEPTH = 4
SCHEDULE = scale_schedule(1.0, "0.25M")  # 10 scales, up to 32x32
BUDGET = KVBudget({-4: (300, 40, 40, 120), -3: (400, 30, 60, 100), -2: (500, 20, 80, 100), -1: (500, 20, 80, 100)},
                  threshold=300, name="test")  # passed at the 16x16 scale, the first budgeted (-4)


def generate(model, vae, schedule=SCHEDULE, B=1, **kwargs):
    K = len(schedule)
    return model.autoregressive_infer_cfg(vae, schedule, random_text([5 + 2 * b for b in range(B)], seed=B), B=B,
                                          g_seed=1, cfg_list=[3.0] * K, tau_list=[0.5] * K, top_k=900, top_p=0.97,
                                          vae_type=vae.codebook_dim, **kwargs)


def record_lengths(model):
    """Per block and call: (keys attended to, cache length after the call, buffer size). A scale that is cut is
    attended to with the kept tokens and cut, as the last is attended to without being stored: the buffer
    holds what is kept between scales."""
    seen = {i: [] for i in range(DEPTH)}
    for i, block in enumerate(model.unregistered_blocks):
        block.sa.register_forward_pre_hook(lambda m, a, i=i: seen[i].append([m.kv_cache.length + a[0].shape[1]]))
        block.sa.register_forward_hook(lambda m, a, out, i=i: seen[i][-1].extend(
            [m.kv_cache.length, m.kv_cache.k.shape[2] if m.kv_cache.k is not None else 0]))
    return seen


def test_each_cache_is_cut_as_planned_in_one_buffer():
    model, vae = tiny_infinity(depth=DEPTH)
    fastvar.patch(model, FastVARConfig(kv_budget=BUDGET))
    seen = record_lengths(model)
    generate(model, vae)
    schedule = model._fastvar.schedule
    tokens = [h * w for _, h, w in SCHEDULE]
    for layer in range(DEPTH):
        expected, length = [], 0  # left alone up to 265 tokens (5 scales), then cut to the budget at each scale
        for si, n in enumerate(tokens[:-1]):
            length += n
            attended = length
            if si >= 6:
                length = min(length, BUDGET.capacities[si - len(tokens)][layer])
            expected.append((attended, length))
        assert [(a, n) for a, n, _ in seen[layer][:-1]] == expected
        assert seen[layer][-1][0] == length + tokens[-1]  # the last scale is attended to, not stored nor cut
        assert {size for _, _, size in seen[layer]} == {max(n for _, n in expected)}  # one buffer, for what is kept
        assert schedule.kv.lengths(schedule, layer) == [*expected, (length + tokens[-1], length)]


def test_a_block_once_past_the_threshold_is_cut_at_every_later_scale():
    """ScaleKV's rule: a refiner cut below the threshold is cut again at the next scale, whatever its length."""
    budget = KVBudget({-4: (10000, 16, 16, 16), -3: (10000, 16, 16, 16), -2: (10000, 600, 16, 16),
                       -1: (10000, 16, 16, 16)}, threshold=300)
    model, vae = tiny_infinity(depth=DEPTH)
    fastvar.patch(model, FastVARConfig(kv_budget=budget))
    seen = record_lengths(model)
    generate(model, vae)
    assert [n for _, n, _ in seen[2][6:9]] == [16, 16, 16]  # 16 + 400 keys at 20x20: below the threshold, still cut
    assert [(a, n) for a, n, _ in seen[1][6:9]] == [(521, 16), (416, 16), (592, 592)]  # within its budget: kept
    assert [n for _, n, _ in seen[0][6:9]] == [sum(h * w for _, h, w in SCHEDULE[: si + 1]) for si in range(6, 9)]


@pytest.mark.parametrize("h_div_w", [0.5, 2.0])
def test_other_aspect_ratios_cut_with_the_window_of_their_maps(h_div_w):
    model, vae = tiny_infinity(depth=DEPTH)
    schedule = scale_schedule(h_div_w, "0.25M")
    fastvar.patch(model, FastVARConfig(kv_budget=BUDGET))
    seen = record_lengths(model)
    _, bits, _ = generate(model, vae, schedule)
    assert len(bits) == len(schedule)
    plan = model._fastvar.schedule.kv
    assert [n for _, n, _ in seen[1][:-1]] == [n for _, n in plan.lengths(model._fastvar.schedule, 1)[:-1]]


def test_window_positions_of_square_oblong_and_small_maps():
    assert window_positions(20, 20, 16) == [r * 20 + c for r in (2, 7, 12, 17) for c in (2, 7, 12, 17)]  # official
    assert window_positions(8, 16, 16) == [r * 16 + c for r in (0, 2, 4, 6) for c in (1, 5, 9, 13)]
    assert window_positions(2, 4, 16) == list(range(8))  # smaller than the grid: its last tokens
    assert window_positions(6, 6, 4) == [r * 6 + c for r in (1, 4) for c in (1, 4)]


def test_skipping_and_guidance_off_compose_with_a_budget():
    model, vae = tiny_infinity(depth=DEPTH)
    fastvar.patch(model, FastVARConfig(kv_budget=BUDGET, skip_last=1, guidance_off_from=-2))
    seen = record_lengths(model)
    _, bits, _ = generate(model, vae, B=2)
    schedule = model._fastvar.schedule
    assert len(bits) == len(SCHEDULE) - 1 and schedule.kv.lengths(schedule, 0)[-1][0] == seen[0][-1][0]
    assert [n for _, n, _ in seen[2][:-1]] == [n for _, n in schedule.kv.lengths(schedule, 2)[:-1]]


def test_the_summary_counts_the_bytes_the_caches_hold():
    model, vae = tiny_infinity(depth=DEPTH)
    fastvar.patch(model, FastVARConfig(kv_budget=BUDGET))
    attentions = [b.sa for b in model.unregistered_blocks]
    held, allocated = [], []
    attentions[-1].register_forward_hook(lambda m, a, out: held.append(
        sum(x.kv_cache.length for x in attentions) * 2 * 2 * model.C * 4))  # K and V, two CFG rows, float32
    attentions[-1].register_forward_hook(lambda m, a, out: allocated.append(sum(x.kv_cache.nbytes for x in attentions)))
    generate(model, vae)
    summary = fastvar.summary(model)
    assert [r.budget_kv_bytes for r in summary.rows[:-1]] == held[:-1]
    assert summary.kv_bytes == allocated[-1] < summary.fastvar_kv_bytes == summary.baseline_kv_bytes
    assert "held MiB" in str(summary) and summary.flop_ratio < 1  # fewer keys attended to


@pytest.mark.parametrize("budget, message", [
    (KVBudget({-1: (100,) * 3}), r"scale position -1 has 3 block capacities; the model has 4 blocks"),
    (KVBudget({-11: (100,) * 4}), r"scale position -11 does not exist; this schedule has 10 scales"),
    (KVBudget({-1: (100,) * 4}, threshold=50), r"block 0's cache holds 57 tokens at scale 3, past the threshold of "
                                               r"50, and the budget has no capacities for that scale: budget it, or "
                                               r"raise the threshold to at least 57"),
])
def test_a_budget_that_does_not_fit_the_model_is_refused_naming_the_expected_shape(budget, message):
    model, vae = tiny_infinity(depth=DEPTH)
    calls = []
    model.unregistered_blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match=message):
        fastvar.patch(model, FastVARConfig(kv_budget=budget))
        generate(model, vae)  # refused at the patch or, against the call's own schedule, before any block runs
    assert not calls


@pytest.mark.parametrize("kwargs, message", [
    (dict(capacities={-1: (8, 20)}), r"capacities\[-1\]: block 0 keeps 8 tokens, fewer than the window of 16"),
    (dict(capacities={-1: (20,)}, window=12), r"window = 12: must be a square number"),
    (dict(capacities={-1: (20,)}, kernel_size=4), r"kernel_size = 4: must be odd"),
    (dict(capacities={-1: (20,)}, pooling="mean"), r"pooling = 'mean': accepted are \['max', 'avg'\]"),
    (dict(capacities={}), r"capacities must be a non-empty mapping"),
    (dict(capacities={"-1": (20,)}), r"'-1' is not a scale position"),
])
def test_budget_values_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KVBudget(**kwargs)


def test_budget_files_in_the_official_format(tmp_path):
    path = tmp_path / "b.json"
    entry = {"Block 0": 1, "Block 1": 0, "Max": 300, "Min": 20, "High": 1, "Limit": 300}
    path.write_text(json.dumps({"Scale 12": entry, "Scale 13": entry}))
    budget = KVBudget.from_file(path)
    assert budget.capacities == {-3: (300, 20), -2: (300, 20), -1: (300, 20)} and budget.name == "b"
    assert KVBudget.from_file(path, blocks=1).capacities[-1] == (300,)
    for content, message in [("{", "cannot read it as JSON"), ('{"Scale 14": {}}', "'Scale 14' is not a scale"),
                             (json.dumps({"Scale 9": {"Block 0": 1, "Max": 30}}), "Scale 9 lacks 'Max' and 'Min'")]:
        path.write_text(content)
        with pytest.raises(ValueError, match=message):
            KVBudget.from_file(path)
    path.write_text(json.dumps({"Scale 9": entry}))
    with pytest.raises(ValueError, match=r"Scale 9 lacks 'Block 2' \(0 or 1\) for 3 blocks"):
        KVBudget.from_file(path, blocks=3)


def test_packaged_budgets_are_the_official_files():
    expected = {"scalekv_2b_10.json": "a3fda132d08ae6005ba9d5ceac72b75ad716c15ee4f20ff94180fe29ebc15b95",
                "scalekv_8b_10.json": "6b492f181f8113f2fa1dadc8ecca4c68c5a028796a664ad43199adfc13783951"}
    folder = resources.files("fastvar") / "budgets"
    assert {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in expected} == expected
    assert (folder / "LICENSE-ScaleKV").read_text().startswith("MIT License")
    eight = KVBudget.packaged("scalekv-10", 40)
    assert eight.capacities[-1] == (6200,) * 3 + (200,) * 37 and sorted(PACKAGED["scalekv-10"]) == [32, 40]
    with pytest.raises(ValueError, match=r"the scalekv-10 budgets are made for \[32, 40\] blocks .* this model has 4"):
        fastvar.patch(tiny_infinity(depth=DEPTH)[0], "scalekv-10")
    assert "scalekv-10" not in fastvar.presets(tiny_infinity(depth=DEPTH)[0])  # what bench and compare run


def test_with_pruning_only_kept_tokens_enter_the_cache_and_the_most_pivotal_are_the_window(monkeypatch):
    model, vae = tiny_infinity(depth=DEPTH)
    fastvar.patch(model, FastVARConfig(prune={-3: 0.4, -2: 0.5}, layers=[1, 3], kv_budget=BUDGET))
    windows, cut, kept = {}, fastvar.state.FastVARState.cut_kv, fastvar.state.kept_positions

    def record_cut(state, layer, *args):
        record_cut.layer = layer
        cut(state, layer, *args)

    def record_kept(keys, queries, window, *args):
        windows[model._fastvar.scale, record_cut.layer] = (keys.shape[2], window.tolist())
        return kept(keys, queries, window, *args)

    monkeypatch.setattr(fastvar.state.FastVARState, "cut_kv", record_cut)
    monkeypatch.setattr(fastvar.state, "kept_positions", record_kept)
    seen = record_lengths(model)
    generate(model, vae)
    schedule = model._fastvar.schedule
    for layer in range(DEPTH):
        assert [(a, n) for a, n, _ in seen[layer][:-1]] == schedule.kv.lengths(schedule, layer)[:-1]
    assert {si for si, _ in windows} == {6, 7, 8}  # cut from the first budgeted scale, the last not
    for (si, layer), (length, window) in windows.items():
        run = schedule.tokens_run(si, layer)
        h, w = SCHEDULE[si][1:]
        if run < h * w:  # pruned here: only the kept tokens are cached, the most pivotal first
            assert window == [length - run + i for i in range(16)] and layer in (1, 3) and si in (7, 8)
        else:
            assert window == [length - h * w + p for p in window_positions(h, w, 16)]


def test_budgets_need_fastvars_infinity_and_a_budget():
    import upstream_infinity

    model, _ = tiny_infinity(depth=DEPTH)
    upstream = upstream_infinity.Infinity(model)
    with pytest.raises(ValueError, match=r"KV budgets need fastvar's own model \(fastvar.models.infinity\)"):
        fastvar.patch(upstream, FastVARConfig(kv_budget=BUDGET))
    assert not fastvar.is_patched(upstream) and type(upstream.unregistered_blocks[0]).__name__ == "CrossAttnBlock"
    with pytest.raises(ValueError, match=r"kv_budget = 'nothing': give a KVBudget, a packaged budget"):
        FastVARConfig(kv_budget="nothing")


def test_budgets_change_nothing_before_the_first_cut_and_unpatch_restores_the_attention():
    model, vae = tiny_infinity(depth=DEPTH)
    attention_class = type(model.unregistered_blocks[0].sa)

    def logits():
        seen = []
        generate(model, vae, on_scale_logits=lambda si, scale_logits: seen.append(scale_logits.clone()))
        return seen

    full = logits()
    fastvar.patch(model, FastVARConfig(kv_budget=BUDGET))
    cut = logits()
    assert all(torch.equal(a, b) for a, b in zip(full[:7], cut[:7]))  # the first cut is after scale 6
    assert not any(torch.equal(a, b) for a, b in zip(full[7:], cut[7:]))
    fastvar.unpatch(model)
    assert type(model.unregistered_blocks[0].sa) is attention_class
    assert all(torch.equal(a, b) for a, b in zip(full, logits()))


def record_cache_lengths(attentions):
    seen = {i: [] for i in range(len(attentions))}
    for i, attention in enumerate(attentions):
        attention.register_forward_pre_hook(lambda m, a, i=i: seen[i].append([m.kv_cache.length + a[0].shape[1]]))
        attention.register_forward_hook(lambda m, a, out, i=i: seen[i][-1].append(m.kv_cache.length))
    return seen


def test_var_and_hart_take_budgets_of_their_own():
    from conftest import hart_text, tiny_hart, tiny_var

    var = tiny_var(depth=3, patch_nums=(1, 2, 3, 4, 6, 8))  # 130 tokens
    fastvar.patch(var, FastVARConfig(kv_budget=KVBudget({-3: (40, 16, 30), -2: (50, 16, 30)}, threshold=20)))
    seen = record_cache_lengths([b.attn for b in var.blocks])
    torch.manual_seed(0)
    var.autoregressive_infer_cfg(B=2, label_B=torch.tensor([1, 2]), g_seed=0, cfg=2.0)
    schedule = var._fastvar.schedule
    for layer in range(3):
        assert [tuple(x) for x in seen[layer][:-1]] == schedule.kv.lengths(schedule, layer)[:-1]
    assert [n for _, n in seen[1][:-1]] == [1, 5, 14, 16, 16]

    hart = tiny_hart(context_token=16)  # the text stage: 16 tokens, as many as the 4x4 map
    fastvar.patch(hart, FastVARConfig(kv_budget=KVBudget({-4: (40, 30), -3: (50, 40), -2: (60, 50)}, threshold=70)))
    seen = record_cache_lengths([b.attn for b in hart.blocks])
    torch.manual_seed(0)
    hart.autoregressive_infer_cfg(**hart_text([3, 16], tokens=16), g_seed=0, cfg=2.0)
    schedule = hart._fastvar.schedule
    for layer in range(2):
        assert [tuple(x) for x in seen[layer][:-1]] == schedule.kv.lengths(schedule, layer)[:-1]
    assert seen[0][:4] == [[16, 16], [20, 20], [29, 29], [45, 45]]  # the text first, never cut as a map
    with pytest.raises(ValueError, match=r"scale position 0 is the text stage, not a token map to window"):
        fastvar.patch(hart, FastVARConfig(kv_budget=KVBudget({0: (16, 16)})))


def test_budgets_in_bfloat16_and_in_compare(tiny_official):
    """The official inference precision (blocks in bfloat16 under autocast), and compare takes a budget like
    a preset."""
    from fastvar import InfinityPipeline

    pipe = InfinityPipeline.random(depth=DEPTH, dtype="bf16")
    budget = FastVARConfig(kv_budget=KVBudget({-2: (200, 40, 40, 120), -1: (200, 40, 40, 120)}, threshold=200))
    seen = record_lengths(pipe.transformer)
    images = pipe("a red fox", size=(256, 256), preset=budget, progress=False)
    schedule = pipe.transformer._fastvar.schedule
    assert images[0].size == (256, 256) and len(schedule.shapes) == 7
    for layer in range(DEPTH):
        assert [(a, n) for a, n, _ in seen[layer][:-1]] == schedule.kv.lengths(schedule, layer)[:-1]
    assert [n for _, n, _ in seen[1][:-1]][-1] == 40  # cut at the 12x12 scale, in bfloat16
    report = fastvar.compare(pipe, ["a red fox"], {"budget": budget}, size=(256, 256))
    assert [r.name for r in report.reports] == ["unpatched", "budget"] and report.reports[1].flop_ratio < 1
