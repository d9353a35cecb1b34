"""Spark engine: ``prepare`` and ``embed`` on Spark (local mode) give the single-machine results.

One SparkSession for the module (``local[2]``, tiny shuffles, tiny file splits so that
one Parquet file is read by several tasks and input order must be reconstructed).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

pytest.importorskip("pyspark")
pytestmark = pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning")
if shutil.which("java") is None:
    pytest.skip("Spark needs Java", allow_module_level=True)

from ptls_meles.encoding import UNSEEN_ID, Encoding  # noqa: E402
from ptls_meles.prepare import prepare  # noqa: E402
from ptls_meles.schema import EventSchema, SchemaError  # noqa: E402
from ptls_meles.store import ENCODING_FILE, STORE_FILE, SequenceStore  # noqa: E402


@pytest.fixture(scope="module")
def spark():
    from ptls_meles.spark import get_session

    session = get_session("local[2]", {"spark.sql.shuffle.partitions": "2", "spark.sql.files.maxPartitionBytes": "4096",
                                       "spark.sql.files.openCostInBytes": "1024"})
    yield session
    session.stop()


def events(n_clients: int = 30, seed: int = 0, text_ids: bool = True) -> pd.DataFrame:
    """Shuffled raw events with many ties in time (days 0..9), text ids whose text order is not
    their numeric order (u10 < u3), int and text categories, signed amounts, quarter-unit fees."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 15, n_clients)
    ids = np.repeat(np.arange(n_clients) * 7 + 3, lengths)
    n = len(ids)
    df = pd.DataFrame({
        "client": np.char.add("u", ids.astype(str)).astype(object) if text_ids else ids,
        "day": rng.integers(0, 10, n),
        "mcc": rng.choice([5411, 5812, 6011, 4111], n, p=[0.4, 0.3, 0.2, 0.1]),
        "kind": rng.choice(list("abcde"), n),
        "amount": np.round(rng.normal(0, 200, n), 2),
        "fee": rng.integers(-8, 8, n) * 0.25,  # sums of these are exact in float64: moments agree to the bit
    })
    return df.sample(frac=1.0, random_state=seed).reset_index(drop=True)


SCHEMA = EventSchema("client", "day", ["mcc", "kind"], ["amount", "fee"], time_format="number",
                     numeric_transform={"amount": "log", "fee": "standardize"})


def assert_same_store(spark_dir, local_dir, exact_json: bool = True) -> SequenceStore:
    a, b = SequenceStore.load(spark_dir), SequenceStore.load(local_dir)
    assert a.client_ids.dtype == b.client_ids.dtype
    np.testing.assert_array_equal(a.client_ids, b.client_ids)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    assert list(a.columns) == list(b.columns)
    for name in b.columns:
        assert a.columns[name].dtype == b.columns[name].dtype, name
        np.testing.assert_array_equal(a.columns[name], b.columns[name], err_msg=name)
    assert a.meta == b.meta
    embedded = json.loads(pq.read_schema(spark_dir / STORE_FILE).metadata[b"ptls_meles_encoding"])
    assert embedded == json.loads((spark_dir / ENCODING_FILE).read_text())  # the encoding travels inside the file too
    assert pq.read_schema(spark_dir / STORE_FILE).remove_metadata() == pq.read_schema(local_dir / STORE_FILE).remove_metadata()
    ja, jb = (json.loads((d / ENCODING_FILE).read_text()) for d in (spark_dir, local_dir))
    if exact_json:
        assert (spark_dir / ENCODING_FILE).read_text() == (local_dir / ENCODING_FILE).read_text()
    else:  # standardize moments: the same sums added in another order
        for c, tr in jb["numeric"].items():
            for k in ("mean", "std"):
                assert ja["numeric"][c][k] == pytest.approx(tr[k], rel=1e-12, abs=1e-15)
                ja["numeric"][c][k] = tr[k]
        assert ja == jb
    return a


