"""Padding, the epoch-keyed view batches, DDP sharding, the client split and recall@k."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ptls_meles.batch import PaddedBatch, pad_segments
from ptls_meles.config import MeLESConfig
from ptls_meles.datamodule import EpochBatchSampler, ViewBatches, train_val_clients
from ptls_meles.metrics import recall_at_k


# ------------------------------------------------------------------ pad_segments
def test_pad_segments_by_hand():
    columns = {
        "mcc": np.array([10, 11, 12, 13, 14, 15], np.int32),
        "amount": np.array([0.5, 1.5, 2.5, 3.5, 4.5, 5.5], np.float32),
        "event_time": np.array([100.0, 101, 102, 103, 104, 105], np.float64),
    }
    index = np.array([3, 4, 0, 5, 1, 2])
    offsets = np.array([0, 2, 2, 6])  # segments [3, 4], [], [0, 5, 1, 2]
    batch = pad_segments(columns, index, offsets)
    assert isinstance(batch, PaddedBatch) and batch.batch_size == 3 and batch.max_len == 4
    assert batch.lengths.dtype == torch.int64 and batch.lengths.tolist() == [2, 0, 4]
    assert batch.payload["mcc"].dtype == torch.int64
    assert batch.payload["amount"].dtype == torch.float32 and batch.payload["event_time"].dtype == torch.float64
    assert batch.payload["mcc"].tolist() == [[13, 14, 0, 0], [0, 0, 0, 0], [10, 15, 11, 12]]
    assert batch.payload["amount"].tolist() == [[3.5, 4.5, 0, 0], [0, 0, 0, 0], [0.5, 5.5, 1.5, 2.5]]
    assert batch.payload["event_time"].tolist() == [[103, 104, 0, 0], [0, 0, 0, 0], [100, 105, 101, 102]]
    assert batch.mask().tolist() == [[True, True, False, False], [False] * 4, [True] * 4]


def test_pad_segments_random_matches_loop():
    rng = np.random.default_rng(0)
    flat = {"a": rng.integers(2, 50, 200).astype(np.int32), "b": rng.normal(size=200).astype(np.float32)}
    lengths = rng.integers(1, 15, 20)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    index = rng.integers(0, 200, offsets[-1])
    batch = pad_segments(flat, index, offsets)
    for name, values in flat.items():
        out = batch.payload[name].numpy()
        for i in range(20):
            seg = values[index[offsets[i] : offsets[i + 1]]]
            np.testing.assert_array_equal(out[i, : lengths[i]], seg)
            assert np.all(out[i, lengths[i] :] == 0)


def test_pad_segments_empty_batch():
    batch = pad_segments({"a": np.arange(3, dtype=np.int32)}, np.zeros(0, np.int64), np.array([0]))
    assert batch.batch_size == 0 and tuple(batch.payload["a"].shape) == (0, 0)


# ------------------------------------------------------------------ ViewBatches
def config(**kw) -> MeLESConfig:
    base = dict(batch_size=5, split_count=3, cnt_min=2, cnt_max=6, split="slices", seed=7)
    return MeLESConfig(**{**base, **kw})


def owners(batch: PaddedBatch) -> np.ndarray:
    """Store position of the client of each view, read back from the ``owner`` column (position + 1)."""
    own = batch.payload["owner"].numpy()
    lengths = batch.lengths.numpy()
    firsts = own[:, 0] - 1
    for i, n in enumerate(lengths):  # every event of a view belongs to one client
        assert np.all(own[i, :n] == own[i, 0]) and np.all(own[i, n:] == 0)
    return firsts


def batches_equal(x, y) -> bool:
    (bx, lx), (by, ly) = x, y
    return (
        torch.equal(lx, ly)
        and torch.equal(bx.lengths, by.lengths)
        and all(torch.equal(bx.payload[k], by.payload[k]) for k in bx.payload)
    )


@pytest.fixture
def store(make_store):
    rng = np.random.default_rng(0)
    return make_store(rng.integers(1, 30, 23))


@pytest.mark.parametrize("split", ["slices", "samples", "disjoint"])
def test_every_training_client_once_per_epoch(store, split):
    train = np.array([i for i in range(store.n_clients) if i % 4 != 1])  # a train split: not all clients
    ds = ViewBatches(store, train, config(split=split))
    assert len(ds) == math.ceil(len(train) / 5)
    for epoch in (0, 1):
        seen = []
        for b in range(len(ds)):
            batch, labels = ds[(epoch, b)]
            n = len(labels) // 3
            assert torch.equal(labels, torch.arange(n).repeat_interleave(3))
            own = owners(batch)
            for pos in range(n):  # views with one label come from one client, distinct labels from distinct clients
                assert len(set(own[labels.numpy() == pos])) == 1
            seen.extend(own[::3].tolist())
            assert batch.payload["event_time"].dtype == torch.float64 and batch.payload["owner"].dtype == torch.int64
        assert sorted(seen) == train.tolist()


def test_long_view_setting_reaches_the_training_batches(store):
    """``long_view``: each client's last view in a batch is as long as its history allows, up to N."""
    ds = ViewBatches(store, np.arange(store.n_clients), config(long_view=12))
    for b in range(len(ds)):
        batch, labels = ds[(0, b)]
        own = owners(batch)[2::3]
        history = store.offsets[own + 1] - store.offsets[own]
        np.testing.assert_array_equal(batch.lengths.numpy()[2::3], np.minimum(history, 12))
        assert int(batch.lengths[0::3].max()) <= 6  # the others stay slices of at most cnt_max
    with pytest.raises(ValueError, match="long_view"):
        config(long_view=-3)


