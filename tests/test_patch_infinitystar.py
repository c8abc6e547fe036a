"""FastVAR on InfinityStar's spacetime pyramids: ``none`` is the unpatched model bit for bit, and a patched
generation equals FastVAR written out here from the ``fastvar.pruning`` primitives (the oracle), branch
input by branch input, with repetitions (a repeated pruned scale is filled from its previous run),
several clips (each with its own cache scale), batches and the call's own skip / guidance / repetition
settings.

The oracle counts steps itself: the blocks run once per step in order, after one text pass."""

from __future__ import annotations

import math

import pytest
import torch

import fastvar
from fastvar import FastVARConfig
from fastvar.hub import parameters_on_meta
from fastvar.models.infinitystar import (
    OFFICIAL,
    Checkpoint,
    InfinityStar,
    SelfAttnBlock,
    build,
    scale_schedule,
    scales_per_clip,
)
from fastvar.models.video_vae import VideoVAE
from fastvar.pruning import gather_tokens, restore, select_pivotal

SCHEDULE = scale_schedule(0.571, "0.06M", 1)  # an image clip and a 4-latent-frame clip, 11 scales each
CHECKPOINT = Checkpoint(semantic_scales=8, image_scale_repetition=(3,) * 11, video_scale_repetition=(3,) * 9 + (2, 1))
TEXT_CHANNELS = 32


def tiny_infinitystar(seed: int = 0) -> InfinityStar:
    torch.manual_seed(seed)
    model = InfinityStar(text_channels=TEXT_CHANNELS, text_maxlen=64, embed_dim=64, depth=4, num_heads=4,
                         num_key_value_heads=2, block_chunks=2)
    for name, p in model.named_parameters():
        if "norm" in name:
            torch.nn.init.normal_(p, 1.0, 0.1)
        else:
            torch.nn.init.normal_(p, 0.0, 1 / math.sqrt(p.shape[-1]))
    return model.eval().requires_grad_(False)


def text(lens: list[int], seed: int = 0) -> tuple:
    features = torch.randn(sum(lens), TEXT_CHANNELS, generator=torch.Generator().manual_seed(seed))
    return features, lens, None, max(lens)


def call(model: InfinityStar, B: int = 1, **overrides) -> torch.Tensor:
    kwargs = dict(scale_schedule=SCHEDULE, label_B_or_BLT=text([7, 5][:B]), checkpoint=CHECKPOINT, B=B,
                  g_seed=[3, 4][:B], cfg_list=[34] * len(SCHEDULE), tau_list=[1] * 11 + [0.4] * 11,
                  return_summed_code_only=True)
    return model.autoregressive_infer(None, **{**kwargs, **overrides})


class Oracle:
    """FastVAR's rule for one resolved schedule, from the primitives: per branch, score the stream entering it,
    run the top tokens, fill the rest from the cache scale of the clip (area-resized), or, in a later run of
    the same scale, from that scale's previous run."""

    def __init__(self, schedule, depth: int):
        self.s, self.depth = schedule, depth
        self.steps = [(si, r) for si in range(schedule.executed) for r in range(schedule.repetitions[si])]
        self.step, self.cache, self.previous = -1, {}, {}

    def block_starts(self, layer: int, store_as) -> None:
        if layer == 0 and store_as != "t0":
            self.step += 1

    def branch(self, layer: int, name: str, x: torch.Tensor, store_as, run):
        if store_as == "t0":
            return run(x, None)
        s, (si, rep) = self.s, self.steps[self.step]
        clip = si // s.clip_scales
        if layer not in s.layers or s.keep[si] is None:
            out = run(x, None)
            if layer in s.layers and s.cache_scale is not None and si % s.clip_scales == s.cache_scale:
                self.cache[layer, name, clip] = (out, s.shapes[si])
            return out
        idx = select_pivotal(x, s.keep[si])
        fresh = run(gather_tokens(x, idx), idx)
        base, shape = self.previous[layer, name] if rep else self.cache[layer, name, clip]
        out = restore(base, shape, fresh, idx, s.shapes[si])
        self.previous[layer, name] = (out, s.shapes[si])
        return out


def oracle_forward(oracle: Oracle, layers: dict[int, int]):
    def forward(self, x, rope, store_as, context, text_groups):
        layer = layers[id(self)]
        oracle.block_starts(layer, store_as)

        def attention(t, idx):
            rows = rope if idx is None else torch.stack([rope[:, i] for i in idx], dim=1).unsqueeze(2)
            return self.attn(self.input_layernorm(t), rows, store_as, context, text_groups)

        x = x + oracle.branch(layer, "attn", x, store_as, attention)
        return x + oracle.branch(layer, "mlp", x, store_as, lambda t, idx: self.mlp(self.post_attention_layernorm(t)))
    return forward


