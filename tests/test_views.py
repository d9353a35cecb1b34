"""Pair generation: every view inside its client, in time order, with the promised lengths."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptls_meles.views import SPLITS, Views, make_views


def offsets_of(lengths) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def view_list(views: Views) -> list[np.ndarray]:
    return [views.index[a:b] for a, b in zip(views.offsets[:-1], views.offsets[1:])]


def check_views(views: Views, offsets, clients, strategy, k, cnt_min, cnt_max):
    """The invariants every strategy promises; returns the views as a list."""
    clients = np.asarray(clients)
    n = len(clients)
    np.testing.assert_array_equal(views.label, np.repeat(np.arange(n), k))
    assert len(views.offsets) == n * k + 1 and views.offsets[-1] == len(views.index)
    assert views.index.dtype == np.int64
    out = view_list(views)
    for v, idx in enumerate(out):
        c = clients[views.label[v]]
        lo, hi = offsets[c], offsets[c + 1]
        L = hi - lo
        assert len(idx) >= 1
        assert np.all((idx >= lo) & (idx < hi)), f"view {v} leaves client {c}"
        if strategy == "disjoint" and L < k:
            assert np.all(np.diff(idx) >= 0)
        else:
            assert np.all(np.diff(idx) > 0), f"view {v} not in time order / repeats an event"
        if strategy in ("slices", "samples"):
            if L >= cnt_min:
                assert cnt_min <= len(idx) <= min(L, cnt_max)
            else:
                assert math.ceil(L / 2) <= len(idx) <= L
        if strategy == "slices":
            assert np.all(np.diff(idx) == 1), "slice not contiguous"
        if strategy == "disjoint":
            assert len(idx) == min(max(L // k, 1), cnt_max)
    if strategy == "disjoint":
        for i, c in enumerate(clients):
            L = offsets[c + 1] - offsets[c]
            mine = np.concatenate(out[i * k : (i + 1) * k])
            if L >= k:
                assert len(np.unique(mine)) == len(mine), f"disjoint views of client {c} share events"
            else:
                assert set(mine.tolist()) == set(range(offsets[c], offsets[c + 1]))  # every event used
    return out


LENGTHS = [1, 2, 3, 4, 7, 10, 11, 40, 200]


@pytest.mark.parametrize("strategy", SPLITS)
def test_invariants_on_mixed_lengths(strategy):
    offsets = offsets_of(LENGTHS)
    clients = np.array([8, 0, 3, 5, 1, 7, 2, 6, 4])  # not in store order
    rng = np.random.default_rng(1)
    for _ in range(20):
        views = make_views(offsets, clients, strategy, 3, 5, 30, rng)
        check_views(views, offsets, clients, strategy, 3, 5, 30)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 60), min_size=1, max_size=12),
    k=st.integers(2, 6),
    cnt_min=st.integers(1, 20),
    extra=st.integers(0, 30),
    strategy=st.sampled_from(SPLITS),
    seed=st.integers(0, 2**31),
)
def test_invariants_property(lengths, k, cnt_min, extra, strategy, seed):
    offsets = offsets_of(lengths)
    rng = np.random.default_rng(seed)
    clients = rng.permutation(len(lengths))
    views = make_views(offsets, clients, strategy, k, cnt_min, cnt_min + extra, rng)
    check_views(views, offsets, clients, strategy, k, cnt_min, cnt_min + extra)


def test_single_event_client_gives_identical_views():
    offsets = offsets_of([5, 1, 5])
    for strategy in SPLITS:
        views = make_views(offsets, np.array([1]), strategy, 4, 3, 10, np.random.default_rng(0))
        assert [v.tolist() for v in view_list(views)] == [[5]] * 4


def test_short_client_views_still_differ():
    """L < cnt_min: lengths in [ceil(L/2), L], so the views are not all the whole sequence."""
    offsets = offsets_of([8])
    rng = np.random.default_rng(0)
    for strategy in ("slices", "samples"):
        seen = set()
        for _ in range(30):
            views = make_views(offsets, np.array([0]), strategy, 2, 25, 100, rng)
            seen.update(tuple(v) for v in view_list(views))
        assert len(seen) > 3
        assert {len(v) for v in seen} <= set(range(4, 9)) and min(len(v) for v in seen) == 4


def test_lengths_cover_the_range():
    offsets = offsets_of([100])
    lens = np.concatenate(
        [make_views(offsets, [0], "slices", 10, 5, 50, np.random.default_rng(s)).lengths for s in range(30)]
    )
    assert lens.min() == 5 and lens.max() == 50
    assert 20 < lens.mean() < 35  # uniform on [5, 50]: mean 27.5


def test_slices_start_anywhere():
    offsets = offsets_of([50])
    starts = np.concatenate(
        [[v[0] for v in view_list(make_views(offsets, [0], "slices", 5, 10, 10, np.random.default_rng(s)))] for s in range(40)]
    )
    assert starts.min() == 0 and starts.max() == 40


def test_samples_are_not_only_slices():
    offsets = offsets_of([100])
    views = make_views(offsets, [0], "samples", 5, 10, 20, np.random.default_rng(0))
    assert any(np.any(np.diff(v) > 1) for v in view_list(views))


def test_disjoint_partition_and_cap():
    offsets = offsets_of([12, 100])
    views = make_views(offsets, [0, 1], "disjoint", 3, 50, 60, np.random.default_rng(0))
    out = view_list(views)
    assert [len(v) for v in out] == [4, 4, 4, 33, 33, 33]  # cnt_min does not apply
    assert sorted(np.concatenate(out[:3]).tolist()) == list(range(12))
    capped = make_views(offsets, [1], "disjoint", 2, 1, 10, np.random.default_rng(0))
    assert capped.lengths.tolist() == [10, 10]


def test_deterministic_for_a_seed():
    offsets = offsets_of(LENGTHS)
    clients = np.arange(len(LENGTHS))
    for strategy in SPLITS:
        a = make_views(offsets, clients, strategy, 4, 3, 20, np.random.default_rng(123))
        b = make_views(offsets, clients, strategy, 4, 3, 20, np.random.default_rng(123))
        c = make_views(offsets, clients, strategy, 4, 3, 20, np.random.default_rng(124))
        np.testing.assert_array_equal(a.index, b.index)
        np.testing.assert_array_equal(a.offsets, b.offsets)
        assert not (len(a.index) == len(c.index) and np.array_equal(a.index, c.index))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"strategy": "windows"}, "windows"),
        ({"split_count": 1}, "split_count"),
        ({"cnt_min": 0}, "cnt_min"),
        ({"cnt_min": 10, "cnt_max": 5}, "cnt_min"),
    ],
)
def test_invalid_arguments(kw, match):
    args = {"strategy": "slices", "split_count": 2, "cnt_min": 1, "cnt_max": 5, **kw}
    with pytest.raises(ValueError, match=match):
        make_views(offsets_of([3]), np.array([0]), rng=np.random.default_rng(0), **args)


@pytest.mark.parametrize("strategy", SPLITS)
def test_long_view_is_each_clients_last_view_and_a_slice_of_up_to_n_events(strategy):
    offsets = offsets_of(LENGTHS)
    clients = np.array([8, 0, 3, 5, 1, 7, 2, 6, 4])
    k, n_long = 4, 25
    starts_seen = set()
    for seed in range(10):
        views = make_views(offsets, clients, strategy, k, 5, 10, np.random.default_rng(seed), long_view=n_long)
        np.testing.assert_array_equal(views.label, np.repeat(np.arange(len(clients)), k))
        out = view_list(views)
        for i, c in enumerate(clients):
            lo, hi = offsets[c], offsets[c + 1]
            long = out[i * k + k - 1]
            assert len(long) == min(hi - lo, n_long) and np.all(np.diff(long) == 1)
            assert lo <= long[0] and long[-1] < hi
            starts_seen.add((int(c), int(long[0])))
            for short in out[i * k : i * k + k - 1]:  # the others stay the strategy's views
                assert np.all((short >= lo) & (short < hi)) and len(short) <= max(10, (hi - lo) // (k - 1) + 1)
    # the 40- and 200-event clients' long views start at more than one place
    assert len({s for c, s in starts_seen if c == 7}) > 1 and len({s for c, s in starts_seen if c == 8}) > 1
    with pytest.raises(ValueError, match="long_view"):
        make_views(offsets, clients, strategy, k, 5, 10, np.random.default_rng(0), long_view=-1)


def test_empty_client_is_refused():
    """A zero-length client would otherwise get views made of its neighbour's events."""
    for strategy in SPLITS:
        with pytest.raises(ValueError, match="no events"):
            make_views(offsets_of([0, 3]), np.array([1, 0]), strategy, 2, 1, 5, np.random.default_rng(0))
    views = make_views(offsets_of([0, 3]), np.array([1]), "slices", 2, 1, 5, np.random.default_rng(0))
    assert views.index.min() >= 0 and views.index.max() < 3