def test_same_key_same_batch_whatever_the_order(store):
    ds = ViewBatches(store, np.arange(store.n_clients), config())
    keys = [(e, b) for e in (0, 3, 1) for b in range(len(ds))]
    first = {k: ds[k] for k in keys}
    fresh = ViewBatches(store, np.arange(store.n_clients), config())
    for k in reversed(keys):  # another object, other order, epochs interleaved
        assert batches_equal(fresh[k], first[k])
        assert batches_equal(ds[(k[0] + 1, 0)], ds[(k[0] + 1, 0)])
        assert batches_equal(ds[k], first[k])
    assert batches_equal(ds[2], ds[(0, 2)])  # a plain int means epoch 0


def test_epochs_and_seeds_differ(store):
    ds = ViewBatches(store, np.arange(store.n_clients), config())
    e0 = [ds[(0, b)] for b in range(len(ds))]
    e1 = [ds[(1, b)] for b in range(len(ds))]
    assert not all(batches_equal(a, b) for a, b in zip(e0, e1))
    order0 = [sorted(owners(x[0])[::3].tolist()) for x in e0]
    order1 = [sorted(owners(x[0])[::3].tolist()) for x in e1]
    assert order0 != order1  # the client grouping changes, not only the views
    other = ViewBatches(store, np.arange(store.n_clients), config(seed=8))
    assert not all(batches_equal(other[(0, b)], e0[b]) for b in range(len(ds)))


def test_fixed_epoch_ignores_the_sampler_epoch(store):
    ds = ViewBatches(store, np.arange(store.n_clients), config(), fixed_epoch=5)
    for b in range(len(ds)):
        assert batches_equal(ds[(0, b)], ds[(9, b)])


def test_batches_group_similar_lengths(make_store):
    lengths = np.r_[np.full(20, 3), np.full(20, 100)]
    st = make_store(np.random.default_rng(1).permutation(lengths))
    ds = ViewBatches(st, np.arange(40), config(batch_size=10))
    for b in range(len(ds)):
        own = owners(ds[(0, b)][0])
        assert len(set(st.lengths[own].tolist())) == 1  # bucketing: no batch mixes 3- and 100-event clients


