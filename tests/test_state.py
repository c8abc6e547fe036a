"""FastVARState.run_branch: cache at the cache scale, run pivotal tokens only, restore the rest."""

from __future__ import annotations

import pytest
import torch

from fastvar import FastVARConfig
from fastvar.pruning import restore, token_scores
from fastvar.state import FastVARState

SHAPES = [(1, 1), (2, 3), (4, 6)]


def make_state(**config):
    config = FastVARConfig(**config)
    return FastVARState("test", None, config, config.resolve(SHAPES, depth=2))


def test_branch_runs_on_pivotal_tokens_and_the_cache_fills_the_rest():
    state = make_state(prune={-1: 0.75}, layers=[1])
    seen = []

    def branch(t, idx):
        seen.append(t)
        return t * 3 + 1

    at_cache = torch.randn(2, 6, 5)
    assert torch.equal(state.run_branch(1, "ffn", 1, at_cache, branch), at_cache * 3 + 1)
    x = torch.randn(2, 24, 5)
    out = state.run_branch(1, "ffn", 2, x, branch)

    keep = 24 - int(24 * 0.75)
    idx = token_scores(x).argsort(dim=1, descending=True)[:, :keep]
    assert torch.equal(seen[-1], torch.stack([x[b, idx[b]] for b in range(2)]))
    assert torch.equal(out, restore(at_cache * 3 + 1, (2, 3), seen[-1] * 3 + 1, idx, (4, 6)))


def test_blocks_outside_the_pruning_layers_run_everything():
    state = make_state(prune={-1: 0.5}, layers=[1])
    assert not state.acts_on(2, 0) and state.acts_on(2, 1) and state.acts_on(1, 1) and not state.acts_on(0, 1)
    x = torch.randn(1, 24, 3)
    assert torch.equal(state.run_branch(0, "attn", 2, x, lambda t, idx: t + 1), x + 1)


def test_pruned_scale_before_its_cache_is_an_error_and_release_frees_the_cache():
    state = make_state(prune={-1: 0.5})
    with pytest.raises(RuntimeError, match="before its cache scale 1 ran"):
        state.run_branch(0, "attn", 2, torch.randn(1, 24, 3), lambda t, idx: t)
    state.run_branch(0, "attn", 1, torch.randn(1, 6, 3), lambda t, idx: t)
    state.release()
    with pytest.raises(RuntimeError):
        state.run_branch(0, "attn", 2, torch.randn(1, 24, 3), lambda t, idx: t)


def test_the_scale_is_the_loops_and_a_block_of_another_token_count_is_an_error():
    state = make_state(prune={-1: 0.5})
    x = torch.randn(1, 6, 3)
    assert state.scale_of(x) is None  # outside a sampling call every block runs as unpatched
    with pytest.raises(KeyError), state.sampling():
        state.begin_scale(1)
        assert state.scale_of(x) == 1
        with pytest.raises(RuntimeError, match=r"a block got 24 tokens while scale 1 \(6 tokens\) runs"):
            state.scale_of(torch.randn(1, 24, 3))
        raise KeyError  # a failed call still forgets its scale and frees the cache
    assert state.scale is None


def test_a_loop_that_does_not_say_the_scale_has_its_first_blocks_calls_counted():
    state, first = make_state(), torch.nn.Identity()
    with state.sampling(count_calls_of=first):
        seen = [state.scale]
        for _ in SHAPES:
            first(None)
            seen.append(state.scale)
    assert seen == [None, 0, 1, 2] and state.scale is None
    first(None)
    assert state.scale is None  # the counter is gone with the call