def record_branch_inputs(model: InfinityStar) -> list:
    seen = []
    for layer, block in enumerate(model.unregistered_blocks):
        for name in ("attn", "mlp"):
            getattr(block, name).register_forward_pre_hook(
                lambda m, args, key=(layer, name): seen.append((key, args[0].clone())))
    return seen


def clear_hooks(model: InfinityStar) -> None:
    for block in model.unregistered_blocks:
        block.attn._forward_pre_hooks.clear()
        block.mlp._forward_pre_hooks.clear()


@pytest.mark.parametrize("B", [1, 2])
def test_none_is_the_unpatched_model_bit_for_bit(B):
    model = tiny_infinitystar()
    unpatched = call(model, B)
    fastvar.patch(model, "none")
    assert torch.equal(call(model, B), unpatched)
    fastvar.unpatch(model)
    assert type(model) is InfinityStar and all(type(b) is SelfAttnBlock for b in model.unregistered_blocks)


@pytest.mark.parametrize("B, config", [
    (1, FastVARConfig(prune={-2: 0.5, -1: 0.75})),  # repeated pruned scales (3 and 2 runs; 1 in the video's last)
    (2, FastVARConfig(prune={-3: 0.4, -1: 0.6}, cache_scale=-5, layers=[1, 2])),
])
def test_matches_the_oracle_branch_by_branch(monkeypatch, B, config):
    model = tiny_infinitystar()
    fastvar.patch(model, config)
    patched_calls = record_branch_inputs(model)
    latent = call(model, B)
    schedule = model._fastvar.schedule
    fastvar.unpatch(model)
    clear_hooks(model)
    assert schedule.clip_scales == scales_per_clip(SCHEDULE) == 11 and max(schedule.repetitions) == 3

    layers = {id(b): i for i, b in enumerate(model.unregistered_blocks)}
    monkeypatch.setattr(SelfAttnBlock, "forward", oracle_forward(Oracle(schedule, 4), layers))
    oracle_calls = record_branch_inputs(model)
    assert torch.equal(call(model, B), latent)
    assert [k for k, _ in patched_calls] == [k for k, _ in oracle_calls]
    for (key, a), (_, b) in zip(patched_calls, oracle_calls):
        assert torch.equal(a, b), key
    # The branches got the kept tokens exactly where the schedule prunes, in both clips and every run.
    runs = [t.shape[1] for (layer, name), t in patched_calls if name == "mlp" and layer in schedule.layers]
    expected_text = [len(runs) - sum(schedule.repetitions) * len(schedule.layers)]
    assert expected_text[0] == len(schedule.layers)  # the text pass, once per pruning block
    steps = [(si, r) for si in range(len(SCHEDULE)) for r in range(schedule.repetitions[si])]
    kept = runs[len(schedule.layers):]
    assert kept == [schedule.tokens_run(si, layer) for si, _ in steps for layer in sorted(schedule.layers)]
    assert any(n < schedule.tokens[10] for n in kept) and any(n < schedule.tokens[21] for n in kept)


@pytest.mark.parametrize("config, resolved", [
    (FastVARConfig(skip_last=2), dict(trunk_scale=20)),
    (FastVARConfig(guidance_off_from=-3), dict(guided_scales=19)),
    (FastVARConfig(repetitions={-2: 1, 0: 2}), dict(repetitions=[2] + [3] * 8 + [1, 3] + [2] + [3] * 8 + [1, 1])),
])
def test_skip_guidance_and_repetitions_are_the_model_call(config, resolved):
    """Each saving is the model's own call with the resolved argument: fewer scales, fewer rows, fewer runs."""
    model = tiny_infinitystar()
    expected = call(model, 2, **resolved)
    assert not torch.equal(expected, call(model, 2))
    fastvar.patch(model, config)
    assert torch.equal(call(model, 2), expected)


def test_guidance_off_samples_from_the_prompt_rows():
    """From ``guided_scales`` on, the logits handed to the sampler are the prompt rows' own, tempered."""
    model, seen = tiny_infinitystar(), {}
    call(model, 2, guided_scales=20, on_step_logits=lambda k, raw, guided: seen.__setitem__(k, (raw, guided)))
    step = sum(CHECKPOINT.repetitions(SCHEDULE)[:20])
    raw, guided = seen[step]
    assert raw.shape[0] == 2 and torch.equal(guided, raw.mul(1 / 0.4))
    raw, guided = seen[step - 1]
    assert raw.shape[0] == 4 and not torch.equal(guided, raw[:2].mul(1 / 0.4))


