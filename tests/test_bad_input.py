"""Bad-input corpus: every entry point (prepare, fit, embed, evaluate; Python API and CLI)
fed malformed data must end in a clear error naming the file/column and the problem, or
in a documented, counted handling — never a raw error from deep inside a library.

Each case is one function registered in ``CASES``; ``test_case`` runs them all and the
last test prints ``bad-input corpus: N cases, N passing``.
"""
from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptls_meles import EventSchema, MeLES, SchemaError
from ptls_meles.cli import main as cli_main
from ptls_meles.config import MeLESConfig
from ptls_meles.downstream.evaluate import EvaluationError, evaluate
from ptls_meles.embed import NonFiniteEmbeddingError
from ptls_meles.encoding import Encoding
from ptls_meles.prepare import prepare
from ptls_meles.store import SequenceStore
from ptls_meles.train import NonFiniteLossError, UnsafeOrCorruptModelError, load_model

SCHEMA = EventSchema("client", "day", ["mcc"], ["amount"], time_format="number")
SMALL = dict(hidden_size=8, cat_embedding_dim=4, batch_size=8, max_epochs=1, num_workers=0, val_fraction=0.0,
             cnt_min=2, cnt_max=10, patience=None, max_events=50, seed=0)
SCHEMA_ARGS = ["--client-col", "client", "--time-col", "day", "--cat", "mcc", "--num", "amount", "--time-format", "number"]

CASES: dict[str, callable] = {}
RESULTS: dict[str, bool] = {}


def case(fn):
    """Register a corpus case under its function name (without the ``case_`` prefix)."""
    CASES[fn.__name__.removeprefix("case_")] = fn
    return fn


