"""prepare: validation errors, drop accounting, input kinds, time formats, sorting and encoding."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from ptls_meles.encoding import PAD_ID, UNSEEN_ID, CategoryVocab, Encoding, NumericTransform, as_category_strings
from ptls_meles.prepare import prepare
from ptls_meles.schema import EventSchema, SchemaError, detect_time_format
from ptls_meles.store import ENCODING_FILE, TIME_COLUMN

SCHEMA = EventSchema("client", "day", categorical=["mcc"], numeric=["amount"])


def run(source, schema=SCHEMA, **kw):
    kw.setdefault("show_progress", False)
    return prepare(source, schema, **kw)


def assert_same_store(a, b):
    np.testing.assert_array_equal(a.client_ids, b.client_ids)
    assert a.client_ids.dtype == b.client_ids.dtype
    np.testing.assert_array_equal(a.offsets, b.offsets)
    assert list(a.columns) == list(b.columns)
    for name in a.columns:
        assert a.columns[name].dtype == b.columns[name].dtype, name
        np.testing.assert_array_equal(a.columns[name], b.columns[name], err_msg=name)
    assert a.encoding.to_dict() == b.encoding.to_dict()


# ------------------------------------------------------------------ validation errors
class TestErrors:
    def test_missing_column_dataframe_lists_available(self):
        df = pd.DataFrame({"client": [1], "day": [1], "mcc": [1], "amt": [1.0]})
        with pytest.raises(SchemaError) as e:
            run(df)
        msg = str(e.value)
        assert "'amount'" in msg and "missing" in msg
        for col in ("client", "day", "mcc", "amt"):
            assert f"'{col}'" in msg

    @pytest.mark.parametrize("kind", ["parquet", "csv"])
    def test_missing_column_file_names_file(self, tmp_path, kind):
        df = pd.DataFrame({"client": [1, 2], "time": [1, 2], "mcc": [1, 2], "amount": [1.0, 2.0]})
        path = tmp_path / f"events.{kind}"
        df.to_parquet(path) if kind == "parquet" else df.to_csv(path, index=False)
        with pytest.raises(SchemaError) as e:
            run(path)
        msg = str(e.value)
        assert str(path) in msg and "'day'" in msg and "'time'" in msg

    def test_missing_column_arrow_table(self):
        with pytest.raises(SchemaError, match="'mcc'"):
            run(pa.table({"client": [1], "day": [1], "amount": [1.0]}))

    def test_null_client_id(self):
        df = pd.DataFrame({"client": ["a", None, "b"], "day": [1, 2, 3], "mcc": [1, 1, 1], "amount": [1.0, 2, 3]})
        with pytest.raises(SchemaError) as e:
            run(df)
        msg = str(e.value)
        assert "'client'" in msg and "null client id" in msg and "row 1" in msg

    def test_non_numeric_number_names_column_and_example(self):
        df = pd.DataFrame({"client": [1, 1, 2], "day": [1, 2, 3], "mcc": [1, 1, 1], "amount": ["1.5", "12,50", "3"]})
        with pytest.raises(SchemaError) as e:
            run(df)
        msg = str(e.value)
        assert "'amount'" in msg and "'12,50'" in msg and "row 1" in msg and "1 row(s)" in msg

    @pytest.mark.parametrize("bad, shown", [(np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf")])
    def test_nan_and_inf_number(self, bad, shown):
        tbl = pa.table({"client": [1, 1, 2], "day": [1, 2, 3], "mcc": [1, 1, 1], "amount": pa.array([1.0, 2.0, bad])})
        with pytest.raises(SchemaError) as e:
            run(tbl)
        msg = str(e.value)
        assert "'amount'" in msg and f"e.g. {shown} at row 2" in msg

    def test_nan_from_pandas_is_reported_as_missing_value(self):
        df = pd.DataFrame({"client": [1, 1], "day": [1, 2], "mcc": [1, 1], "amount": [1.0, np.nan]})
        with pytest.raises(SchemaError, match=r"'amount'.*null, NaN or infinite.*row 1"):
            run(df)

    @pytest.mark.parametrize(
        "fmt, values, bad, expect",
        [
            ("number", ["1", "2.5", "soon"], "soon", "expected a number"),
            ("timestamp", ["2021-01-01", "2021-01-02 10:00:00", "not a date"], "not a date", "expected a timestamp"),
            ("day_hms", ["0 10:23:26", "1 00:00:01", "10:23:26"], "10:23:26", "d hh:mm:ss"),
            ("auto", ["1", "2", "3", "x7"], "x7", "expected a number"),
            ("auto", ["0 10:00:00", "1 00:00:01", "2 10:00:00", "1 25h"], "1 25h", "d hh:mm:ss"),
        ],
    )
    def test_unparsable_time(self, fmt, values, bad, expect):
        n = len(values)
        df = pd.DataFrame({"client": [1] * n, "day": values, "mcc": [1] * n, "amount": [1.0] * n})
        schema = EventSchema("client", "day", ["mcc"], ["amount"], time_format=fmt)
        with pytest.raises(SchemaError) as e:
            run(df, schema)
        msg = str(e.value)
        assert "'day'" in msg and expect in msg and repr(bad) in msg and f"row {values.index(bad)}" in msg
        assert "1 row(s)" in msg  # only the bad value, not the good ones

    def test_empty_dataframe(self):
        df = pd.DataFrame({"client": [], "day": [], "mcc": [], "amount": []})
        with pytest.raises(SchemaError, match="no events"):
            run(df)

    def test_empty_csv_file(self, tmp_path):
        path = tmp_path / "empty.csv"
        path.write_text("")
        with pytest.raises(SchemaError) as e:
            run(path)
        assert str(path) in str(e.value) and "empty" in str(e.value)

    def test_csv_with_header_only(self, tmp_path):
        path = tmp_path / "header.csv"
        path.write_text("client,day,mcc,amount\n")
        with pytest.raises(SchemaError) as e:
            run(path)
        assert str(path) in str(e.value) and "no events" in str(e.value)

    def test_directory_without_data_files(self, tmp_path):
        (tmp_path / "notes.txt.bak").write_text("x")
        (tmp_path / "readme.json").write_text("{}")
        with pytest.raises(SchemaError) as e:
            run(tmp_path)
        assert str(tmp_path) in str(e.value) and "no .parquet or .csv" in str(e.value)

    def test_missing_path(self, tmp_path):
        with pytest.raises(FileNotFoundError):
            run(tmp_path / "nope.parquet")

    @pytest.mark.parametrize("damage", ["garbage", "truncated"])
    def test_corrupt_parquet_among_good_ones_is_named(self, tmp_path, make_events, damage):
        df = make_events()
        df.iloc[:10].to_parquet(tmp_path / "part-0.parquet")
        df.iloc[10:].to_parquet(tmp_path / "part-2.parquet")
        bad = tmp_path / "part-1.parquet"
        good_bytes = (tmp_path / "part-2.parquet").read_bytes()
        bad.write_bytes(b"this is not parquet" if damage == "garbage" else good_bytes[: len(good_bytes) // 2])
        with pytest.raises(SchemaError) as e:
            run(tmp_path)
        msg = str(e.value)
        assert str(bad) in msg and "part-0" not in msg and "part-2" not in msg

    def test_all_rows_dropped(self):
        df = pd.DataFrame({"client": [1, 2], "day": [1, 2], "mcc": [1, 1], "amount": ["x", "y"]})
        with pytest.raises(SchemaError, match="all 2 rows were dropped"):
            run(df, on_error="drop")

    def test_bad_arguments(self):
        df = pd.DataFrame({"client": [1], "day": [1], "mcc": [1], "amount": [1.0]})
        with pytest.raises(ValueError, match="on_error"):
            run(df, on_error="ignore")
        with pytest.raises(SchemaError, match="time_format"):
            EventSchema("client", "day", time_format="epoch")
        with pytest.raises(SchemaError, match="client"):
            EventSchema("client", "day", categorical=["client"])
        with pytest.raises(SchemaError, match="more than once"):
            EventSchema("client", "day", categorical=["mcc"], numeric=["mcc"])
        with pytest.raises(ValueError, match="numeric transform"):
            run(df, EventSchema("client", "day", ["mcc"], ["amount"], numeric_transform="sqrt"))


class TestDrop:
    def frame(self):
        return pd.DataFrame(
            {
                "client": [1, None, 2, 2, 3, None, 3, 1, 4],
                "day": ["1", "2", "?", "4", "5", "??", "7", "8", "9"],
                "mcc": [1, 2, 3, 4, 5, 6, 7, 8, 9],
                "amount": ["1", "2", "3", "nan", "x", "6", "7", "8", "inf"],
                "fee": [1.0, 1, 1, 1, 1, 1, np.nan, 1, 1],
            }
        )

    def test_drop_counts_each_row_once_by_first_reason(self):
        df = self.frame()
        schema = EventSchema("client", "day", ["mcc"], ["amount", "fee"], time_format="number")
        store, report = run(df, schema, on_error="drop")
        # rows 1 and 5: null client (row 5 also has a bad time, counted once);
        # row 2: bad time; rows 3, 4, 8: bad amount; row 6: bad fee
        assert report.dropped == {"null client id": 2, "bad time (day)": 1, "bad number (amount)": 3, "bad number (fee)": 1}
        assert report.n_rows_read == 9 == report.n_events + sum(report.dropped.values())
        assert report.n_events == store.n_events == 2
        np.testing.assert_array_equal(store.client_ids, [1])
        np.testing.assert_array_equal(store.columns[TIME_COLUMN], [1.0, 8.0])
        assert "dropped 7 rows" in report.summary()

    def test_drop_matches_prefiltered_input(self):
        df = self.frame()
        schema = EventSchema("client", "day", [], ["amount", "fee"], time_format="number", numeric_transform="standardize")
        dropped, _ = run(df, schema, on_error="drop")
        clean, report = run(df.iloc[[0, 7]].astype({"client": "int64"}), schema)
        assert sum(report.dropped.values()) == 0
        assert_same_store(dropped, clean)

    def test_drop_over_chunks_and_files(self, tmp_path, make_events):
        df = make_events(n_clients=8)
        df["amount"] = df["amount"].astype(str)
        df.loc[[3, 17, len(df) - 1], "amount"] = "oops"
        df.loc[[5], "day"] = -1  # a valid number: kept
        df.iloc[:20].to_csv(tmp_path / "a.csv", index=False)
        df.iloc[20:].to_csv(tmp_path / "b.csv", index=False)
        store, report = run(tmp_path, on_error="drop")
        assert report.dropped == {"bad number (amount)": 3}
        assert report.n_rows_read == len(df) == report.n_events + 3
        _, report2 = run(df, on_error="drop", chunk_rows=4)
        assert report2.dropped == {"bad number (amount)": 3} and report2.n_events == store.n_events


# ------------------------------------------------------------------ input kinds
class TestInputs:
    def test_all_source_kinds_give_identical_stores(self, tmp_path, make_events):
        df = make_events(n_clients=7, seed=3)
        df = pd.concat([df, df.iloc[:4]], ignore_index=True)  # duplicated events, kept
        reference, report = run(df)
        assert report.n_events == len(df)

        df.to_parquet(tmp_path / "one.parquet")
        (tmp_path / "dir").mkdir()
        df.iloc[:15].to_parquet(tmp_path / "dir" / "part-000.parquet")
        df.iloc[15:].to_parquet(tmp_path / "dir" / "part-001.parquet")
        (tmp_path / "dir" / "_SUCCESS").write_text("")
        (tmp_path / "dir" / ".ipynb_checkpoints").mkdir()
        df.iloc[:3].to_csv(tmp_path / "dir" / ".ipynb_checkpoints" / "old-checkpoint.csv", index=False)
        df.to_csv(tmp_path / "comma.csv", index=False)
        df.to_csv(tmp_path / "semicolon.csv", index=False, sep=";")

        sources = {
            "parquet": tmp_path / "one.parquet",
            "directory": tmp_path / "dir",
            "csv": tmp_path / "comma.csv",
            "csv;": tmp_path / "semicolon.csv",
            "str path": str(tmp_path / "one.parquet"),
            "arrow": pa.Table.from_pandas(df, preserve_index=False),
            "chunked": df,
        }
        for name, source in sources.items():
            store, rep = run(source, chunk_rows=5 if name == "chunked" else 1_000_000)
            assert rep.n_rows_read == len(df), name
            assert_same_store(store, reference)

    def test_string_client_ids_and_categories(self, tmp_path):
        df = pd.DataFrame(
            {"client": ["u10", "u9", "u10", "a"], "day": [3, 1, 2, 5], "mcc": ["food", "fuel", "food", "FOOD"], "amount": [1.0, 2, 3, 4]}
        )
        store, _ = run(df)
        np.testing.assert_array_equal(store.client_ids, ["a", "u10", "u9"])  # text order
        df.to_csv(tmp_path / "x.csv", index=False)
        assert_same_store(run(tmp_path / "x.csv")[0], store)

    def test_categorical_pandas_dtype_and_float_codes(self):
        df = pd.DataFrame({"client": [1, 1, 1, 1], "day": [1, 2, 3, 4], "mcc": [5, 6, 5, 5], "amount": [1.0] * 4})
        reference, _ = run(df)
        assert_same_store(run(df.assign(mcc=df.mcc.astype("category")))[0], reference)
        assert_same_store(run(df.assign(mcc=df.mcc.astype(float)), chunk_rows=1)[0], reference)
        assert_same_store(run(df.assign(mcc=df.mcc.astype(str)))[0], reference)

    def test_float_category_keys_do_not_depend_on_chunk(self):
        # a chunk with 5.5 must not turn 5.0 into the key "5.0" while other chunks say "5"
        df = pd.DataFrame({"client": [1] * 4, "day": [1, 2, 3, 4], "mcc": [5.0, 6.0, 5.0, 5.5], "amount": [1.0] * 4})
        store, _ = run(df, chunk_rows=2)
        vocab = store.encoding.categorical["mcc"]
        assert vocab.values == ["5", "5.5", "6"] and vocab.counts == [2, 1, 1]
        np.testing.assert_array_equal(store.columns["mcc"], [2, 4, 2, 3])
        np.testing.assert_array_equal(as_category_strings(np.array([5.0, 5.5, -2.0]))[:3], ["5", "5.5", "-2"])
        np.testing.assert_array_equal(CategoryVocab(["5"]).encode(np.array([5.0, np.nan])), [2, UNSEEN_ID])

    def test_null_client_in_int_column_keeps_int_ids(self):
        df = pd.DataFrame({"client": [1, None, 2], "day": [1, 2, 3], "mcc": [1, 1, 1], "amount": [1.0, 2, 3]})
        store, _ = run(df, on_error="drop")
        assert store.client_ids.dtype == np.int64
        np.testing.assert_array_equal(store.client_ids, [1, 2])


# ------------------------------------------------------------------ time formats
class TestTime:
    def frame(self, times):
        n = len(times)
        return pd.DataFrame({"client": [1] * n, "day": times, "mcc": [1] * n, "amount": [1.0] * n})

    def test_day_hms_seconds_by_hand(self):
        times = ["0 00:00:00", "2 03:04:05", "0 10:23:26", "1 00:00:01.5", " 12 23:59:59 "]
        store, _ = run(self.frame(times))
        assert store.encoding.time_format == "day_hms"
        expected = sorted([0.0, 2 * 86400 + 3 * 3600 + 4 * 60 + 5, 10 * 3600 + 23 * 60 + 26, 86401.5, 12 * 86400 + 86399])
        np.testing.assert_array_equal(store.columns[TIME_COLUMN], expected)

    def test_timestamp_strings_and_datetime_column(self, tmp_path):
        times = ["2021-01-01 00:00:10", "2021-01-01", "2021-01-02T00:00:00", "1970-01-01 00:01:00"]
        expected = sorted([1609459210.0, 1609459200.0, 1609545600.0, 60.0])
        df = self.frame(times)
        store, _ = run(df)
        assert store.encoding.time_format == "timestamp"
        np.testing.assert_array_equal(store.columns[TIME_COLUMN], expected)
        df.to_csv(tmp_path / "t.csv", index=False)
        assert_same_store(run(tmp_path / "t.csv")[0], store)
        as_datetime = df.assign(day=pd.to_datetime(df.day, format="ISO8601"))
        assert_same_store(run(as_datetime)[0], store)
        as_datetime.to_parquet(tmp_path / "t.parquet")
        assert_same_store(run(tmp_path / "t.parquet")[0], store)

    def test_timestamp_nanoseconds_timezones_and_dates(self):
        ns = pd.to_datetime(["2021-01-01 00:00:00.000000001", "2021-01-02 00:00:00.000000000"])
        store, _ = run(self.frame(ns))
        np.testing.assert_allclose(store.columns[TIME_COLUMN], [1609459200.0, 1609545600.0])
        moscow = pd.to_datetime(["2021-01-01 03:00:00"]).tz_localize("Europe/Moscow")
        store, _ = run(self.frame(moscow))
        np.testing.assert_array_equal(store.columns[TIME_COLUMN], [1609459200.0])  # 03:00 MSK = 00:00 UTC
        dates = pa.table({"client": [1, 1], "day": pa.array(pd.to_datetime(["2021-01-02", "2021-01-01"]).date), "mcc": [1, 1], "amount": [1.0, 1.0]})
        store, _ = run(dates)
        np.testing.assert_array_equal(store.columns[TIME_COLUMN], [1609459200.0, 1609545600.0])

    def test_number_times(self, tmp_path):
        store, _ = run(self.frame([3, -1.5, 2]))
        assert store.encoding.time_format == "number"
        np.testing.assert_array_equal(store.columns[TIME_COLUMN], [-1.5, 2.0, 3.0])
        self.frame([3, -1.5, 2]).to_csv(tmp_path / "n.csv", index=False)
        assert_same_store(run(tmp_path / "n.csv")[0], store)

    @pytest.mark.parametrize(
        "values, expected",
        [
            (pa.array([1, 2]), "number"),
            (pa.array([1.5, 2.0]), "number"),
            (pa.array(["1", "20"]), "number"),
            (pa.array(["0 10:23:26", "3 00:00:00"]), "day_hms"),
            (pa.array(["2021-01-01", "2021-02-01 10:00"]), "timestamp"),
            (pa.array(pd.to_datetime(["2021-01-01"])), "timestamp"),
            (pa.array([None, "1"], pa.string()), "number"),
        ],
    )
    def test_detect_time_format(self, values, expected):
        assert detect_time_format(values) == expected

    def test_explicit_format_overrides_detection(self):
        schema = EventSchema("client", "day", ["mcc"], ["amount"], time_format="timestamp")
        store, _ = run(self.frame(["2021-01-01"]), schema)
        assert store.encoding.time_format == "timestamp"
        with pytest.raises(SchemaError, match="expected a timestamp"):
            run(self.frame(["0 10:00:00"]), schema)


# ------------------------------------------------------------------ sorting and grouping
def test_sorted_by_time_within_clients_ordered_by_id(make_events):
    df = make_events(n_clients=8, seed=5)
    store, _ = run(df)
    expected_ids = np.sort(df.client.unique())
    np.testing.assert_array_equal(store.client_ids, expected_ids)
    np.testing.assert_array_equal(store.lengths, df.groupby("client").size().loc[expected_ids].to_numpy())
    for i, cid in enumerate(expected_ids):
        a, b = store.offsets[i], store.offsets[i + 1]
        times = store.columns[TIME_COLUMN][a:b]
        assert np.all(np.diff(times) >= 0)
        np.testing.assert_array_equal(times, np.sort(df.loc[df.client == cid, "day"].to_numpy()))
        # the events of the client, not others': the multiset of (time, mcc id) pairs matches
        vocab = store.encoding.categorical["mcc"]
        raw = df.loc[df.client == cid]
        got = sorted(zip(times.tolist(), store.columns["mcc"][a:b].tolist()))
        want = sorted(zip(raw.day.astype(float).tolist(), vocab.encode(raw.mcc).tolist()))
        assert got == want


def test_duplicated_and_unsorted_events_are_kept():
    df = pd.DataFrame({"client": [2, 1, 2, 2, 1], "day": [9, 4, 1, 9, 4], "mcc": [1, 2, 1, 1, 2], "amount": [5.0, 1, 2, 5, 1]})
    store, report = run(df)
    assert report.n_events == 5 and report.dropped == {}
    np.testing.assert_array_equal(store.offsets, [0, 2, 5])
    np.testing.assert_array_equal(store.columns[TIME_COLUMN], [4, 4, 1, 9, 9])
    np.testing.assert_allclose(store.columns["amount"], np.log1p([1, 1, 2, 5, 5]), rtol=1e-6)


def test_chunked_reading_is_identical(make_events):
    df = make_events(n_clients=10, seed=2)
    whole, _ = run(df)
    for rows in (1, 3, 7):
        assert_same_store(run(df, chunk_rows=rows)[0], whole)


# ------------------------------------------------------------------ encoding
class TestEncoding:
    def test_vocab_by_frequency_with_reserved_ids(self):
        mcc = ["x"] * 5 + ["y"] * 3 + ["w"] * 3 + ["z"]
        n = len(mcc)
        df = pd.DataFrame({"client": np.arange(n) % 3, "day": np.arange(n), "mcc": mcc, "amount": [1.0] * n})
        store, _ = run(df)
        vocab = store.encoding.categorical["mcc"]
        assert vocab.values == ["x", "w", "y", "z"]  # ties broken by value
        assert vocab.counts == [5, 3, 3, 1] and vocab.n_rare == 0 and vocab.size == 6
        id_of = {"x": 2, "w": 3, "y": 4, "z": 5}
        order = np.lexsort((df.day, df.client))
        np.testing.assert_array_equal(store.columns["mcc"], [id_of[m] for m in np.asarray(mcc)[order]])
        assert store.columns["mcc"].dtype == np.int32
        assert PAD_ID not in store.columns["mcc"] and UNSEEN_ID not in store.columns["mcc"]

    def test_min_count_and_max_vocab_fold_into_unseen(self):
        mcc = ["x"] * 5 + ["y"] * 3 + ["z"] * 2 + ["q"]
        n = len(mcc)
        df = pd.DataFrame({"client": [1] * n, "day": np.arange(n), "mcc": mcc, "amount": [1.0] * n})
        store, _ = run(df, min_count=3)
        vocab = store.encoding.categorical["mcc"]
        assert vocab.values == ["x", "y"] and vocab.n_rare == 2
        np.testing.assert_array_equal(store.columns["mcc"], [2] * 5 + [3] * 3 + [1] * 3)
        store, _ = run(df, max_vocab=1)
        vocab = store.encoding.categorical["mcc"]
        assert vocab.values == ["x"] and vocab.n_rare == 3 and vocab.size == 3
        np.testing.assert_array_equal(store.columns["mcc"], [2] * 5 + [1] * 6)
        store, _ = run(df, min_count=2, max_vocab=10)
        assert store.encoding.categorical["mcc"].values == ["x", "y", "z"]

    def test_null_categories_map_to_unseen_and_are_counted(self):
        df = pd.DataFrame({"client": [1, 1, 1], "day": [1, 2, 3], "mcc": ["a", None, "a"], "amount": [1.0] * 3})
        store, report = run(df)
        np.testing.assert_array_equal(store.columns["mcc"], [2, UNSEEN_ID, 2])
        assert report.null_categories == {"mcc": 1} and report.dropped == {}
        assert store.encoding.categorical["mcc"].values == ["a"]

    def test_numeric_transforms_by_hand(self):
        x = np.array([-3.0, 0.0, 0.5, 10.0, 250.0])
        df = pd.DataFrame({"client": [1] * 5, "day": np.arange(5), "mcc": [1] * 5, "a": x, "b": x, "c": x, "d": x})
        transforms = {"a": "identity", "b": "log", "c": "standardize", "d": "log_standardize"}
        schema = EventSchema("client", "day", [], list(transforms), numeric_transform=transforms)
        store, _ = run(df, schema)
        log = np.array([-np.log(4.0), 0.0, np.log(1.5), np.log(11.0), np.log(251.0)])
        std_x = (x - x.mean()) / x.std()
        std_log = (log - log.mean()) / log.std()
        for col, want in {"a": x, "b": log, "c": std_x, "d": std_log}.items():
            assert store.columns[col].dtype == np.float32
            np.testing.assert_allclose(store.columns[col], want, rtol=1e-5, atol=1e-6, err_msg=col)
        enc = store.encoding.numeric
        assert enc["c"].mean == pytest.approx(x.mean()) and enc["c"].std == pytest.approx(x.std())
        assert enc["d"].mean == pytest.approx(log.mean()) and enc["d"].std == pytest.approx(log.std())
        assert (enc["a"].mean, enc["a"].std, enc["b"].mean, enc["b"].std) == (0.0, 1.0, 0.0, 1.0)

    def test_constant_column_standardizes_to_zero(self):
        df = pd.DataFrame({"client": [1, 2], "day": [1, 2], "mcc": [1, 1], "amount": [7.0, 7.0]})
        store, _ = run(df, EventSchema("client", "day", [], ["amount"], numeric_transform="standardize"))
        assert store.encoding.numeric["amount"].std == 1.0
        np.testing.assert_array_equal(store.columns["amount"], [0.0, 0.0])

    def test_numeric_transform_apply_matches_prepare(self):
        t = NumericTransform("log_standardize", mean=1.0, std=2.0)
        np.testing.assert_allclose(t.apply([-1.0, 3.0]), (np.array([-np.log(2), np.log(4)]) - 1.0) / 2.0, rtol=1e-6)
        with pytest.raises(ValueError, match="sqrt"):
            NumericTransform("sqrt")
        with pytest.raises(ValueError, match="positive"):
            NumericTransform("standardize", std=0.0)

    @pytest.mark.parametrize("kind", ["identity", "log", "standardize", "log_standardize"])
    def test_numeric_transform_apply_is_the_store_and_inverse_gives_the_raw_numbers_back(self, kind):
        raw = np.array([-1234.5, -1.0, 0.0, 0.25, 3.0, 99_999.0, 5e6])
        df = pd.DataFrame({"client": [1, 1, 2, 2, 2, 3, 3], "day": range(7), "amount": raw})
        store, _ = run(df, EventSchema("client", "day", [], ["amount"], numeric_transform=kind))
        t = store.encoding.numeric["amount"]
        stored = store.columns["amount"]
        np.testing.assert_array_equal(t.apply(raw), stored)  # the very bits prepare stores
        assert t.apply(raw).dtype == np.float32
        # float32 rounding of the stored value only: relative to the value, or to the std near zero
        np.testing.assert_allclose(t.inverse(stored), raw, rtol=1e-5, atol=1e-6 * t.std)
        if kind != "identity":
            assert not np.allclose(stored, raw)  # the round trip went through another scale


def test_reapplying_saved_encoding(tmp_path):
    train = pd.DataFrame(
        {"client": [1, 1, 2, 2, 2], "day": [1, 2, 1, 2, 3], "mcc": ["a", "b", "a", "a", "c"], "amount": [1.0, 10, 100, 5, 0]}
    )
    schema = EventSchema("client", "day", ["mcc"], ["amount"], numeric_transform="log_standardize")
    fitted, _ = run(train, schema, out=tmp_path / "train")
    saved = json.loads((tmp_path / "train" / ENCODING_FILE).read_text())
    enc = Encoding.load(tmp_path / "train" / ENCODING_FILE)
    assert enc.to_dict() == fitted.encoding.to_dict() == saved
    mean, std = enc.numeric["amount"].mean, enc.numeric["amount"].std
    assert std != 1.0 and mean != 0.0

    new = pd.DataFrame({"client": [7, 7, 7, 8], "day": [1, 2, 3, 1], "mcc": ["c", "zzz", "a", None], "amount": [3.0, 1e6, -2, 0]})
    store, _ = run(new, schema, encoding=enc)
    old_id = dict(zip(enc.categorical["mcc"].values, range(2, 10)))
    np.testing.assert_array_equal(store.columns["mcc"], [old_id["c"], UNSEEN_ID, old_id["a"], UNSEEN_ID])
    want = (np.sign(new.amount) * np.log1p(np.abs(new.amount)) - mean) / std
    np.testing.assert_allclose(store.columns["amount"], want, rtol=1e-5)
    # not refitted: the encoding is unchanged, known values keep their ids
    assert store.encoding.to_dict() == saved
    assert store.encoding.time_format == "number"
    np.testing.assert_array_equal(fitted.encoding.categorical["mcc"].encode(["a", "b", "c", "q"]), [2, 3, 4, 1])

    with pytest.raises(SchemaError, match="'fee'"):
        run(new.assign(fee=1.0), EventSchema("client", "day", ["mcc"], ["amount", "fee"]), encoding=enc)


def test_category_vocab_fit_and_encode_any_dtype():
    vocab = CategoryVocab.fit(np.array(["3", "1", "2"]), np.array([1, 5, 5]), min_count=1)
    assert vocab.values == ["1", "2", "3"]
    np.testing.assert_array_equal(vocab.encode(np.array([1, 2, 3, 4])), [2, 3, 4, 1])
    np.testing.assert_array_equal(vocab.encode(np.array([1.0, 2.0])), [2, 3])
    np.testing.assert_array_equal(vocab.encode(np.array(["3", "x"], dtype=object)), [4, 1])


# ------------------------------------------------------------------ exactness at type boundaries
def test_csv_client_ids_never_pass_through_float():
    from ptls_meles.schema import csv_client_ids

    typed = csv_client_ids(pa.array(["3", "12", "NA", ""]))
    assert typed.type == pa.int64() and typed.to_pylist() == [3, 12, None, None]  # null markers in a numeric column
    assert csv_client_ids(pa.array(["1.0", "2.5"])).to_pylist() == [1.0, 2.5]  # exact in float64
    big = ["18446744073709551615", "9223372036854775808", "7"]
    assert csv_client_ids(pa.array(big)).to_pylist() == big  # beyond int64: the text itself
    assert csv_client_ids(pa.array(["1e30", "2"])).to_pylist() == ["1e30", "2"]  # integral beyond 2**53 in float: text
    assert csv_client_ids(pa.array(["u1", "", "NA"])).to_pylist() == ["u1", None, "NA"]  # text: only the empty field is missing


def test_exact_client_ids_for_unsigned_and_decimal():
    from decimal import Decimal

    from ptls_meles.schema import exact_client_ids

    assert exact_client_ids(pa.array([1, 2**63 - 1], pa.uint64())).type == pa.int64()
    assert exact_client_ids(pa.array([1, 2**64 - 1], pa.uint64())).to_pylist() == ["1", str(2**64 - 1)]
    assert exact_client_ids(pa.array([Decimal(5), Decimal(2**70)], pa.decimal128(30, 0))).to_pylist() == ["5", str(2**70)]
    assert exact_client_ids(pa.array(["a"])).to_pylist() == ["a"]


def test_strftime_time_format_and_day_hms_ranges():
    from ptls_meles.schema import parse_time

    p = parse_time(pa.array([960731, 960801, 961301]), "%y%m%d")
    assert p.values[1] - p.values[0] == 86400 and p.bad.tolist() == [False, False, True]
    assert "expected the pattern '%y%m%d', e.g. '960728'" in p.problem and p.example == 961301
    q = parse_time(pa.array(["0 23:59:59.5", "1 24:00:00", "1 00:60:00", "1 00:00:60", "2 00:00:00"]), "day_hms")
    assert q.bad.tolist() == [False, True, True, True, False] and q.values[0] == 86399.5
    z = parse_time(pa.array(["2024-01-01 10:00", "2024-01-01 10:00Z", "2024-01-01 12:00+02:00"]), "timestamp")
    assert z.naive_as_utc == 1 and len(set(z.values)) == 1


def test_numeric_overflow_and_moments():
    from ptls_meles.schema import parse_number

    p = NumericTransform("identity").check_range(parse_number(pa.array([1.0, 1e300, -1e39, 3e38])))
    assert p.bad.tolist() == [False, True, True, False] and "float32" in p.problem_of(1)
    assert not NumericTransform("log").check_range(parse_number(pa.array([1e300]))).bad.any()
    t = NumericTransform("standardize")
    with pytest.raises(ValueError, match="too large"):
        t.fit_moments(1e300, float("inf"), 2)  # no OverflowError from Python float arithmetic
    t.fit_moments(6.0, 20.0, 2)
    assert (t.mean, t.std) == (3.0, 1.0)


def test_encoding_mismatch_names_the_difference():
    a = Encoding("c", "t", "number", {"mcc": CategoryVocab(["1", "2"])}, {"amount": NumericTransform("log")})
    assert a.mismatch(a) is None
    assert "another vocabulary for 'mcc'" in a.mismatch(Encoding("c", "t", "number", {"mcc": CategoryVocab(["2", "1"])}, a.numeric))
    assert "numeric fields [] instead of ['amount']" in a.mismatch(Encoding("c", "t", "number", a.categorical, {}))
    assert "another transform for 'amount'" in a.mismatch(Encoding("c", "t", "number", a.categorical, {"amount": NumericTransform("identity")}))