def test_a_step_is_named_by_the_loop():
    """Blocks learn the scale and the run from the loop, also when two steps have equal token counts."""
    model, steps = tiny_infinitystar(), []
    fastvar.patch(model, prune={-1: 0.5})
    call(model, on_step=lambda si, rep: steps.append((si, rep, model._fastvar.scale, model._fastvar.repetition)))
    runs = CHECKPOINT.repetitions(SCHEDULE)
    assert [(si, rep) for si, rep, _, _ in steps] == [(si, r) for si in range(22) for r in range(runs[si])]
    assert all((si, rep) == (scale, run) for si, rep, scale, run in steps)
    assert model._fastvar.scale is None  # released after the call


def test_kv_budgets_are_refused_saying_why():
    model = tiny_infinitystar()
    with pytest.raises(ValueError, match="KV budgets do not apply to infinitystar: a scale attends to the text, "
                                         "itself and at most the last scale of the clip before"):
        fastvar.patch(model, kv_budget="scalekv-10")
    assert not fastvar.is_patched(model)


def test_upstream_infinitystar_is_refused_pointing_to_the_key_compatible_model():
    """Upstream InfinityStar's model is a class named Infinity (no ``lvl_embed``, InfinityStar's semantic head):
    neither the Infinity nor the InfinityStar adapter may take it, and the error says what to do instead."""

    class Infinity(torch.nn.Module):  # the upstream attributes the adapters look at
        def __init__(self):
            super().__init__()
            self.word_embed, self.semantic_head2 = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
            self.unregistered_blocks = []

        def autoregressive_infer(self): ...

        def autoregressive_infer_cfg(self): ...

    model = Infinity()
    with pytest.raises(TypeError, match=r"cannot patch this Infinity: it is upstream InfinityStar's model.*"
                                        r"InfinityStarPipeline.from_pretrained"):
        fastvar.patch(model)
    assert not fastvar.is_patched(model)


def test_positions_are_within_a_clip():
    model = tiny_infinitystar()
    fastvar.patch(model, prune={-1: 0.5}, repetitions={3: 1})
    call(model)
    s = model._fastvar.schedule
    assert [si for si, k in enumerate(s.keep) if k is not None] == [10, 21]
    assert s.cached_scales == {9, 20} and [si for si, n in enumerate(s.repetitions) if n == 1] == [3, 14, 21]
    with pytest.raises(ValueError, match="scale position 11 does not exist"):
        fastvar.patch(model, prune={11: 0.5})
        call(model)


def official_meta_model():
    with parameters_on_meta():
        return build(), VideoVAE()


def test_summary_of_a_720p_5_second_clip():
    """Patched at the default call (720p 16:9, 5 s): per scale and run the tokens run, KV bytes only for the
    scale the next clip attends to, activation bytes, and the whole call with the video decoder."""
    model, vae = official_meta_model()
    fastvar.patch(model)  # the default preset
    summary = fastvar.summary(model, dtype="bf16", decoder=vae)
    schedule = model._fastvar.schedule
    official = OFFICIAL["infinitystar-8b-720p"]
    assert [r.shape for r in summary.rows] == scale_schedule(9 / 16, official.size, 5)
    assert [r.model_runs for r in summary.rows] == official.checkpoint.repetitions(schedule.shapes)
    pruned = [r.index for r in summary.rows if r.kept is not None]
    assert pruned == [13, 14, 28, 29] and [r.index for r in summary.rows if r.cached] == [12, 27]
    assert summary.rows[29].kept == 72000 - int(72000 * 0.75) and summary.rows[29].pruning_blocks == 27
    kv_token = 2 * 8 * 128 * 2  # both CFG rows, 8 KV heads of 128 channels, bf16
    stored = [r.index for r in summary.rows if r.baseline_kv_bytes]
    assert stored == [14] and summary.rows[14].baseline_kv_bytes == 2 * kv_token * 3600 * 36
    assert summary.rows[14].kv_bytes == 2 * kv_token * (3600 * 9 + summary.rows[14].kept * 27)
    assert 0.55 < summary.flop_ratio < summary.whole_call_flop_ratio < 0.6
    working_set = 3 * 4096 + 2 * 1024 + 2 * 16384
    assert summary.baseline_activation_bytes == summary.activation_bytes == 72000 * 2 * working_set * 2
    assert "20x45x80" in str(summary) and "1 run" in str(summary)


def test_fewer_repetitions_cut_the_flops_of_their_scales_in_proportion():
    model, _ = official_meta_model()
    fastvar.patch(model, "fewer-repetitions")
    summary = fastvar.summary(model)
    capped = [r for r in summary.rows if r.runs < r.model_runs]
    assert [r.index for r in capped] == [11, 12, 26, 27]
    for r in summary.rows:
        assert r.flops == pytest.approx(r.baseline_flops * r.runs / r.model_runs)
    assert "fewer repetitions: scale 11 runs 1 of 3" in str(summary)