def events(n_clients: int = 30, seed: int = 0, ids=None) -> pd.DataFrame:
    """Good raw events: 2–12 events per client, unique times within a client."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 13, n_clients)
    ids = np.arange(n_clients) * 7 + 3 if ids is None else np.asarray(ids, dtype=object)
    client = np.repeat(ids, lengths)
    day = np.concatenate([rng.permutation(40)[:k] for k in lengths]).astype(np.int64)
    return pd.DataFrame({
        "client": client,
        "day": day,
        "mcc": rng.choice([5411, 5812, 6011, 4111], len(client)),
        "amount": np.round(rng.normal(0, 200, len(client)), 2),
    })


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_cli_error(capsys, *argv, names: tuple[str, ...]) -> str:
    """The CLI exits with code 2 and one ``error: ...`` line naming every string in ``names``."""
    rc, _, err = cli(capsys, *argv)
    assert rc == 2, err
    assert err.startswith("error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in err, (name, err)
    return err


@contextmanager
def logged():
    """The messages ptls_meles logs meanwhile (in-process CLI runs log to pytest's handler, not to stderr)."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("ptls_meles").addHandler(handler)
    try:
        yield messages
    finally:
        logging.getLogger("ptls_meles").removeHandler(handler)


class Ctx:
    """Shared, lazily built fixtures of the corpus: a good store and a fitted, saved model."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.events = events()
        self.store, _ = prepare(self.events, SCHEMA, out=root / "store", show_progress=False)
        self.model = MeLES(schema=SCHEMA, **SMALL).fit(self.store, show_progress=False)
        self.model_dir = self.model.save(root / "model")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Ctx:
    return Ctx(tmp_path_factory.mktemp("corpus"))


# =============================================================== prepare: columns and types
@case
def case_prepare_missing_column(ctx, tmp, capsys):
    with pytest.raises(SchemaError, match=r"missing column\(s\) \['mcc'\]"):
        prepare(ctx.events.drop(columns="mcc"), SCHEMA, show_progress=False)
    ctx.events.drop(columns="mcc").to_csv(tmp / "e.csv", index=False)
    assert_cli_error(capsys, "prepare", tmp / "e.csv", "--out", tmp / "s", *SCHEMA_ARGS, "-q", names=("e.csv", "'mcc'"))
    assert not (tmp / "s" / "sequences.parquet").exists()


@case
def case_prepare_renamed_column(ctx, tmp, capsys):
    renamed = ctx.events.rename(columns={"amount": "amt"})
    with pytest.raises(SchemaError, match=r"missing column\(s\) \['amount'\].*'amt'"):
        prepare(renamed, SCHEMA, show_progress=False)
    renamed.to_parquet(tmp / "e.parquet")
    assert_cli_error(capsys, "prepare", tmp / "e.parquet", "--out", tmp / "s", *SCHEMA_ARGS, "-q", names=("e.parquet", "'amount'", "'amt'"))


@case
def case_prepare_text_in_numeric_column(ctx, tmp, capsys):
    bad = ctx.events.astype({"amount": object})
    bad.loc[3, "amount"] = "12,50 EUR"
    with pytest.raises(SchemaError, match=r"column 'amount' has 1 row\(s\) with non-numeric.*'12,50 EUR' at row 3"):
        prepare(bad, SCHEMA, show_progress=False)
    bad.to_csv(tmp / "e.csv", index=False)
    assert_cli_error(capsys, "prepare", tmp / "e.csv", "--out", tmp / "s", *SCHEMA_ARGS, "-q", names=("e.csv", "'amount'", "12,50 EUR"))


@case
def case_prepare_nan_and_inf_numbers_raise_or_are_counted(ctx, tmp, capsys):
    bad = ctx.events.copy()
    bad.loc[[1, 5], "amount"] = [np.nan, np.inf]
    with pytest.raises(SchemaError, match=r"column 'amount' has 2 row\(s\) with null, NaN or infinite value"):
        prepare(bad, SCHEMA, show_progress=False)
    store, report = prepare(bad, SCHEMA, on_error="drop", show_progress=False)
    assert report.dropped == {"bad number (amount)": 2}
    assert report.n_rows_read == len(bad) == store.n_events + 2
    assert np.isfinite(store.columns["amount"]).all()
    bad.to_parquet(tmp / "e.parquet")
    rc, out, err = cli(capsys, "prepare", tmp / "e.parquet", "--out", tmp / "s", *SCHEMA_ARGS, "--on-error", "drop", "-q")
    assert rc == 0, err
    assert "dropped 2 rows (bad number (amount): 2)" in out


@case
def case_prepare_bad_times(ctx, tmp, capsys):
    bad = ctx.events.astype({"day": float})
    bad.loc[4, "day"] = -np.inf
    with pytest.raises(SchemaError, match=r"column 'day' has 1 row\(s\) with unparsable time.*-inf at row 4"):
        prepare(bad, SCHEMA, show_progress=False)
    text = ctx.events.astype({"day": str})
    text.loc[2, "day"] = "yesterday"
    with pytest.raises(SchemaError, match=r"column 'day'.*'yesterday' at row 2"):
        prepare(text, SCHEMA, show_progress=False)


@case
def case_prepare_null_client_ids_raise_or_are_counted(ctx, tmp, capsys):
    bad = ctx.events.astype({"client": object})
    bad.loc[[0, 7, 9], "client"] = None
    with pytest.raises(SchemaError, match=r"column 'client' has 3 row\(s\) with a null client id"):
        prepare(bad, SCHEMA, show_progress=False)
    store, report = prepare(bad, SCHEMA, on_error="drop", show_progress=False)
    assert report.dropped == {"null client id": 3}
    assert store.n_events == len(bad) - 3
    bad.to_csv(tmp / "e.csv", index=False)
    assert_cli_error(capsys, "prepare", tmp / "e.csv", "--out", tmp / "s", *SCHEMA_ARGS, "-q", names=("e.csv", "'client'", "null client id"))


@case
def case_prepare_every_row_bad(ctx, tmp, capsys):
    bad = ctx.events.assign(amount=np.nan)
    with pytest.raises(SchemaError, match=rf"all {len(bad)} rows were dropped as bad.*bad number \(amount\)"):
        prepare(bad, SCHEMA, on_error="drop", show_progress=False)


@case
def case_prepare_nested_values(ctx, tmp, capsys):
    bad = ctx.events.assign(mcc=[[5411, 1]] * len(ctx.events))
    with pytest.raises(SchemaError, match=r"column 'mcc' holds nested values of type list.*\[5411, 1\]"):
        prepare(bad, SCHEMA, show_progress=False)
    bad.to_parquet(tmp / "e.parquet")
    assert_cli_error(capsys, "prepare", tmp / "e.parquet", "--out", tmp / "s", *SCHEMA_ARGS, "-q", names=("e.parquet", "'mcc'", "nested"))
    struct = ctx.events.assign(amount=[{"value": 1.0}] * len(ctx.events))
    with pytest.raises(SchemaError, match=r"column 'amount' holds nested values"):
        prepare(struct, SCHEMA, show_progress=False)


@case
def case_prepare_bytes_ids(ctx, tmp, capsys):
    ok = ctx.events.assign(client=ctx.events["client"].map(lambda c: f"c{c}".encode()))
    store, _ = prepare(ok, SCHEMA, show_progress=False)
    assert store.client_ids[0] == "c10"  # UTF-8 bytes are read as text
    bad = ok.copy()
    bad.loc[2, "client"] = b"\xff\xfe"
    with pytest.raises(SchemaError, match=r"column 'client' holds bytes that are not UTF-8 text, e.g. b'\\xff\\xfe'"):
        prepare(bad, SCHEMA, show_progress=False)


@case
def case_prepare_huge_integers(ctx, tmp, capsys):
    big = ctx.events.assign(amount=np.int64(2**62))
    store, _ = prepare(big, SCHEMA, show_progress=False)
    np.testing.assert_allclose(store.columns["amount"], math.log1p(2.0**62), rtol=1e-6)


@case
def case_prepare_null_categories_are_counted(ctx, tmp, capsys):
    bad = ctx.events.astype({"mcc": object})
    bad.loc[[2, 3], "mcc"] = None
    store, report = prepare(bad, SCHEMA, show_progress=False)
    assert report.null_categories == {"mcc": 2}
    assert (store.columns["mcc"] == 1).sum() == 2  # the unseen id
    assert "null categories → unseen id: {'mcc': 2}" in report.summary()


@case
def case_prepare_number_beyond_float32(ctx, tmp, capsys):
    # 1e300 is finite in float64 but inf in the store's float32: refused or counted, never stored as inf
    big = ctx.events.copy()
    big.loc[6, "amount"] = 1e300
    for transform in ("identity", "standardize"):
        schema = EventSchema("client", "day", ["mcc"], ["amount"], time_format="number", numeric_transform=transform)
        with pytest.raises(SchemaError, match=rf"column 'amount' has 1 row\(s\) with a value beyond the float32 range.*'{transform}'.*1e\+300 at row 6"):
            prepare(big, schema, show_progress=False)
        store, report = prepare(big, schema, on_error="drop", show_progress=False)
        assert report.dropped == {"bad number (amount)": 1} and store.n_events == len(big) - 1
        assert np.isfinite(store.columns["amount"]).all()
    store, _ = prepare(big, EventSchema("client", "day", ["mcc"], ["amount"], time_format="number", numeric_transform="log"), show_progress=False)
    assert np.isfinite(store.columns["amount"]).all()  # log(1e300) = 690.8 fits
    big.to_csv(tmp / "e.csv", index=False)
    assert_cli_error(capsys, "prepare", tmp / "e.csv", "--out", tmp / "s", *SCHEMA_ARGS, "--num-transform", "identity", "-q",
                     names=("e.csv", "'amount'", "float32", "1e+300"))


@case
def case_prepare_day_hms_out_of_range(ctx, tmp, capsys):
    schema = EventSchema("client", "day", ["mcc"], ["amount"], time_format="day_hms")
    raw = ctx.events.assign(day=[f"{d} 10:{d % 60:02d}:26" for d in ctx.events["day"]])
    raw.loc[[3, 8], "day"] = ["12 25:61:00", "12 23:59:99"]  # hour 25, minute 61, second 99
    with pytest.raises(SchemaError, match=r"column 'day' has 2 row\(s\) with unparsable time .*hours 0-23.*'12 25:61:00' at row 3"):
        prepare(raw, schema, show_progress=False)
    store, report = prepare(raw, schema, on_error="drop", show_progress=False)
    assert report.dropped == {"bad time (day)": 2}
    ok = raw.drop(index=[3, 8]).assign(day=["0 23:59:59.5"] * (len(raw) - 2))
    assert prepare(ok, schema, show_progress=False)[0].columns["event_time"].max() == 86399.5


# =============================================================== prepare: files
@case
def case_prepare_empty_inputs(ctx, tmp, capsys):
    with pytest.raises(SchemaError, match=r"no events in the input \(0 rows\)"):
        prepare(ctx.events.iloc[:0], SCHEMA, show_progress=False)
    (tmp / "empty.csv").write_text("")
    with pytest.raises(SchemaError, match=r"empty\.csv: the file is empty"):
        prepare(tmp / "empty.csv", SCHEMA, show_progress=False)
    assert_cli_error(capsys, "prepare", tmp / "empty.csv", "--out", tmp / "s", *SCHEMA_ARGS, "-q", names=("empty.csv", "empty"))
    (tmp / "header.csv").write_text("client,day,mcc,amount\n")
    with pytest.raises(SchemaError, match=r"header\.csv: no events"):
        prepare(tmp / "header.csv", SCHEMA, show_progress=False)
    (tmp / "dir").mkdir()
    with pytest.raises(SchemaError, match=r"holds no \.parquet or \.csv files"):
        prepare(tmp / "dir", SCHEMA, show_progress=False)
    with pytest.raises(FileNotFoundError, match=r"input .*nowhere\.parquet does not exist"):
        prepare(tmp / "nowhere.parquet", SCHEMA, show_progress=False)
    assert_cli_error(capsys, "prepare", tmp / "nowhere.parquet", "--out", tmp / "s", *SCHEMA_ARGS, "-q", names=("nowhere.parquet", "does not exist"))


@case
def case_prepare_corrupt_parquet_among_good_files(ctx, tmp, capsys):
    d = tmp / "parts"
    d.mkdir()
    ctx.events.iloc[:100].to_parquet(d / "part-0.parquet")
    ctx.events.iloc[100:].to_parquet(d / "part-2.parquet")
    good = (d / "part-2.parquet").read_bytes()
    for name, payload in [("garbage", b"PAR1 not really parquet PAR1"), ("empty", b""), ("truncated", good[: len(good) // 2])]:
        (d / "part-1.parquet").write_bytes(payload)
        with pytest.raises(SchemaError, match=r"part-1\.parquet: (not a readable|corrupt) Parquet"):
            prepare(d, SCHEMA, show_progress=False)
        assert_cli_error(capsys, "prepare", d, "--out", tmp / "s", *SCHEMA_ARGS, "-q", names=("part-1.parquet", "Parquet"))
    # hidden and underscore files (e.g. _SUCCESS, .tmp names) are ignored
    (d / "part-1.parquet").unlink()
    (d / "_SUCCESS").write_text("")
    (d / ".part-1.parquet.tmp-123").write_bytes(b"junk")
    store, _ = prepare(d, SCHEMA, show_progress=False)
    assert store.n_events == len(ctx.events)


@case
def case_prepare_unsorted_events_are_sorted(ctx, tmp, capsys):
    sorted_store, _ = prepare(ctx.events.sort_values(["client", "day"]), SCHEMA, show_progress=False)
    shuffled_store, _ = prepare(ctx.events.sample(frac=1.0, random_state=1), SCHEMA, show_progress=False)
    np.testing.assert_array_equal(shuffled_store.client_ids, sorted_store.client_ids)
    np.testing.assert_array_equal(shuffled_store.offsets, sorted_store.offsets)
    for c in sorted_store.columns:
        np.testing.assert_array_equal(shuffled_store.columns[c], sorted_store.columns[c])
    t, o = shuffled_store.columns["event_time"], shuffled_store.offsets
    within = np.ones(len(t) - 1, bool)
    within[o[1:-1] - 1] = False  # pairs that cross a client boundary
    assert (np.diff(t)[within] >= 0).all()


@case
def case_prepare_duplicated_events_are_kept(ctx, tmp, capsys):
    doubled = pd.concat([ctx.events, ctx.events.iloc[:10]], ignore_index=True)
    store, report = prepare(doubled, SCHEMA, show_progress=False)
    assert report.n_events == report.n_rows_read == len(doubled)  # documented: exact duplicates stay events
    assert store.n_events == len(ctx.events) + 10


@case
def case_prepare_applies_encoding_without_a_column_state(ctx, tmp, capsys):
    other = EventSchema("client", "day", ["mcc", "amount"], [], time_format="number")
    with pytest.raises(SchemaError, match=r"the saved encoding has no state for column\(s\) \['amount'\]"):
        prepare(ctx.events, other, encoding=ctx.store.encoding, show_progress=False)


@case
def case_prepare_duplicate_rows_are_counted_or_dropped(ctx, tmp, capsys):
    doubled = pd.concat([ctx.events, ctx.events.iloc[:10]], ignore_index=True).sample(frac=1.0, random_state=2)
    store, report = prepare(doubled, SCHEMA, show_progress=False)
    assert report.duplicate_rows == 10 and store.n_events == len(doubled)
    assert "10 duplicate rows kept" in report.summary()
    dropped, report = prepare(doubled, SCHEMA, drop_duplicates=True, show_progress=False)
    assert report.dropped == {"duplicate row": 10} and report.n_rows_read == report.n_events + 10
    original, _ = prepare(ctx.events, SCHEMA, show_progress=False)
    np.testing.assert_array_equal(dropped.offsets, original.offsets)
    for c in original.columns:
        np.testing.assert_array_equal(dropped.columns[c], original.columns[c])
    doubled.to_csv(tmp / "e.csv", index=False)
    rc, out, err = cli(capsys, "prepare", tmp / "e.csv", "--out", tmp / "s", *SCHEMA_ARGS, "--drop-duplicates", "-q")
    assert rc == 0 and "duplicate row: 10" in out, err


@case
def case_prepare_big_csv_with_utf8_bom(ctx, tmp, capsys):
    many = events(n_clients=3000, seed=4)  # well over 64 KiB, the size where the header was read by hand
    text = many.to_csv(index=False)
    assert len(text) > 1 << 16
    (tmp / "bom.csv").write_text("\ufeff" + text, encoding="utf-8")
    (tmp / "plain.csv").write_text(text, encoding="utf-8")
    with_bom, _ = prepare(tmp / "bom.csv", SCHEMA, show_progress=False)
    plain, _ = prepare(tmp / "plain.csv", SCHEMA, show_progress=False)
    np.testing.assert_array_equal(with_bom.client_ids, plain.client_ids)
    np.testing.assert_array_equal(with_bom.columns["amount"], plain.columns["amount"])


@case
def case_prepare_naive_and_zoned_timestamps(ctx, tmp, capsys):
    raw = ctx.events.assign(day=[f"2024-03-{1 + d % 28:02d} 10:00" for d in ctx.events["day"]])
    raw.loc[[0, 1, 2], "day"] = ["2024-03-01 10:00+02:00", "2024-03-01T08:00Z", "2024-03-02 10:00-0500"]
    schema = EventSchema("client", "day", ["mcc"], ["amount"], time_format="timestamp")
    store, report = prepare(raw, schema, show_progress=False)
    assert report.naive_times_as_utc == len(raw) - 3
    assert f"{len(raw) - 3} timestamps without a time zone read as UTC" in report.summary()
    assert prepare(raw.iloc[3:], schema, show_progress=False)[1].naive_times_as_utc == 0  # all naive: nothing to warn about
    # typed timestamps: a zoned file beside a naive one
    d = tmp / "parts"
    d.mkdir()
    typed = ctx.events.assign(day=pd.Timestamp("2024-03-01") + pd.to_timedelta(ctx.events["day"], unit="D"))
    typed.iloc[:100].assign(day=typed["day"].iloc[:100].dt.tz_localize("Europe/Moscow")).to_parquet(d / "a.parquet")
    typed.iloc[100:].to_parquet(d / "b.parquet")
    assert prepare(d, schema, show_progress=False)[1].naive_times_as_utc == len(typed) - 100


@case
def case_prepare_again_removes_stale_targets(ctx, tmp, capsys):
    ctx.events.to_csv(tmp / "e.csv", index=False)
    pd.DataFrame({"client": [3, 10], "y": [0, 1]}).to_csv(tmp / "t.csv", index=False)
    rc, _, err = cli(capsys, "prepare", tmp / "e.csv", "--out", tmp / "s", *SCHEMA_ARGS, "--targets", tmp / "t.csv", "-q")
    assert rc == 0 and (tmp / "s" / "targets.parquet").exists(), err
    with logged() as messages:
        rc, _, err = cli(capsys, "prepare", tmp / "e.csv", "--out", tmp / "s", *SCHEMA_ARGS, "-q")
    assert rc == 0, err
    assert not (tmp / "s" / "targets.parquet").exists()
    assert any("removed" in m and "targets.parquet" in m for m in messages), messages


@case
def case_prepare_directory_with_non_data_files(ctx, tmp, capsys):
    for fmt in ("parquet", "csv"):
        d = tmp / fmt
        d.mkdir()
        half = len(ctx.events) // 2
        for i, part in enumerate([ctx.events.iloc[:half], ctx.events.iloc[half:]]):
            part.to_parquet(d / f"part-{i}.parquet") if fmt == "parquet" else part.to_csv(d / f"part-{i}.csv", index=False)
        (d / "README.txt").write_text("These are the exported transactions.\nAsk the data team.\n")
        (d / "notes.md").write_text("# notes\n")
        store, _ = prepare(d, SCHEMA, show_progress=False)
        assert store.n_events == len(ctx.events)
        with logged() as messages:
            rc, _, err = cli(capsys, "prepare", d, "--out", tmp / f"s-{fmt}", *SCHEMA_ARGS, "-q")
        assert rc == 0, err
        skipped = [m for m in messages if "skipped 2 other file(s)" in m]
        assert len(skipped) == 1 and "README.txt" in skipped[0] and "notes.md" in skipped[0], messages


# =============================================================== client ids
ODD_IDS = ["😀 client", " leading space", "trailing space ", "x" * 5000, "tab\there", "0042", "", "3.0", "ü-ñ-ß", "None"]


@case
def case_odd_client_ids_round_trip(ctx, tmp, capsys):
    raw = events(n_clients=len(ODD_IDS), ids=ODD_IDS)
    store, _ = prepare(raw, SCHEMA, out=tmp / "s", encoding=ctx.store.encoding, show_progress=False)
    assert sorted(store.client_ids.tolist()) == sorted(ODD_IDS)
    loaded = SequenceStore.load(tmp / "s")
    assert loaded.client_ids.tolist() == store.client_ids.tolist()
    for cid in ODD_IDS:  # every client keeps exactly its own events
        i = loaded.client_ids.tolist().index(cid)
        assert loaded.lengths[i] == (raw["client"] == cid).sum()
    emb = ctx.model.transform(raw)
    assert sorted(emb["client_id"].tolist()) == sorted(ODD_IDS)
    rc, _, err = cli(capsys, "embed", tmp / "s", "--model", ctx.model_dir, "--out", tmp / "emb.parquet", "-q", "--threads", "1")
    assert rc == 0, err
    assert sorted(pd.read_parquet(tmp / "emb.parquet")["client_id"].tolist()) == sorted(ODD_IDS)


@case
def case_ids_number_in_one_file_text_in_another(ctx, tmp, capsys):
    d = tmp / "parts"
    d.mkdir()
    first = ctx.events[ctx.events["client"] < 60]
    second = ctx.events[ctx.events["client"] >= 45]  # clients 45..59 appear in both files
    first.to_parquet(d / "a.parquet")
    second.astype({"client": str}).to_parquet(d / "b.parquet")
    store, report = prepare(d, SCHEMA, show_progress=False)
    both = sorted(set(first["client"]) & set(second["client"]))
    assert report.merged_client_ids == len(both) > 0
    assert f"{len(both)} client ids given both as number and text merged" in report.summary()
    assert store.n_clients == ctx.events["client"].nunique()
    assert store.n_events == len(first) + len(second)
    cid = str(both[0])
    i = store.client_ids.tolist().index(cid)
    assert store.lengths[i] == (first["client"] == both[0]).sum() + (second["client"] == both[0]).sum()
    # mixed Python types inside one column are read as text too
    mixed = ctx.events.astype({"client": object})
    mixed.loc[mixed.index % 2 == 0, "client"] = mixed.loc[mixed.index % 2 == 0, "client"].astype(str)
    store2, _ = prepare(mixed, SCHEMA, show_progress=False)
    assert store2.n_clients == ctx.events["client"].nunique()


BIG_IDS = [2**64 - 1 - 7 * i for i in range(12)] + [2**63 + i for i in range(3)] + [12345678901234567890123]


@case
def case_csv_ids_beyond_int64_stay_exact(ctx, tmp, capsys):
    # 20-digit ids must not pass through float: 16 distinct ids stay 16 clients, written exactly
    raw = events(n_clients=len(BIG_IDS), ids=[str(i) for i in BIG_IDS])
    raw.to_csv(tmp / "e.csv", index=False)
    store, report = prepare(tmp / "e.csv", SCHEMA, show_progress=False)
    assert sorted(store.client_ids.tolist()) == sorted(str(i) for i in BIG_IDS)
    for cid in BIG_IDS:
        assert store.lengths[store.client_ids.tolist().index(str(cid))] == (raw["client"] == str(cid)).sum()
    rc, _, err = cli(capsys, "prepare", tmp / "e.csv", "--out", tmp / "s", *SCHEMA_ARGS, "--encoding", ctx.model_dir / "encoding.json", "-q")
    assert rc == 0, err
    rc, _, err = cli(capsys, "embed", tmp / "s", "--model", ctx.model_dir, "--out", tmp / "emb.parquet", "-q", "--threads", "1")
    assert rc == 0, err
    assert sorted(pd.read_parquet(tmp / "emb.parquet")["client_id"].tolist()) == sorted(str(i) for i in BIG_IDS)
    # ids within int64 stay int64, beyond 2**53 too
    small = events(n_clients=5, ids=[2**62 + i for i in range(5)])
    small.to_csv(tmp / "small.csv", index=False)
    assert prepare(tmp / "small.csv", SCHEMA, show_progress=False)[0].client_ids.tolist() == [2**62 + i for i in range(5)]


@case
def case_parquet_uint64_ids_stay_exact(ctx, tmp, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [i for i in BIG_IDS if i < 2**64] + [5, 6]
    raw = events(n_clients=len(ids), ids=ids)
    table = pa.Table.from_pandas(raw.assign(client=raw["client"].astype(np.uint64)), preserve_index=False)
    assert table.schema.field("client").type == pa.uint64()
    pq.write_table(table, tmp / "e.parquet")
    for chunk_rows in (1_000_000, 7):  # one chunk, and chunks with and without ids beyond int64
        store, _ = prepare(tmp / "e.parquet", SCHEMA, chunk_rows=chunk_rows, show_progress=False)
        assert sorted(store.client_ids.tolist()) == sorted(str(i) for i in ids), chunk_rows
    # uint64 ids within int64 stay integers
    fits = raw[raw["client"].isin([5, 6])]
    pq.write_table(pa.Table.from_pandas(fits.assign(client=fits["client"].astype(np.uint64)), preserve_index=False), tmp / "f.parquet")
    assert prepare(tmp / "f.parquet", SCHEMA, show_progress=False)[0].client_ids.tolist() == [5, 6]


@case
def case_dataframe_ids_mixing_numbers_and_text_are_counted(ctx, tmp, capsys):
    ids = [1, "1", 2.0, "2.0", 3, "3", "a", 4, 5.5]  # 9 raw ids; 1/"1" and 3/"3" are one client each
    raw = events(n_clients=len(ids), ids=ids)
    assert raw["client"].map(type).nunique() == 3  # int, str and float values in one object column
    store, report = prepare(raw, SCHEMA, show_progress=False)
    assert store.n_clients == 7 and report.merged_client_ids == 2
    assert "2 client ids given both as number and text merged" in report.summary()
    assert sorted(store.client_ids.tolist()) == ["1", "2", "2.0", "3", "4", "5.5", "a"]


# =============================================================== fit
@case
def case_fit_and_embed_one_event_clients(ctx, tmp, capsys):
    raw = pd.DataFrame({"client": np.arange(24), "day": np.arange(24), "mcc": np.arange(24) % 3, "amount": np.ones(24)})
    store, _ = prepare(raw, SCHEMA, show_progress=False)
    assert (store.lengths == 1).all()
    model = MeLES(**SMALL).fit(store, show_progress=False)
    emb = model.transform(store).iloc[:, 1:].to_numpy()
    assert emb.shape == (24, model.module_.embedder.output_size) and np.isfinite(emb).all()
    assert np.isfinite(ctx.model.transform(raw).iloc[:, 1:].to_numpy()).all()


@case
def case_fit_too_few_clients(ctx, tmp, capsys):
    with pytest.raises(ValueError, match="at least 2 clients"):
        MeLES(**SMALL).fit(ctx.store.take(np.array([0])), show_progress=False)
    ctx.store.take(np.array([0])).save(tmp / "one")
    assert_cli_error(capsys, "fit", tmp / "one", "--out", tmp / "run", "--set", "num_workers=0", "-q", "--threads", "1",
                     names=("at least 2 clients",))


@case
def case_fit_raw_events_without_schema(ctx, tmp, capsys):
    with pytest.raises(ValueError, match="raw events need a schema"):
        MeLES(**SMALL).fit(ctx.events, show_progress=False)


@case
def case_fit_wrong_setting_types(ctx, tmp, capsys):
    with pytest.raises(ValueError, match=r"setting 'hidden_size' must be int, got 'abc'"):
        MeLESConfig(hidden_size="abc")
    with pytest.raises(ValueError, match=r"setting 'lr' must be float"):
        MeLES(lr=[0.1]).fit(ctx.store, show_progress=False)  # checked when fitting, not in __init__ (scikit-learn)
    assert_cli_error(capsys, "fit", ctx.root / "store", "--out", tmp / "run", "--set", "hidden_size=abc", "-q", "--threads", "1",
                     names=("'hidden_size'", "'abc'"))
    assert_cli_error(capsys, "fit", ctx.root / "store", "--out", tmp / "run", "--set", "hiden_size=8", "-q", "--threads", "1",
                     names=("unknown MeLES setting", "'hiden_size'"))


@case
def case_fit_missing_or_corrupt_store(ctx, tmp, capsys):
    assert_cli_error(capsys, "fit", tmp / "nostore", "--out", tmp / "run", "-q", "--threads", "1", names=("no sequence store", "nostore"))
    (tmp / "bad").mkdir()
    (tmp / "bad" / "sequences.parquet").write_bytes(b"junk")
    (tmp / "bad" / "encoding.json").write_text((ctx.root / "store" / "encoding.json").read_text())
    assert_cli_error(capsys, "fit", tmp / "bad", "--out", tmp / "run", "-q", "--threads", "1", names=("sequences.parquet",))
    assert_cli_error(capsys, "fit", ctx.root / "store", "--out", tmp / "run", "--resume", "-q", "--threads", "1",
                     names=("cannot resume", "last.ckpt"))


@case
def case_enormous_sequence(ctx, tmp, capsys):
    n = 1_000_000
    small = events(n_clients=9, seed=3)
    big = pd.DataFrame({"client": np.full(n, -1), "day": np.arange(n)[::-1], "mcc": np.arange(n) % 4 + 4111, "amount": np.ones(n)})
    raw = pd.concat([big, small], ignore_index=True)
    t0 = time.perf_counter()
    store, report = prepare(raw, SCHEMA, encoding=ctx.store.encoding, show_progress=False)
    assert report.n_events == n + len(small)
    assert store.lengths[0] == n and store.client_ids[0] == -1
    emb = ctx.model.transform(store)  # max_events=50: only the last 50 events are encoded
    alone = store.take(np.array([0]))
    alone.columns = {k: v[-50:] for k, v in alone.columns.items()}
    alone.offsets = np.array([0, 50])
    np.testing.assert_allclose(ctx.model.transform(alone).iloc[0, 1:].to_numpy(float), emb.iloc[0, 1:].to_numpy(float), atol=1e-5)
    MeLES(**{**SMALL, "split": "slices"}).fit(store, show_progress=False)
    assert time.perf_counter() - t0 < 20


SMALL_SETS = [a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]


@case
def case_fit_stops_on_non_finite_loss(ctx, tmp, capsys):
    # a store holding inf (e.g. written by an older version) makes the loss NaN: stop, do not save a NaN model
    cols = dict(ctx.store.columns)
    cols["amount"] = np.full_like(cols["amount"], np.inf)
    store = SequenceStore(ctx.store.client_ids, ctx.store.offsets, cols, ctx.store.encoding)
    with pytest.raises(NonFiniteLossError, match=r"the loss became (nan|inf) at epoch 0"):
        MeLES(**SMALL).fit(store, show_progress=False)
    store.save(tmp / "s")
    assert_cli_error(capsys, "fit", tmp / "s", "--out", tmp / "run", *SMALL_SETS, "-q", "--threads", "1", names=("loss became", "--num-transform"))
    assert not (tmp / "run" / "model").exists()


@case
def case_fit_last_checkpoint_every_epoch(ctx, tmp, capsys):
    # validation recall that never improves after epoch 0: last.ckpt must still follow every epoch
    import ptls_meles.train

    cfg = {**SMALL, "val_fraction": 0.2, "max_epochs": 3}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ptls_meles.train, "recall_at_k", lambda *args: 0.5)
        MeLES(**cfg).fit(ctx.store, out_dir=tmp / "run", show_progress=False)
    last = torch.load(tmp / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2
    assert (tmp / "run" / "checkpoints" / "best.ckpt").exists()


@case
def case_fit_resume_checks_store_and_network(ctx, tmp, capsys):
    MeLES(**SMALL).fit(ctx.store, out_dir=tmp / "run", show_progress=False)
    # same schema and vocabulary size, other values: category ids would mean other categories
    other, _ = prepare(ctx.events.assign(mcc=ctx.events["mcc"] + 1), SCHEMA, out=tmp / "other", show_progress=False)
    assert len(other.encoding.categorical["mcc"].values) == len(ctx.store.encoding.categorical["mcc"].values)
    with pytest.raises(ValueError, match=r"cannot resume from .*last\.ckpt.*another vocabulary for 'mcc'"):
        MeLES(**SMALL).fit(other, out_dir=tmp / "run", resume=True, show_progress=False)
    assert_cli_error(capsys, "fit", tmp / "other", "--out", tmp / "run", "--resume", *SMALL_SETS, "-q", "--threads", "1",
                     names=("last.ckpt", "another vocabulary for 'mcc'"))
    # another schema (no categorical field) and another network size
    no_mcc, _ = prepare(ctx.events, EventSchema("client", "day", [], ["amount"], time_format="number"), out=tmp / "nomcc", show_progress=False)
    assert_cli_error(capsys, "fit", tmp / "nomcc", "--out", tmp / "run", "--resume", *SMALL_SETS, "-q", "--threads", "1",
                     names=("last.ckpt", "categorical fields [] instead of ['mcc']"))
    assert_cli_error(capsys, "fit", ctx.root / "store", "--out", tmp / "run", "--resume", *SMALL_SETS, "--set", "hidden_size=16",
                     "-q", "--threads", "1", names=("last.ckpt", "hidden_size=8 in the checkpoint, 16 now"))
    # the right store and settings resume
    rc, _, err = cli(capsys, "fit", ctx.root / "store", "--out", tmp / "run", "--resume", *SMALL_SETS, "--set", "max_epochs=2",
                     "-q", "--threads", "1")
    assert rc == 0, err


@case
def case_fit_out_is_a_file_or_not_writable(ctx, tmp, capsys):
    (tmp / "run.txt").write_text("not a directory")
    # the output is checked before the store is even read: the missing store is not what fails
    assert_cli_error(capsys, "fit", tmp / "nostore", "--out", tmp / "run.txt", "-q", names=("run.txt", "existing file"))
    assert_cli_error(capsys, "fit", tmp / "nostore", "--out", tmp / "run.txt" / "sub", "-q", names=("run.txt", "is a file"))


# =============================================================== embed
@case
def case_embed_unseen_categories_and_missing_fields(ctx, tmp, capsys):
    new = ctx.events.assign(mcc=9999)  # never seen in training → the unseen id, not an error
    emb = ctx.model.transform(new)
    assert np.isfinite(emb.iloc[:, 1:].to_numpy()).all()
    with pytest.raises(SchemaError, match=r"missing column\(s\) \['mcc'\]"):
        ctx.model.transform(ctx.events.drop(columns="mcc"))
    ctx.events.drop(columns="mcc").to_csv(tmp / "raw.csv", index=False)
    assert_cli_error(capsys, "embed", tmp / "raw.csv", "--model", ctx.model_dir, "--out", tmp / "e.parquet", "-q", "--threads", "1",
                     names=("raw.csv", "'mcc'"))
    # a store prepared without a field the model was trained on
    store, _ = prepare(ctx.events, EventSchema("client", "day", [], ["amount"], time_format="number"), out=tmp / "s", show_progress=False)
    with pytest.raises(ValueError, match=r"the store has no categorical column 'mcc'"):
        ctx.model.transform(store)
    assert_cli_error(capsys, "embed", tmp / "s", "--model", ctx.model_dir, "--out", tmp / "e.parquet", "-q", "--threads", "1", names=("'mcc'",))
    assert not (tmp / "e.parquet").exists()


@case
def case_embed_store_with_another_encoding(ctx, tmp, capsys):
    other = ctx.events.assign(mcc=ctx.events["mcc"] + 1)  # other values: another vocabulary
    store, _ = prepare(other, SCHEMA, out=tmp / "s", show_progress=False)
    with pytest.raises(ValueError, match=r"encoded differently from the model: another vocabulary for 'mcc'.*--encoding"):
        ctx.model.transform(store)
    assert_cli_error(capsys, "embed", tmp / "s", "--model", ctx.model_dir, "--out", tmp / "e.parquet", "-q", "--threads", "1",
                     names=("'mcc'", "another vocabulary"))
    # prepared with the model's encoding, the same events embed fine (new values → unseen id)
    rc, _, err = cli(capsys, "prepare", tmp / "s" / "sequences.parquet", "--out", tmp / "s2", "--client-col", "client_id",
                     "--time-col", "event_time", "-q")
    assert rc == 2 and "nested values" in err  # a store file is not raw events: clear error, not a crash
    other.to_csv(tmp / "raw.csv", index=False)
    rc, out, err = cli(capsys, "prepare", tmp / "raw.csv", "--out", tmp / "s3", *SCHEMA_ARGS, "--encoding", ctx.model_dir / "encoding.json", "-q")
    assert rc == 0, err
    rc, out, err = cli(capsys, "embed", tmp / "s3", "--model", ctx.model_dir, "--out", tmp / "e.parquet", "-q", "--threads", "1")
    assert rc == 0, err
    assert len(pd.read_parquet(tmp / "e.parquet")) == ctx.events["client"].nunique()


@case
def case_embed_without_a_model(ctx, tmp, capsys):
    with pytest.raises(RuntimeError, match="not fitted"):
        MeLES(**SMALL).transform(ctx.store)
    assert_cli_error(capsys, "embed", ctx.root / "store", "--model", tmp / "nomodel", "--out", tmp / "e.parquet", "-q", "--threads", "1",
                     names=("no saved MeLES model", "nomodel"))
    (tmp / "m").mkdir()
    for f in ("config.json", "encoding.json"):
        (tmp / "m" / f).write_text((ctx.model_dir / f).read_text())
    (tmp / "m" / "model.pt").write_bytes(b"not a torch file")
    with pytest.raises(UnsafeOrCorruptModelError, match=r"model\.pt: not a readable model file"):
        MeLES.load(tmp / "m")
    assert_cli_error(capsys, "embed", ctx.root / "store", "--model", tmp / "m", "--out", tmp / "e.parquet", "-q", "--threads", "1",
                     names=("model.pt", "not a readable model file"))


class _WritesMarker:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@case
def case_crafted_pickles_are_refused(ctx, tmp, capsys):
    # the crafted file really runs code when unpickled without weights_only
    probe = tmp / "probe-marker"
    torch.save({"x": _WritesMarker(probe)}, tmp / "probe.pt")
    torch.load(tmp / "probe.pt", weights_only=False)
    assert probe.exists()

    marker = tmp / "marker"
    # a saved model whose weights file carries the payload
    m = tmp / "model"
    m.mkdir()
    for f in ("config.json", "encoding.json"):
        (m / f).write_text((ctx.model_dir / f).read_text())
    state = dict(ctx.model.module_.state_dict())
    state["evil"] = _WritesMarker(marker)
    torch.save(state, m / "model.pt")
    with pytest.raises(UnsafeOrCorruptModelError, match=r"refused to load.*weights_only=True"):
        MeLES.load(m)
    assert_cli_error(capsys, "embed", ctx.root / "store", "--model", m, "--out", tmp / "e.parquet", "-q", "--threads", "1",
                     names=("model.pt", "refused to load"))
    # a training checkpoint, loaded directly and resumed from
    ckpt = {"state_dict": ctx.model.module_.state_dict(), "hyper_parameters": _WritesMarker(marker)}
    (tmp / "run" / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, tmp / "run" / "checkpoints" / "last.ckpt")
    with pytest.raises(UnsafeOrCorruptModelError, match="refused to load"):
        load_model(tmp / "run" / "checkpoints" / "last.ckpt")
    with pytest.raises(UnsafeOrCorruptModelError, match="refused to load"):
        MeLES.load(tmp / "run" / "checkpoints" / "last.ckpt")
    assert_cli_error(capsys, "fit", ctx.root / "store", "--out", tmp / "run", "--resume", "--set", "num_workers=0", "-q", "--threads", "1",
                     names=("last.ckpt", "refused to load"))
    assert not marker.exists()


@case
def case_embed_refuses_non_finite_embeddings(ctx, tmp, capsys):
    broken = MeLES.load(ctx.model_dir)
    with torch.no_grad():
        for param in broken.module_.parameters():
            param.fill_(float("nan"))
    with pytest.raises(NonFiniteEmbeddingError, match=r"NaN or infinite embeddings for \d+ of \d+ clients.*client"):
        broken.transform(ctx.store)
    broken.save(tmp / "nan-model")
    assert_cli_error(capsys, "embed", ctx.root / "store", "--model", tmp / "nan-model", "--out", tmp / "e.parquet", "-q", "--threads", "1",
                     names=("NaN or infinite embeddings", "Nothing was written"))
    assert not (tmp / "e.parquet").exists()


@case
def case_embed_reports_unseen_categories(ctx, tmp, capsys):
    new = ctx.events.copy()
    new.loc[new.index[: len(new) // 4], "mcc"] = 9999  # a quarter of the events: a category the model never saw
    store, report = prepare(new, SCHEMA, encoding=ctx.store.encoding, show_progress=False)
    assert report.unseen_categories == {"mcc": len(new) // 4}
    assert "values unknown to the encoding → unseen id: mcc 2" in report.summary()
    store.save(tmp / "s")
    rc, out, err = cli(capsys, "embed", tmp / "s", "--model", ctx.model_dir, "--out", tmp / "e.parquet", "-q", "--threads", "1")
    assert rc == 0, err
    assert f"mcc {(len(new) // 4) / len(new):.1%}" in out


@case
def case_model_files_truncated_empty_or_corrupt(ctx, tmp, capsys):
    good = (ctx.model_dir / "model.pt").read_bytes()
    for name, payload in [("truncated", good[: len(good) // 2]), ("empty", b""), ("one byte", good[:1])]:
        m = tmp / name.replace(" ", "-")
        m.mkdir()
        for f in ("config.json", "encoding.json"):
            (m / f).write_text((ctx.model_dir / f).read_text())
        (m / "model.pt").write_bytes(payload)
        with pytest.raises(UnsafeOrCorruptModelError, match=r"model\.pt: not a readable model file"):
            MeLES.load(m)
        assert_cli_error(capsys, "embed", ctx.root / "store", "--model", m, "--out", tmp / "e.parquet", "-q", "--threads", "1",
                         names=(str(m / "model.pt"), "not a readable model file"))
    # corrupt JSON state files: the message names the file
    for f, text in [("config.json", '{"hidden_size": 8,'), ("encoding.json", "{not json")]:
        m = tmp / f"bad-{f}"
        m.mkdir()
        for g in ("config.json", "encoding.json", "model.pt"):
            (m / g).write_bytes((ctx.model_dir / g).read_bytes())
        (m / f).write_text(text)
        assert_cli_error(capsys, "embed", ctx.root / "store", "--model", m, "--out", tmp / "e.parquet", "-q", "--threads", "1",
                         names=(str(m / f), "not a valid"))
    (tmp / "s").mkdir()
    (tmp / "s" / "encoding.json").write_text('{"client_col": "client"}')  # valid JSON, not an encoding
    with pytest.raises(ValueError, match=r"encoding\.json: not an encoding file"):
        Encoding.load(tmp / "s" / "encoding.json")
    (tmp / "cfg.json").write_text("[1, 2")
    assert_cli_error(capsys, "fit", ctx.root / "store", "--out", tmp / "run", "--config", tmp / "cfg.json", "-q", names=("cfg.json", "not a valid config"))


@case
def case_output_paths_checked_before_the_work(ctx, tmp, capsys):
    (tmp / "taken.parquet").write_text("a file")
    (tmp / "adir").mkdir()
    # each command is given an input that would fail later: the output problem must be found first
    assert_cli_error(capsys, "prepare", tmp / "nowhere.csv", "--out", tmp / "taken.parquet", *SCHEMA_ARGS, "-q",
                     names=("taken.parquet", "existing file"))
    assert_cli_error(capsys, "embed", tmp / "nostore", "--model", ctx.model_dir, "--out", tmp / "adir", "-q", "--threads", "1",
                     names=("adir", "existing directory"))
    assert_cli_error(capsys, "embed", tmp / "nostore", "--model", ctx.model_dir, "--out", tmp / "taken.parquet" / "e.parquet", "-q",
                     names=("taken.parquet", "is a file"))
    assert_cli_error(capsys, "prepare", tmp / "nowhere.csv", "--out", tmp / "taken.parquet" / "s", *SCHEMA_ARGS, "-q",
                     names=("taken.parquet", "is a file"))
    if os.geteuid() != 0:  # root writes anywhere: the permission case can only be shown as another user
        (tmp / "ro").mkdir(mode=0o500)
        assert_cli_error(capsys, "prepare", tmp / "nowhere.csv", "--out", tmp / "ro" / "s", *SCHEMA_ARGS, "-q", names=("ro", "cannot write"))
    if Path("/proc/self").exists():  # a read-only place even for root
        assert_cli_error(capsys, "prepare", tmp / "nowhere.csv", "--out", "/proc/ptls-meles-test/s", *SCHEMA_ARGS, "-q",
                         names=("/proc/ptls-meles-test/s", "cannot write"))


@case
def case_model_save_is_atomic(ctx, tmp, capsys):
    saved = ctx.model.save(tmp / "m")
    before = (saved / "model.pt").read_bytes()

    def half_then_fail(obj, f, *args, **kwargs):
        Path(f).write_bytes(before[: len(before) // 2])
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "save", half_then_fail)
        with pytest.raises(OSError, match="No space left"):
            ctx.model.save(tmp / "m")
    assert (saved / "model.pt").read_bytes() == before  # the previous model is intact
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "encoding.json", "model.pt", "schema.json"]
    MeLES.load(saved)


# =============================================================== evaluate
def feature_table(n: int = 80, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"client_id": np.arange(n), "f0": rng.normal(size=n), "f1": rng.normal(size=n)})


FAST = {"n_estimators": 5, "num_leaves": 4}


@case
def case_evaluate_clients_absent_from_targets(ctx, tmp, capsys):
    feats = feature_table(80)
    targets = pd.DataFrame({"client_id": np.arange(40, 140), "y": np.arange(100) % 2})
    targets.loc[targets.index[:5], "y"] = np.nan  # 5 unlabelled clients, all with features
    r = evaluate(feats, targets, "y", n_folds=2, test_size=0, lgbm_params=FAST)
    j = r.join
    assert (j.n_targets, j.n_unlabelled, j.n_used) == (100, 5, 35)
    assert j.n_labelled_missing_features == 60  # labelled clients 80..139
    assert j.n_features_without_target == 40  # feature clients 0..39
    feats.to_parquet(tmp / "f.parquet")
    targets.to_csv(tmp / "t.csv", index=False)
    rc, out, err = cli(capsys, "evaluate", "--features", tmp / "f.parquet", "--targets", tmp / "t.csv", "--target-col", "y",
                       "--folds", "2", "--test-size", "0", "--jobs", "1", "--out", tmp / "r.json")
    assert rc == 0, err
    import json

    saved = json.loads((tmp / "r.json").read_text())[0]["join"]
    assert saved["n_used"] == 35 and saved["n_labelled_missing_features"] == 60


@case
def case_evaluate_single_class_and_too_few_labels(ctx, tmp, capsys):
    feats = feature_table(60)
    one = pd.DataFrame({"client_id": np.arange(60), "y": "yes"})
    with pytest.raises(EvaluationError, match=r"target 'y' has a single class 'yes'"):
        evaluate(feats, one, "y", n_folds=2)
    feats.to_parquet(tmp / "f.parquet")
    one.to_csv(tmp / "t.csv", index=False)
    assert_cli_error(capsys, "evaluate", "--features", tmp / "f.parquet", "--targets", tmp / "t.csv", "--target-col", "y", "--folds", "2",
                     names=("'y'", "single class"))
    rare = pd.DataFrame({"client_id": np.arange(60), "y": np.r_[np.ones(2), np.zeros(58)]})
    with pytest.raises(EvaluationError, match=r"class 1\.0 has 2 labelled clients"):
        evaluate(feats, rare, "y", n_folds=5)


@case
def case_evaluate_bad_tables(ctx, tmp, capsys):
    feats = feature_table(60)
    targets = pd.DataFrame({"client_id": np.arange(60), "y": np.arange(60) % 2})
    with pytest.raises(EvaluationError, match=r"target column 'z' is not in the target table"):
        evaluate(feats, targets, "z")
    with pytest.raises(EvaluationError, match=r"feature table 0: column 'client_id' has 2 null ids"):
        evaluate(feats.assign(client_id=feats["client_id"].where(feats["client_id"] > 1)), targets, "y")
    with pytest.raises(EvaluationError, match=r"target table: column 'client_id' has 1 duplicated ids, e.g. 3"):
        evaluate(feats, pd.concat([targets, targets.iloc[[3]]]), "y")
    with pytest.raises(EvaluationError, match=r"feature column 'f1' \(table 0\) is not numeric.*'oops'"):
        evaluate(feats.assign(f1="oops"), targets, "y")
    with pytest.raises(EvaluationError, match=r"cannot join target table on 'client_id'.*int64.*str"):
        evaluate(feats, targets.astype({"client_id": str}), "y")
    with pytest.raises(EvaluationError, match=r"holds the target column 'y'"):
        evaluate(feats.assign(y=1), targets, "y")
    # NaN / inf features are data LightGBM handles (missing values): documented, no error
    nan_feats = feats.assign(f0=np.where(np.arange(60) % 3 == 0, np.nan, feats["f0"]), f1=np.inf)
    r = evaluate(nan_feats, targets, "y", n_folds=2, test_size=0, lgbm_params=FAST)
    assert r.join.n_used == 60 and all(np.isfinite(r.cv_scores))


@case
def case_evaluate_cli_file_problems(ctx, tmp, capsys):
    feature_table(60).to_parquet(tmp / "f.parquet")
    pd.DataFrame({"client_id": np.arange(60), "y": np.arange(60) % 2}).to_csv(tmp / "t.csv", index=False)
    assert_cli_error(capsys, "evaluate", "--features", tmp / "nofeat.parquet", "--targets", tmp / "t.csv", "--target-col", "y",
                     names=("nofeat.parquet",))
    assert_cli_error(capsys, "evaluate", "--features", tmp / "f.parquet", "--targets", tmp / "nott.csv", "--target-col", "y",
                     names=("nott.csv",))
    (tmp / "junk.parquet").write_bytes(b"junk")
    assert_cli_error(capsys, "evaluate", "--features", tmp / "junk.parquet", "--targets", tmp / "t.csv", "--target-col", "y",
                     names=("junk.parquet",))
    assert_cli_error(capsys, "evaluate", "--features", f"handcrafted:{tmp / 'nostore'}", "--targets", tmp / "t.csv", "--target-col", "y",
                     names=("no sequence store", "nostore"))
    columns = {"event_time": np.arange(60, dtype=np.float64), "amount": np.ones(60, np.float32)}
    SequenceStore(np.arange(60), np.arange(61), columns, Encoding("client", "event_time", "number")).save(tmp / "nocat")
    assert_cli_error(capsys, "evaluate", "--features", f"shares:{tmp / 'nocat'}", "--targets", tmp / "t.csv", "--target-col", "y",
                     names=("shares:", "nocat", "no categorical field", "'amount'"))
    pd.read_csv(tmp / "t.csv").rename(columns={"client_id": "cid"}).to_csv(tmp / "t2.csv", index=False)
    assert_cli_error(capsys, "evaluate", "--features", tmp / "f.parquet", "--targets", tmp / "t2.csv", "--target-col", "y",
                     names=("'client_id'", "'cid'"))


@case
def case_evaluate_tiny_folds_warn_and_output_checked_first(ctx, tmp, capsys):
    feats = feature_table(24)
    targets = pd.DataFrame({"client_id": np.arange(24), "y": np.arange(24) % 2})
    with logged() as messages:
        r = evaluate(feats, targets, "y", n_folds=3, test_size=0, lgbm_params=FAST)
    assert r.join.n_used == 24
    assert any("min_child_samples=20" in m and "16 labelled clients" in m for m in messages), messages
    # --out that cannot be written fails before the folds run, and a failed write keeps the old results
    feats.to_parquet(tmp / "f.parquet")
    targets.to_csv(tmp / "t.csv", index=False)
    (tmp / "file").write_text("x")
    assert_cli_error(capsys, "evaluate", "--features", tmp / "f.parquet", "--targets", tmp / "nott.csv", "--target-col", "y",
                     "--out", tmp / "file" / "r.json", names=("file", "is a file"))
    argv = ["evaluate", "--features", tmp / "f.parquet", "--targets", tmp / "t.csv", "--target-col", "y", "--folds", "2", "--test-size", "0",
            "--jobs", "1", "--out", tmp / "r.json"]
    rc, _, err = cli(capsys, *argv)
    assert rc == 0, err
    before = (tmp / "r.json").read_text()
    real_write = Path.write_text

    def half_then_fail(self, data, *args, **kwargs):
        real_write(self, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "write_text", half_then_fail)
        rc, _, err = cli(capsys, *argv)
    assert rc == 2 and err.startswith("error: No space left on device"), err
    assert (tmp / "r.json").read_text() == before


# =============================================================== CLI and time formats
@case
def case_time_format_strftime_pattern(ctx, tmp, capsys):
    # integer YYMMDD dates: 960731 → 960801 is one day, not 70
    raw = pd.DataFrame({"client": [1, 1, 1, 2, 2], "day": [960728, 960731, 960801, 991231, 991201], "mcc": 1, "amount": 1.0})
    schema = EventSchema("client", "day", ["mcc"], ["amount"], time_format="%y%m%d")
    store, _ = prepare(raw, schema, show_progress=False)
    assert np.diff(store.columns["event_time"][:3]).tolist() == [3 * 86400, 86400]
    assert store.columns["event_time"][4] - store.columns["event_time"][3] == 30 * 86400
    text = raw.assign(day=["28.07.1996 10:00", "31.07.1996 10:00", "01.08.1996 10:00", "31.12.1999 10:00", "32.01.2010 10:00"])
    with pytest.raises(SchemaError, match=r"column 'day'.*expected the pattern '%d\.%m\.%Y %H:%M', e\.g\. '28\.07\.1996 10:23'.*'32\.01\.2010 10:00' at row 4"):
        prepare(text, EventSchema("client", "day", ["mcc"], ["amount"], time_format="%d.%m.%Y %H:%M"), show_progress=False)
    raw.to_csv(tmp / "e.csv", index=False)
    rc, out, err = cli(capsys, "prepare", tmp / "e.csv", "--out", tmp / "s", "--client-col", "client", "--time-col", "day", "--cat", "mcc",
                       "--num", "amount", "--time-format", "%y%m%d", "-q")
    assert rc == 0, err
    assert SequenceStore.load(tmp / "s").encoding.time_format == "%y%m%d"
    with pytest.raises(SchemaError, match=r"time_format 'yymmdd' is not one of .* nor a strftime pattern"):
        EventSchema("client", "day", time_format="yymmdd")


@case
def case_cli_every_option_has_help_with_an_example(ctx, tmp, capsys):
    import argparse

    from ptls_meles.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {opt.option_strings or opt.dest}" for name, sp in sub.choices.items() for opt in sp._actions
               if not opt.help or opt.help == argparse.SUPPRESS]
    assert not missing, missing
    with pytest.raises(SystemExit):
        cli_main(["prepare", "--help"])
    text = capsys.readouterr().out
    for expected in ("--client-col COL", "e.g. --client-col", "--time-format", "%y%m%d", "--out DIR", "example:"):
        assert expected in text, expected


# =============================================================== the corpus
@pytest.mark.parametrize("name", list(CASES))
def test_case(name, ctx, tmp_path, capsys):
    RESULTS[name] = False
    CASES[name](ctx, tmp_path, capsys)
    RESULTS[name] = True


# random garbage: a SchemaError naming a schema column, or a prepare whose counts add up
GARBAGE = [None, np.nan, np.inf, -np.inf, "abc", "", "😀", "1e400", [1, 2], {"a": 1}, b"\xff", b"7", 2**70, True, pd.Timestamp("2020-01-01")]


@settings(max_examples=int(os.environ.get("BAD_INPUT_EXAMPLES", "40")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    drop=st.sets(st.sampled_from(SCHEMA.raw_columns), max_size=1),
    cells=st.lists(st.tuples(st.integers(0, 59), st.sampled_from(SCHEMA.raw_columns), st.sampled_from(range(len(GARBAGE)))), max_size=6),
    whole_column=st.none() | st.tuples(st.sampled_from(SCHEMA.raw_columns), st.sampled_from(range(len(GARBAGE)))),
    on_error=st.sampled_from(["raise", "drop"]),
)
def test_random_garbage_gives_a_named_error_or_counted_rows(drop, cells, whole_column, on_error):
    df = events(n_clients=8, seed=5).iloc[:60].copy()
    for row, col, g in cells:
        df[col] = df[col].astype(object)
        df.at[df.index[row % len(df)], col] = GARBAGE[g]
    if whole_column is not None:
        col, g = whole_column
        df[col] = pd.Series([GARBAGE[g]] * len(df), index=df.index, dtype=object)
    df = df.drop(columns=list(drop))
    try:
        store, report = prepare(df, SCHEMA, on_error=on_error, show_progress=False)
    except SchemaError as exc:
        # a column by name, or the client id column by its role ("null client id")
        assert any(f"'{c}'" in str(exc) or f"({c})" in str(exc) for c in SCHEMA.raw_columns) or "null client id" in str(exc), str(exc)
        return
    assert not drop
    assert report.n_rows_read == len(df) == report.n_events + sum(report.dropped.values())
    assert store.n_events == report.n_events and store.offsets[-1] == store.n_events
    assert np.isfinite(store.columns["amount"]).all() and np.isfinite(store.columns["event_time"]).all()
    if on_error == "raise":
        assert not report.dropped


def test_zz_corpus_summary(capsys):
    """Runs last (file order): prints the corpus count; fails if any case that ran failed."""
    passing = sum(RESULTS.values())
    with capsys.disabled():
        print(f"\nbad-input corpus: {len(CASES)} cases, {passing} passing ({len(RESULTS)} run)")
    assert passing == len(RESULTS), [n for n, ok in RESULTS.items() if not ok]
