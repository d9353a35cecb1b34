"""SequenceStore: save/load round trip, take, ragged_arange, atomic writes."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ptls_meles import store as store_module
from ptls_meles.encoding import Encoding
from ptls_meles.prepare import prepare
from ptls_meles.schema import EventSchema
from ptls_meles.store import ENCODING_FILE, STORE_FILE, SequenceStore, ragged_arange


def assert_identical(a: SequenceStore, b: SequenceStore) -> None:
    assert a.client_ids.dtype == b.client_ids.dtype
    np.testing.assert_array_equal(a.client_ids, b.client_ids)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    assert list(a.columns) == list(b.columns)
    for name, values in a.columns.items():
        other = b.columns[name]
        assert values.dtype == other.dtype, name
        assert values.tobytes() == other.tobytes(), name  # bit-identical, NaN/-0.0 included
    assert a.encoding.to_dict() == b.encoding.to_dict()


@pytest.fixture
def prepared(make_events):
    schema = EventSchema("client", "day", ["mcc"], ["amount"], numeric_transform="log_standardize")
    store, _ = prepare(make_events(n_clients=9, seed=4), schema, show_progress=False)
    return store


@pytest.mark.parametrize("ids", ["int", "str"])
def test_round_trip_is_bit_identical(tmp_path, prepared, ids):
    store = prepared
    if ids == "str":
        store.client_ids = np.array([f"user-{c}" for c in store.client_ids], dtype=object)
    out = store.save(tmp_path / "s")
    assert (out / STORE_FILE).exists() and (out / ENCODING_FILE).exists()
    loaded = SequenceStore.load(tmp_path / "s")
    assert_identical(store, loaded)
    assert loaded.meta == store.meta and loaded.meta["schema"]["client_col"] == "client"
    assert loaded.columns["event_time"].dtype == np.float64
    assert loaded.columns["mcc"].dtype == np.int32 and loaded.columns["amount"].dtype == np.float32
    assert loaded.client_ids.dtype == (np.int64 if ids == "int" else object)
    assert_identical(SequenceStore.load(tmp_path / "s" / STORE_FILE), store)  # the file path works too
    assert loaded.categorical == ["mcc"] and loaded.numeric == ["amount"]


def test_one_row_per_client_on_disk(tmp_path, prepared):
    prepared.save(tmp_path)
    table = pq.read_table(tmp_path / STORE_FILE)
    assert table.num_rows == prepared.n_clients
    assert table.column_names == ["client_id", "event_time", "mcc", "amount"]
    assert table.column("mcc").to_pylist()[2] == prepared.columns["mcc"][prepared.offsets[2] : prepared.offsets[3]].tolist()


def test_load_column_subset_and_special_values(tmp_path):
    cols = {
        "event_time": np.array([0.0, -0.0, 1e300, 5.0], np.float64),
        "a": np.array([np.nan, -0.0, np.inf, 1.5], np.float32),
        "b": np.array([0, 1, 2, 2**31 - 1], np.int32),
    }
    store = SequenceStore(np.array([5, -3]), [0, 3, 4], cols, Encoding("c", "t", "number"))
    store.save(tmp_path)
    assert_identical(SequenceStore.load(tmp_path), store)
    sub = SequenceStore.load(tmp_path, columns=["b"])
    assert list(sub.columns) == ["event_time", "b"]
    np.testing.assert_array_equal(sub.columns["b"], cols["b"])
    np.testing.assert_array_equal(sub.offsets, [0, 3, 4])


def test_empty_clients_round_trip(tmp_path):
    cols = {"event_time": np.array([1.0, 2.0]), "x": np.array([3, 4], np.int32)}
    store = SequenceStore(np.array(["a", "b", "c"], dtype=object), [0, 0, 2, 2], cols, Encoding("c", "t", "number"))
    store.save(tmp_path)
    loaded = SequenceStore.load(tmp_path)
    assert_identical(loaded, store)
    np.testing.assert_array_equal(loaded.lengths, [0, 2, 0])


def test_load_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare"):
        SequenceStore.load(tmp_path / "nothing")


def test_constructor_validates_shapes():
    enc = Encoding("c", "t", "number")
    with pytest.raises(ValueError, match="n_clients \\+ 1"):
        SequenceStore(np.array([1, 2]), [0, 3], {"event_time": np.zeros(3)}, enc)
    with pytest.raises(ValueError, match="'x'"):
        SequenceStore(np.array([1]), [0, 3], {"event_time": np.zeros(3), "x": np.zeros(2)}, enc)


def test_from_arrow_rejects_mismatched_lists():
    table = pa.table({"client_id": [1, 2], "event_time": [[1.0, 2.0], [3.0]], "x": [[1], [2, 3]]})
    with pytest.raises(ValueError, match="'x'"):
        SequenceStore.from_arrow(table, Encoding("c", "t", "number"))
    table = pa.table({"client_id": [1], "event_time": pa.array([None], pa.list_(pa.float64()))})
    with pytest.raises(ValueError, match="null"):
        SequenceStore.from_arrow(table, Encoding("c", "t", "number"))


def test_from_arrow_of_a_sliced_table(tmp_path, prepared):
    """Row slices of a table (non-zero list offsets) load correctly."""
    sliced = prepared.to_arrow().slice(3, 4)
    got = SequenceStore.from_arrow(sliced, prepared.encoding)
    assert_identical(got, prepared.take(np.arange(3, 7)))


def test_take(prepared):
    idx = np.array([4, 0, 4, 8])
    sub = prepared.take(idx)
    np.testing.assert_array_equal(sub.client_ids, prepared.client_ids[idx])
    np.testing.assert_array_equal(sub.lengths, prepared.lengths[idx])
    for j, i in enumerate(idx):
        for name in prepared.columns:
            np.testing.assert_array_equal(
                sub.columns[name][sub.offsets[j] : sub.offsets[j + 1]],
                prepared.columns[name][prepared.offsets[i] : prepared.offsets[i + 1]],
            )
        pd.testing.assert_frame_equal(sub.client_frame(j), prepared.client_frame(i))
    empty = prepared.take(np.array([], dtype=np.int64))
    assert empty.n_clients == 0 and empty.n_events == 0 and all(len(v) == 0 for v in empty.columns.values())
    assert_identical(prepared.take(np.arange(prepared.n_clients)), prepared)


@pytest.mark.parametrize(
    "starts, lengths, expected",
    [
        ([5, 0, 10], [2, 3, 1], [5, 6, 0, 1, 2, 10]),
        ([3, 7, 7], [0, 2, 0], [7, 8]),
        ([4, 4], [2, 2], [4, 5, 4, 5]),
        ([], [], []),
        ([1, 2], [0, 0], []),
    ],
)
def test_ragged_arange_by_hand(starts, lengths, expected):
    got = ragged_arange(np.array(starts, np.int64), np.array(lengths, np.int64))
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)


def test_ragged_arange_matches_loop():
    rng = np.random.default_rng(0)
    starts, lengths = rng.integers(0, 1000, 300), rng.integers(0, 20, 300)
    expected = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)])
    np.testing.assert_array_equal(ragged_arange(starts, lengths), expected)


def test_failed_write_leaves_nothing(tmp_path, prepared, monkeypatch):
    def boom(table, where, **kw):
        with open(where, "wb") as fh:  # a partial file at the temporary path
            fh.write(b"PAR1 half written")
        raise OSError("disk full")

    monkeypatch.setattr(store_module.pq, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        prepared.save(tmp_path / "s")
    assert list((tmp_path / "s").iterdir()) == []  # no store, no temp file, no encoding


def test_failed_overwrite_keeps_the_old_store(tmp_path, prepared, monkeypatch):
    prepared.save(tmp_path)
    before = (tmp_path / STORE_FILE).read_bytes()
    monkeypatch.setattr(store_module.pq, "write_table", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError):
        prepared.take(np.array([0])).save(tmp_path)
    assert (tmp_path / STORE_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [ENCODING_FILE, STORE_FILE]
    assert_identical(SequenceStore.load(tmp_path), prepared)