# ------------------------------------------------------------------ sampler and client split
def test_epoch_batch_sampler_shards_are_equal_and_disjoint():
    # every rank must run the same number of steps (DDP all-reduce); the remainder is left out
    for n_batches, expected in ((7, 6), (8, 8)):
        shards = [EpochBatchSampler(n_batches, num_replicas=2, rank=r) for r in (0, 1)]
        for s in shards:
            s.set_epoch(4)
        keys = [list(s) for s in shards]
        assert [len(s) for s in shards] == [len(k) for k in keys] == [expected // 2] * 2
        flat = [b for k in keys for (_, b) in k]
        assert len(set(flat)) == len(flat) == expected
        assert all(e == 4 for k in keys for (e, _) in k)
    tiny = [list(EpochBatchSampler(1, num_replicas=2, rank=r)) for r in (0, 1)]
    assert tiny == [[(0, 0)], [(0, 0)]]  # fewer batches than ranks: they share one
    single = EpochBatchSampler(3)
    assert list(single) == [(0, 0), (0, 1), (0, 2)]
    single.set_epoch(2)
    assert list(single) == [(2, 0), (2, 1), (2, 2)]


def test_split_clients():
    train, val = train_val_clients(100, 0.1, 1000, seed=1)
    assert len(val) == 10 and len(train) == 90
    assert sorted(np.r_[train, val].tolist()) == list(range(100))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    train2, val2 = train_val_clients(100, 0.1, 1000, seed=1)
    assert np.array_equal(val, val2) and np.array_equal(train, train2)
    assert not np.array_equal(train_val_clients(100, 0.1, 1000, seed=2)[1], val)
    assert len(train_val_clients(100, 0.5, 7, seed=1)[1]) == 7  # capped by max_val
    assert len(train_val_clients(5, 0.0, 10, seed=0)[1]) == 0
    with pytest.raises(ValueError, match="at least 2 training clients"):
        train_val_clients(3, 0.5, 10, seed=0)


# ------------------------------------------------------------------ recall@k
def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_recall_at_k_by_hand():
    # a1 0°, b1 10°, a2 90°, b2 100°: each view's nearest other view is of the other client
    emb = torch.tensor([unit(0), unit(10), unit(90), unit(100)])
    labels = torch.tensor([0, 1, 0, 1])
    assert recall_at_k(emb, labels, 1) == 0.0
    # k=2: a1 → {b1, a2}: 1/2; b1 → {a1, a2}: 0; a2 → {b2, b1}: 0; b2 → {a2, b1}: 1/2 → 2/8
    assert recall_at_k(emb, labels, 2) == pytest.approx(0.25)
    assert recall_at_k(emb * torch.tensor([[3.0], [0.5], [2.0], [7.0]]), labels, 2) == pytest.approx(0.25)  # cosine
    good = torch.tensor([unit(0), unit(5), unit(90), unit(95)])
    same_pairs = torch.tensor([0, 0, 1, 1])
    assert recall_at_k(good, same_pairs, 1) == 1.0
    assert recall_at_k(good, same_pairs, 10) == pytest.approx(1 / 3)  # k clipped to n - 1 = 3


@pytest.mark.parametrize("n_clients, sizes", [(129, [64, 65]), (128, [64, 64]), (130, [64, 64, 2]), (1, [1])])
def test_a_lone_client_never_makes_a_batch_of_its_own(n_clients, sizes):
    # one client alone has no negatives, and one row breaks a BatchNorm over clients (the neural baselines' head)
    from ptls_meles.store import SequenceStore
    from ptls_meles.encoding import CategoryVocab, Encoding

    offsets = np.arange(n_clients + 1, dtype=np.int64) * 3
    enc = Encoding("c", "t", "number", categorical={"m": CategoryVocab(values=["a"])})
    store = SequenceStore(np.arange(n_clients).astype(str), offsets,
                          {"t": np.arange(3.0 * n_clients), "m": np.full(3 * n_clients, 2, np.int32)}, enc)
    ds = ViewBatches(store, np.arange(n_clients), MeLESConfig(batch_size=64, cnt_min=1, cnt_max=3))
    plan = ds._epoch_plan(0)
    assert len(ds) == len(plan) and sorted(len(b) for b in plan) == sorted(sizes)
    assert np.array_equal(np.sort(np.concatenate(plan)), np.arange(n_clients))  # every client once