def test_parquet_directory_same_store_and_encoding(spark, tmp_path):
    from ptls_meles.spark import prepare_spark

    df = events()
    assert df.duplicated(["client", "day"]).any()  # ties in time: input order decides
    # two files whose path order ("x/…" before "x-1/…") differs from their string order
    raw = tmp_path / "raw"
    (raw / "x").mkdir(parents=True)
    (raw / "x-1").mkdir()
    half = len(df) // 2
    df.iloc[:half].to_parquet(raw / "x" / "y 1.parquet", row_group_size=40)
    df.iloc[half:].to_parquet(raw / "x-1" / "y.parquet", row_group_size=40)

    report = prepare_spark(raw, SCHEMA, tmp_path / "spark", spark=spark)
    _, local_report = prepare(raw, SCHEMA, out=tmp_path / "local", show_progress=False)
    store = assert_same_store(tmp_path / "spark", tmp_path / "local")
    assert (report.n_clients, report.n_events, report.n_rows_read) == (local_report.n_clients, local_report.n_events, len(df))
    assert store.client_ids[:3].tolist() == ["u10", "u101", "u108"]  # text order

    # frequency order, ties by value text (hand-counted from the input)
    kinds = df["kind"].value_counts()
    expected = sorted(kinds.index, key=lambda v: (-kinds[v], v))
    assert store.encoding.categorical["kind"].values == expected
    fee = df["fee"].to_numpy()
    assert store.encoding.numeric["fee"].mean == fee.mean()

    # the saved encoding re-applied to new events: unseen values → the reserved id, on both paths
    new = events(12, seed=5, text_ids=False)
    new.loc[::4, "mcc"] = 9999
    new.loc[1::5, "kind"] = "zz"
    new.to_parquet(tmp_path / "new.parquet")
    encoding = Encoding.load(tmp_path / "spark" / ENCODING_FILE)
    prepare_spark(tmp_path / "new.parquet", SCHEMA, tmp_path / "spark_new", encoding=encoding, spark=spark)
    prepare(tmp_path / "new.parquet", SCHEMA, out=tmp_path / "local_new", encoding=encoding, show_progress=False)
    applied = assert_same_store(tmp_path / "spark_new", tmp_path / "local_new")
    assert applied.client_ids.dtype == np.int64 and applied.client_ids.tolist() == sorted(new["client"].unique())
    assert (applied.columns["mcc"] == UNSEEN_ID).sum() == (new["mcc"] == 9999).sum()
    assert (applied.columns["kind"] == UNSEEN_ID).sum() == (new["kind"] == "zz").sum()
    assert applied.encoding.to_dict() == encoding.to_dict()


def test_csv_with_bad_rows_dropped_same_store_and_report(spark, tmp_path):
    from ptls_meles.spark import prepare_spark

    df = events(25, seed=1, text_ids=False).astype({"amount": object, "day": object, "kind": object})
    df["day"] = [f"{d} {h:02d}:{m:02d}:00" for d, h, m in zip(df["day"], df.index % 3, df.index % 2)]  # ties remain
    df.loc[3, "day"] = "yesterday"
    df.loc[[5, 9], "amount"] = ["abc", ""]
    df.loc[11, "kind"] = ""
    df.loc[13, "kind"] = None
    df.to_csv(tmp_path / "events.csv", index=False)
    schema = EventSchema("client", "day", ["mcc", "kind"], ["amount"], numeric_transform="log_standardize")

    report = prepare_spark(tmp_path / "events.csv", schema, tmp_path / "spark", on_error="drop", spark=spark)
    _, local_report = prepare(tmp_path / "events.csv", schema, out=tmp_path / "local", on_error="drop", show_progress=False)
    store = assert_same_store(tmp_path / "spark", tmp_path / "local", exact_json=False)
    assert dict(report.dropped) == dict(local_report.dropped) == {"bad time (day)": 1, "bad number (amount)": 2}
    assert report.n_events == local_report.n_events == len(df) - 3
    assert store.encoding.time_format == "day_hms"
    assert store.client_ids.dtype == np.int64


def test_timestamps_float_ids_and_odd_category_types_same_store(spark, tmp_path):
    """Typed inputs: naive timestamps (read as UTC), integral float ids (→ int64), float and
    bool categories (float keys 5.0 → "5", NaN → null → unseen id)."""
    from ptls_meles.spark import prepare_spark

    df = events(15, seed=6, text_ids=False)
    df["client"] = df["client"].astype("float64")
    df["day"] = pd.Timestamp("2024-03-01 12:00") + pd.to_timedelta(df["day"] * 3600, unit="s")
    df["mcc"] = df["mcc"].astype("float64") / np.where(np.arange(len(df)) % 5 == 0, 2, 1)  # some non-integral
    df.loc[::7, "mcc"] = np.nan
    df["kind"] = df["kind"] < "c"
    schema = EventSchema("client", "day", ["mcc", "kind"], ["amount"])  # time format detected: timestamp
    report = prepare_spark(df, schema, tmp_path / "spark", spark=spark)
    _, local = prepare(df, schema, out=tmp_path / "local", show_progress=False)
    store = assert_same_store(tmp_path / "spark", tmp_path / "local")
    assert dict(report.null_categories) == dict(local.null_categories) == {"mcc": int(df["mcc"].isna().sum())}
    assert store.encoding.time_format == "timestamp" and store.client_ids.dtype == np.int64
    assert store.columns["event_time"].min() == pd.Timestamp("2024-03-01 12:00", tz="UTC").timestamp()


