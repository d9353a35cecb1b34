"""Bad-input corpus: every entry point (prepare, fit, embed, evaluate; Python API and CLI)
fed malformed data must end in a clear error naming the file/column and the problem, or
in a documented, counted handling — never a raw error from deep inside a library.

Each case is one function registered in ``CASES``; ``test_case`` runs them all and the
last test prints ``bad-input corpus: N cases, N passing``.
"""
from __future__ import annotations

import math
import os
import time
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
from ptls_meles.prepare import prepare
from ptls_meles.store import SequenceStore
from ptls_meles.train import UnsafeOrCorruptModelError, load_model

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


# =============================================================== fit
@case
def case_fit_and_embed_one_event_clients(ctx, tmp, capsys):
    raw = pd.DataFrame({"client": np.arange(24), "day": np.arange(24), "mcc": np.arange(24) % 3, "amount": np.ones(24)})
    store, _ = prepare(raw, SCHEMA, show_progress=False)
    assert (store.lengths == 1).all()
    model = MeLES(**SMALL).fit(store, show_progress=False)
    emb = model.transform(store).iloc[:, 1:].to_numpy()
    assert emb.shape == (24, SMALL["hidden_size"]) and np.isfinite(emb).all()
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
    with pytest.raises(ValueError, match=r"column 'mcc' was encoded with another vocabulary.*--encoding"):
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
    pd.read_csv(tmp / "t.csv").rename(columns={"client_id": "cid"}).to_csv(tmp / "t2.csv", index=False)
    assert_cli_error(capsys, "evaluate", "--features", tmp / "f.parquet", "--targets", tmp / "t2.csv", "--target-col", "y",
                     names=("'client_id'", "'cid'"))


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
