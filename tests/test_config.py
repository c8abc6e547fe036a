"""FastVARConfig: resolution by scale position, validation with useful messages."""

from __future__ import annotations

import pytest

from fastvar import FastVARConfig

SQUARE_256 = [(pn, pn) for pn in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]
WIDE = [(1, 1), (1, 2), (2, 4), (3, 6), (5, 10), (8, 16)]


def test_positions_count_from_the_last_scale_whatever_the_shapes():
    config = FastVARConfig(prune={-2: 0.4, -1: 0.5})
    square = config.resolve(SQUARE_256, depth=4)
    assert square.keep == (None,) * 8 + (169 - int(169 * 0.4), 256 - 128)
    assert square.cache_scale == 7 and square.executed == 10 and square.layers == frozenset(range(4))
    wide = config.resolve(WIDE, depth=4)
    assert wide.keep == (None,) * 4 + (50 - 20, 128 - 64)
    assert wide.cache_scale == 3


def test_callable_prune_and_layer_rules():
    config = FastVARConfig(prune=lambda si, n: 0.5 if si >= n - 3 else 0.0, layers=lambda i, depth: i < depth // 2,
                           cache_scale=2)
    schedule = config.resolve(WIDE, depth=6)
    assert [k is not None for k in schedule.keep] == [False] * 3 + [True] * 3
    assert schedule.layers == frozenset({0, 1, 2}) and schedule.cache_scale == 2
    assert schedule.tokens_run(5, 0) == 64 and schedule.tokens_run(5, 4) == 128


def test_a_layer_rule_may_select_no_block_of_a_cut_down_model():
    official = FastVARConfig(prune={-1: 0.5}, layers=lambda i, depth: i >= 3)  # pruning from block 3 on
    assert official.resolve(SQUARE_256, depth=2).layers == frozenset()
    assert official.resolve(SQUARE_256, depth=5).layers == frozenset({3, 4})


def test_skipping_and_explicit_layers():
    schedule = FastVARConfig(prune={-3: 0.5}, skip_last=2, layers=[0, -1]).resolve(SQUARE_256, depth=5)
    assert schedule.executed == 8 and schedule.layers == frozenset({0, 4})
    assert schedule.tokens_run(9, 2) == 0 and schedule.tokens_run(7, 4) == 50 and schedule.tokens_run(7, 2) == 100


def test_nothing_pruned_nor_skipped_is_the_identity():
    assert FastVARConfig().resolve(SQUARE_256, 4).is_identity
    assert not FastVARConfig(skip_last=1).resolve(SQUARE_256, 4).is_identity


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prune={-11: 0.5}), r"scale position -11 does not exist; this schedule has 10 scales"),
        (dict(prune={10: 0.5}), r"scale position 10 does not exist"),
        (dict(prune={-1: 0.5}, layers=[4]), r"layer 4 does not exist: the model has 4 blocks"),
        (dict(prune={-1: 0.5}, cache_scale=-1), r"cache_scale -1 \(index 9\) must come before the first pruned"),
        (dict(prune={-1: 0.5}, cache_scale=12), r"cache_scale: scale position 12 does not exist"),
        (dict(prune={-1: 0.5}, skip_last=1), r"scale 9 of 10 is both pruned and skipped"),
        (dict(skip_last=10), r"skip_last=10 leaves no scale to run"),
        (dict(prune={0: 0.5}), r"scale 0 is pruned, so no earlier scale can be cached"),
        (dict(prune=lambda si, n: 2.0), r"prune\(0, 10\) = 2.0: a pruning ratio must be a number in \[0, 1\]"),
        (dict(prune={-1: 0.5, 9: 0.2}), r"prune: positions -1 and 9 both name scale 9 of 10; give each scale once"),
        (dict(prune={0: 0.0, 5: 0.3, -10: 0.0}), r"prune: positions 0 and -10 both name scale 0 of 10"),
    ],
)
def test_resolution_errors_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FastVARConfig(**kwargs).resolve(SQUARE_256, depth=4)


@pytest.mark.parametrize("ratio", [-0.1, 1.5, "half"])
def test_ratios_outside_unit_interval_are_refused(ratio):
    with pytest.raises(ValueError, match=r"must be a number in \[0, 1\]"):
        FastVARConfig(prune={-1: ratio})


def test_bad_fields_are_refused():
    with pytest.raises(ValueError, match="skip_last must be a non-negative int"):
        FastVARConfig(skip_last=-1)
    with pytest.raises(TypeError, match="prune must be a mapping"):
        FastVARConfig(prune=0.5)
    with pytest.raises(TypeError, match=r"unknown FastVARConfig field\(s\) \['ratio'\]; accepted:"):
        FastVARConfig().replace(ratio=0.5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers=5), r"layers = 5: give block indices \(e\.g\. range\(3, 28\) or \[0, 2\]\), fn\(layer, depth\)"),
    (dict(layers="abc"), r"layers = 'abc': give block indices"),
    (dict(layers=[0, 1.5]), r"layers: 1\.5 is not a block index"),
    (dict(prune={-1: 0.5}, layers=[]), r"layers = \[\] names no block, so nothing would be pruned: give block "
                                       r"indices \(e\.g\. range\(3, 28\) or \[0, 2\]\) or None for every block; "
                                       r"to prune nothing, leave prune empty \(the 'none' preset\)"),
    (dict(layers=range(0)), r"layers = range\(0, 0\) names no block"),
    (dict(prune={-1: True}), r"prune\[-1\] = True: a pruning ratio must be a number in \[0, 1\]"),
    (dict(skip_last=True), r"skip_last must be a non-negative int, got True"),
])
def test_values_of_the_wrong_kind_are_refused_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FastVARConfig(**kwargs)


def test_pruning_a_whole_scale_warns_that_skipping_is_cheaper():
    with pytest.warns(UserWarning, match=r"prune\[-1\] = 1\.0 runs no token of that scale .*skip_last"):
        config = FastVARConfig(prune={-1: 1.0})
    assert config.resolve(SQUARE_256, depth=4).keep[-1] == 0


def test_text_stages_are_refused_and_equal_token_counts_are_fine():
    shapes = [(1, 6), (2, 2), (3, 3), (4, 4)]
    with pytest.raises(ValueError, match=r"scale 0 holds the text tokens"):
        FastVARConfig(prune={0: 0.5}).resolve(shapes, 2, text_scales=1)
    with pytest.raises(ValueError, match=r"the cache scale \(index 0\) would be the text stage"):
        FastVARConfig(prune={1: 0.5}).resolve(shapes, 2, text_scales=1)
    assert FastVARConfig(prune={-1: 0.5}).resolve(shapes, 2, text_scales=1).cache_scale == 2
    same_counts = FastVARConfig(prune={-1: 0.5}).resolve([(1, 4), (2, 2), (3, 3), (4, 1)], 2, text_scales=1)
    assert same_counts.tokens == (4, 4, 9, 4) and same_counts.keep == (None, None, None, 2)