def test_exact_ids_mixed_ids_and_overflow_same_as_single_machine(spark, tmp_path):
    """The exactness rules are shared: ids beyond int64 (20-digit CSV text, Parquet uint64)
    stay exact text, pandas ids mixing 1 and "1" are merged and counted, and a number that
    overflows float32 or a "d hh:mm:ss" out of range gives the local error text."""
    import pyarrow as pa

    from ptls_meles.spark import prepare_spark

    ids = [2**64 - 1 - 7 * i for i in range(6)] + [5, 6]
    df = events(len(ids), seed=3, text_ids=False)
    df["client"] = df["client"].map(dict(zip(sorted(df["client"].unique()), ids))).astype(np.uint64)
    df.to_csv(tmp_path / "big.csv", index=False)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "big.parquet")
    for name in ("big.csv", "big.parquet"):
        prepare_spark(tmp_path / name, SCHEMA, tmp_path / f"spark-{name}", spark=spark)
        prepare(tmp_path / name, SCHEMA, out=tmp_path / f"local-{name}", show_progress=False)
        store = assert_same_store(tmp_path / f"spark-{name}", tmp_path / f"local-{name}", exact_json=False)
        assert sorted(store.client_ids.tolist()) == sorted(str(i) for i in ids), name

    mixed = events(6, seed=4, text_ids=False).astype({"client": object})
    mixed.loc[mixed.index % 2 == 0, "client"] = mixed.loc[mixed.index % 2 == 0, "client"].astype(str)
    report = prepare_spark(mixed, SCHEMA, tmp_path / "spark-mixed", spark=spark)
    _, local = prepare(mixed, SCHEMA, out=tmp_path / "local-mixed", show_progress=False)
    assert_same_store(tmp_path / "spark-mixed", tmp_path / "local-mixed", exact_json=False)
    assert report.merged_client_ids == local.merged_client_ids == 6

    big = events(8, seed=2, text_ids=False)
    big.loc[5, "amount"] = 1e300
    schema = EventSchema("client", "day", ["mcc"], ["amount"], time_format="number", numeric_transform="identity")
    local_error = _error(lambda: prepare(big, schema, out=tmp_path / "l1", show_progress=False))
    assert "beyond the float32 range" in local_error
    assert _error(lambda: prepare_spark(big, schema, tmp_path / "s1", spark=spark)) == local_error
    hms = big.assign(amount=1.0, day=[f"{d} 10:00:00" for d in big["day"]])
    hms.loc[3, "day"] = "2 23:59:61"
    schema = EventSchema("client", "day", ["mcc"], ["amount"], time_format="day_hms")
    local_error = _error(lambda: prepare(hms, schema, out=tmp_path / "l2", show_progress=False))
    assert "hours 0-23" in local_error and "'2 23:59:61' at row 3" in local_error
    assert _error(lambda: prepare_spark(hms, schema, tmp_path / "s2", spark=spark)) == local_error


def _error(fn) -> str:
    with pytest.raises(SchemaError) as e:
        fn()
    return str(e.value)


@pytest.mark.parametrize("case", ["null_id", "nan_number", "text_number_csv", "bad_time_csv", "missing_column"])
def test_same_error_messages(spark, tmp_path, case):
    from ptls_meles.spark import prepare_spark

    df = events(8, seed=2, text_ids=False)
    source, schema = df, SCHEMA
    if case == "null_id":
        source = df.astype({"client": "float64"})
        source.loc[[6, 2], "client"] = np.nan
    elif case == "nan_number":
        df.loc[[4, 7], "amount"] = [np.inf, np.nan]
        source = tmp_path / "e.parquet"
        df.to_parquet(source)
    elif case in ("text_number_csv", "bad_time_csv"):
        df = df.astype(object)
        df.loc[[6, 3], "amount" if case == "text_number_csv" else "day"] = ["1,5", "n/a"]
        source = tmp_path / "e.csv"
        df.to_csv(source, index=False)
    else:
        source = tmp_path / "e.parquet"
        df.rename(columns={"fee": "fees"}).to_parquet(source)
    local = _error(lambda: prepare(source, schema, out=tmp_path / "local", show_progress=False))
    remote = _error(lambda: prepare_spark(source, schema, tmp_path / "spark", spark=spark))
    assert remote == local
    assert ("row 2" in local) if case == "null_id" else True
    assert not (tmp_path / "spark" / STORE_FILE).exists()


