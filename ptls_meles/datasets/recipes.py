"""Dataset recipes: raw files of a known format → sequence store + ``targets.parquet``.

Each recipe knows its format's columns and writes into ``out``: the store
(``sequences.parquet``, which carries the schema, and ``encoding.json``) and
``targets.parquet`` (``client_id`` + label columns). Users with the full datasets run
the same recipe on their files; nothing is downloaded.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from ..prepare import PrepareReport, prepare
from ..schema import EventSchema, SchemaError
from ..store import SequenceStore

log = logging.getLogger(__name__)

TARGETS_FILE = "targets.parquet"

AGE_SCHEMA = EventSchema("client_id", "trans_date", ["small_group"], ["amount_rur"], time_format="number")
GENDER_SCHEMA = EventSchema("customer_id", "tr_datetime", ["mcc_code", "tr_type"], ["amount"], time_format="day_hms")
PHYSIONET_SCHEMA = EventSchema("record_id", "minute", ["parameter"], ["value"], time_format="number", numeric_transform="identity")


def _find(raw: Path, *names: str) -> Path:
    for name in names:
        for candidate in (raw / name, raw / f"{name}.gz"):
            if candidate.exists():
                return candidate
    raise FileNotFoundError(f"{raw}: expected one of the files {list(names)}")


def write_targets(targets: pd.DataFrame, out: Path, id_col: str) -> Path:
    """Save a target table keyed by ``client_id`` (renamed from ``id_col``)."""
    if id_col not in targets.columns:
        raise SchemaError(f"target table: missing id column {id_col!r}; it has columns {list(targets.columns)}")
    t = targets.rename(columns={id_col: "client_id"})
    if t["client_id"].isna().any():
        raise SchemaError(f"target table: column {id_col!r} has {int(t['client_id'].isna().sum())} null ids")
    dupes = t["client_id"].duplicated()
    if dupes.any():
        raise SchemaError(f"target table: column {id_col!r} has duplicated ids, e.g. {t['client_id'][dupes].iloc[0]!r}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / TARGETS_FILE
    t.to_parquet(path, index=False)
    return path


def load_targets(store_dir: str | Path) -> pd.DataFrame:
    path = Path(store_dir) / TARGETS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {TARGETS_FILE} in {store_dir}: prepare it with a dataset recipe or --targets")
    return pd.read_parquet(path)


def recipe_age(raw: str | Path, out: str | Path, **prepare_kwargs) -> tuple[SequenceStore, PrepareReport]:
    """Age-group competition: ``transactions_train.csv`` + ``train_target.csv`` (``client_id,bins``)."""
    raw, out = Path(raw), Path(out)
    tx = _find(raw, "transactions_train.csv", "transactions_train.parquet", "sample_transactions.csv")
    target_file = _find(raw, "train_target.csv", "sample_target.csv")
    store, report = prepare(tx, AGE_SCHEMA, out=out, **prepare_kwargs)
    write_targets(pd.read_csv(target_file), out, "client_id")
    return store, report


def recipe_gender(raw: str | Path, out: str | Path, **prepare_kwargs) -> tuple[SequenceStore, PrepareReport]:
    """Gender competition: ``transactions.csv`` (``customer_id,tr_datetime,mcc_code,tr_type,amount,term_id``)
    + ``gender_train.csv`` (``customer_id,gender``)."""
    raw, out = Path(raw), Path(out)
    tx = _find(raw, "transactions.csv", "transactions.parquet")
    store, report = prepare(tx, GENDER_SCHEMA, out=out, **prepare_kwargs)
    write_targets(pd.read_csv(_find(raw, "gender_train.csv")), out, "customer_id")
    return store, report


def recipe_physionet(raw: str | Path, out: str | Path, **prepare_kwargs) -> tuple[SequenceStore, PrepareReport]:
    """PhysioNet 2012 (sets A and B): minutes since admission, parameter, value scaled per parameter;
    targets: in-hospital death, gender, age group and the other static descriptors."""
    from .physionet import read_physionet

    out = Path(out)
    show = prepare_kwargs.get("show_progress", True)
    events, targets = read_physionet(raw, show_progress=show)
    store, report = prepare(events[["record_id", "minute", "parameter", "value"]], PHYSIONET_SCHEMA, out=out, **prepare_kwargs)
    write_targets(targets, out, "record_id")
    return store, report


def recipe_synthetic(
    out: str | Path, n_clients: int = 3000, seed: int = 0, mean_events: float = 300, with_type: bool = False, **prepare_kwargs
) -> tuple[SequenceStore, PrepareReport]:
    """The shipped synthetic banking data, generated (seeded) straight into a store.

    Event time is ``trans_datetime`` in seconds, so events inside a day keep their real
    order (sessions, category transitions) and time gaps are minutes, not whole days.
    The hour of day and the weekday become categorical fields (:func:`synthetic_schema`):
    the time-of-day and weekly habits are then visible both to hand-crafted features
    (counts and amount means per hour) and to the encoders (embedded per event).
    """
    from .synthetic import calendar_fields, generate

    out = Path(out)
    tx, targets = generate(n_clients=n_clients, seed=seed, mean_events=mean_events, with_type=with_type)
    tx = pd.concat([tx, calendar_fields(tx["trans_datetime"])], axis=1)
    schema = synthetic_schema(with_type)
    store, report = prepare(tx, schema, out=out, **prepare_kwargs)
    write_targets(targets, out, "client_id")
    return store, report


def synthetic_schema(with_type: bool = False) -> EventSchema:
    """The synthetic data's schema: time in seconds; category, hour, weekday [, type]; amount."""
    categorical = ["small_group", "hour", "weekday"] + (["trans_type"] if with_type else [])
    return EventSchema("client_id", "trans_datetime", categorical, ["amount_rur"], time_format="number")


RECIPES = {"age": recipe_age, "gender": recipe_gender, "physionet": recipe_physionet, "synthetic": recipe_synthetic}