def test_csv_files_with_different_delimiters_are_refused_not_misread(spark, tmp_path):
    from ptls_meles.spark import prepare_spark

    df = events(6, seed=4, text_ids=False)
    (tmp_path / "in").mkdir()
    df.iloc[:20].to_csv(tmp_path / "in" / "a.csv", index=False)
    df.iloc[20:].to_csv(tmp_path / "in" / "b.csv", index=False, sep=";")
    _, local = prepare(tmp_path / "in", SCHEMA, show_progress=False)  # the local engine reads each file with its own
    assert local.n_rows_read == len(df)
    with pytest.raises(SchemaError, match=r"different delimiters .*a\.csv ','.*b\.csv ';'"):
        prepare_spark(tmp_path / "in", SCHEMA, tmp_path / "spark", spark=spark)


def test_embed_matches_single_machine(spark, tmp_path):
    import torch

    from ptls_meles.api import MeLES
    from ptls_meles.config import MeLESConfig
    from ptls_meles.embed import embed_frame
    from ptls_meles.spark import embed_spark
    from ptls_meles.train import MeLESModule

    schema = EventSchema("client", "day", ["mcc", "kind"], ["amount"], time_format="number")
    store, _ = prepare(events(50, seed=3), schema, out=tmp_path / "store", show_progress=False)
    config = MeLESConfig(hidden_size=12, pooling="last", category_pooling=0, cat_embedding_dim=3, max_events=9, embed_batch_size=7)
    torch.manual_seed(0)
    model = MeLES(**config.to_dict())
    model.module_, model.encoding_, model.schema_ = MeLESModule(config.to_dict(), store.encoding.to_dict()), store.encoding, schema
    model.module_.eval()

    stats = embed_spark(tmp_path / "store", model, tmp_path / "spark.parquet", spark=spark, partitions=3)
    model.write_embeddings(store, tmp_path / "local.parquet", show_progress=False)
    remote = pd.read_parquet(tmp_path / "spark.parquet")
    local = embed_frame(model.module_.embedder, store, max_events=9, batch_size=7, show_progress=False)
    assert stats["clients"] == store.n_clients and stats["dim"] == 12
    assert remote["client_id"].tolist() == store.client_ids.tolist()  # store order
    np.testing.assert_allclose(remote.iloc[:, 1:].to_numpy(), local.iloc[:, 1:].to_numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(local.iloc[:, 1:].to_numpy()).max() > 1e-3  # not trivially zero
    # the same table format as the single-machine writer: columns, types, metadata
    a, b = pq.read_schema(tmp_path / "spark.parquet"), pq.read_schema(tmp_path / "local.parquet")
    assert a.remove_metadata() == b.remove_metadata()
    assert json.loads(a.metadata[b"ptls_meles"]) == json.loads(b.metadata[b"ptls_meles"])
    # an explicit window overrides the model's (9): each client's last 4 events
    embed_spark(tmp_path / "store", model, tmp_path / "last4.parquet", spark=spark, max_events=4)
    last4 = embed_frame(model.module_.embedder, store, max_events=4, show_progress=False)
    assert store.lengths.max() > 9 and not np.allclose(last4.iloc[:, 1:].to_numpy(), local.iloc[:, 1:].to_numpy())
    np.testing.assert_allclose(pd.read_parquet(tmp_path / "last4.parquet").iloc[:, 1:].to_numpy(), last4.iloc[:, 1:].to_numpy(),
                               rtol=1e-5, atol=1e-6)


def test_cli_engine_spark(spark, tmp_path):
    """``prepare`` and ``embed`` with ``--engine spark`` (the session of this module is reused)."""
    from ptls_meles.cli import main

    events(20, seed=4).to_parquet(tmp_path / "raw.parquet")
    common = ["--engine", "spark", "--spark-master", "local[2]", "--spark-conf", "spark.sql.shuffle.partitions=2"]
    assert main(["prepare", str(tmp_path / "raw.parquet"), "--out", str(tmp_path / "store"), "--client-col", "client",
                 "--time-col", "day", "--cat", "mcc,kind", "--num", "amount", "-q", *common]) == 0
    _, local = prepare(tmp_path / "raw.parquet", EventSchema("client", "day", ["mcc", "kind"], ["amount"]), out=tmp_path / "local",
                       show_progress=False)
    assert_same_store(tmp_path / "store", tmp_path / "local")
    assert SequenceStore.load(tmp_path / "store").meta["schema"]["client_col"] == "client"  # the one copy of the schema
    assert main(["prepare", str(tmp_path / "raw.parquet"), "--out", str(tmp_path / "bad"), "--client-col", "nope",
                 "--time-col", "day", "-q", *common]) == 2
