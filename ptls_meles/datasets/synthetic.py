"""A seeded synthetic card-transaction generator: the shipped default dataset.

Why it exists: the real benchmark sets (age group, gender) cannot be shipped, yet
every module and the quickstart need data with the same shape and the same kind of
signal. Each client gets persistent habits (category preferences, amount level and
spread per category, weekly rhythm, activity rate). The habits depend *partly* on a
hidden age group and gender and mostly on individual noise, so that

* two slices of one client look alike (self-supervised learning has something to find),
* the labels are spread thinly over many categories and amounts: no single per-client
  aggregate reads them off, while a model on all aggregates does clearly better than chance.

Output follows the Sber age-group competition format: ``client_id``, ``trans_date``
(day 0..729), ``small_group`` (~200 category codes, Zipf-like popularity),
``amount_rur`` (heavy-tailed positive), optionally ``trans_type`` (~50 codes).

Generation is vectorised per chunk of :data:`CHUNK_CLIENTS` clients, each chunk seeded
from ``(seed, chunk_index)``, so memory stays bounded and the same seed always gives
the same rows, whether generated in memory (:func:`generate`) or streamed to disk
(:func:`write`). The chunk size is a fixed constant for that reason.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..io_utils import atomic_path

CHUNK_CLIENTS = 2000
N_DAYS = 730
N_SMALL_GROUPS = 200
N_TRANS_TYPES = 50
N_AGE_GROUPS = 4
MIN_EVENTS, MAX_EVENTS = 50, 1500
GENDER_ONE_SHARE = 0.45

TRANSACTIONS_STEM = "transactions_train"
AGE_TARGET_FILE = "train_target.csv"
GENDER_TARGET_FILE = "gender_target.csv"

# Strength of each effect. Tuned so that no single aggregate predicts the age group
# with accuracy above ~0.35 while LogReg on all aggregates reaches ~0.55 and gender
# AUROC ~0.78 on 3,000 clients (see tests/test_synthetic.py and data/README.md).
_N_LIFESTYLES = 12  # shared, label-free habit prototypes
_LIFESTYLE_SCALE = 1.0
_LIFESTYLE_ALPHA = 0.4  # Dirichlet weight of a client over the prototypes
_AGE_SCALE = 0.12
_GENDER_SCALE = 0.07
_INDIVIDUAL_SCALE = 0.6  # per-client, per-category logit noise
_PREF_CONCENTRATION = 400.0  # Dirichlet concentration around the client's mean preference
_OUTLIER_RATE = 0.003
_MAX_AMOUNT = 1e6


class SyntheticConfigError(ValueError):
    """A generator argument is out of range (the message names it and the bad value)."""


@dataclass(frozen=True)
class _World:
    """Population-level structure shared by all clients of one seed."""

    group_logits: np.ndarray  # [K] log Zipf popularity of each small_group
    lifestyles: np.ndarray  # [J, K] label-free preference prototypes
    age_groups: np.ndarray  # [4, K] age-group preference prototypes
    gender_groups: np.ndarray  # [2, K]
    group_amount: np.ndarray  # [K] typical log amount of a category
    gender_group_amount: np.ndarray  # [2, K]
    age_amount: np.ndarray  # [4] shift of log amount level
    age_length: np.ndarray  # [4] shift of log sequence length
    age_weekday: np.ndarray  # [4, 7] weekday logits
    gender_weekday: np.ndarray  # [2, 7]
    type_given_group: np.ndarray  # [K, T] probabilities
    type_logits: np.ndarray  # [T]
    gender_type: np.ndarray  # [2, T]


def _make_world(seed: int) -> _World:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    k, t = N_SMALL_GROUPS, N_TRANS_TYPES
    # Zipf-like popularity, in a random order of codes so code 0 is not the top one.
    popularity = 1.0 / np.arange(1, k + 1) ** 1.1
    group_logits = np.log(popularity / popularity.sum())[rng.permutation(k)]
    # Age effects change smoothly with age (a trend) plus group-specific parts.
    trend = rng.normal(0.0, 1.0, k)
    ages = np.linspace(-1.0, 1.0, N_AGE_GROUPS)[:, None] * trend + rng.normal(0.0, 0.8, (N_AGE_GROUPS, k))
    gender = rng.normal(0.0, 1.0, k)
    type_popularity = 1.0 / np.arange(1, t + 1) ** 1.2
    type_logits = np.log(type_popularity / type_popularity.sum())
    type_given_group = _softmax(type_logits + rng.normal(0.0, 1.5, (k, t)))
    return _World(
        group_logits=group_logits,
        lifestyles=rng.normal(0.0, _LIFESTYLE_SCALE, (_N_LIFESTYLES, k)),
        age_groups=_AGE_SCALE * ages,
        gender_groups=_GENDER_SCALE * np.stack([gender, -gender]),
        group_amount=rng.normal(0.0, 0.9, k),
        gender_group_amount=np.stack([g := rng.normal(0.0, 0.12, k), -g]),
        age_amount=np.array([-0.10, 0.0, 0.06, 0.02]),
        age_length=np.array([0.08, 0.0, -0.04, -0.06]),
        age_weekday=0.5 * np.array([
            [-0.10, -0.10, -0.05, 0.00, 0.10, 0.20, 0.15],
            [0.00, 0.00, 0.00, 0.00, 0.05, 0.05, 0.00],
            [0.05, 0.05, 0.05, 0.00, 0.00, -0.05, -0.05],
            [0.10, 0.05, 0.05, 0.05, -0.05, -0.10, -0.10],
        ]),
        gender_weekday=np.array([[0.0] * 5 + [0.05, 0.05], [0.0] * 5 + [-0.05, -0.05]]),
        type_given_group=type_given_group,
        type_logits=type_logits,
        gender_type=np.stack([g2 := rng.normal(0.0, 0.3, t), -g2]),
    )


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _sample_rows(probs: np.ndarray, row_of_event: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one column index per event from ``probs[row_of_event]`` without a Python loop.

    Rows' CDFs are shifted by the row number and flattened into one increasing array,
    so a single ``searchsorted`` serves all rows.
    """
    n_rows, width = probs.shape
    cdf = np.cumsum(probs, axis=1)
    cdf /= cdf[:, -1:]
    cdf[:, -1] = 1.0
    flat = (cdf + np.arange(n_rows)[:, None]).ravel()
    u = rng.random(len(row_of_event)) * (1.0 - 1e-9)
    index = np.searchsorted(flat, row_of_event + u, side="right") - row_of_event * width
    return np.minimum(index, width - 1)


@dataclass
class _Clients:
    client_id: np.ndarray
    age: np.ndarray
    gender: np.ndarray
    group_prefs: np.ndarray  # [n, K]
    n_events: np.ndarray
    start_day: np.ndarray
    span_days: np.ndarray
    weekday_prefs: np.ndarray  # [n, 7]
    amount_level: np.ndarray  # [n]
    amount_spread: np.ndarray  # [n]
    group_amount_offset: np.ndarray  # [n, K]
    type_prefs: np.ndarray  # [n, T]


def _make_clients(world: _World, rng: np.random.Generator, n: int, first_id: int, mean_events: float) -> _Clients:
    k = N_SMALL_GROUPS
    age = rng.integers(0, N_AGE_GROUPS, n)
    gender = (rng.random(n) < GENDER_ONE_SHARE).astype(np.int64)

    lifestyle_weights = rng.dirichlet(np.full(_N_LIFESTYLES, _LIFESTYLE_ALPHA), size=n)
    logits = (
        world.group_logits
        + lifestyle_weights @ world.lifestyles
        + world.age_groups[age]
        + world.gender_groups[gender]
        + rng.normal(0.0, _INDIVIDUAL_SCALE, (n, k))
    )
    group_prefs = rng.gamma(_PREF_CONCENTRATION * _softmax(logits))
    group_prefs += 1e-12  # a row of all-zero gammas is impossible in practice; keep division safe
    group_prefs /= group_prefs.sum(axis=1, keepdims=True)

    log_length = np.log(mean_events) + world.age_length[age] + rng.normal(0.0, 0.5, n)
    n_events = np.clip(np.exp(log_length), MIN_EVENTS, MAX_EVENTS).astype(np.int64)
    events_per_day = np.exp(rng.normal(np.log(mean_events / 400.0), 0.6, n))
    span_days = np.clip(n_events / events_per_day, 60, N_DAYS)
    start_day = rng.random(n) * (N_DAYS - span_days)

    weekday_logits = world.age_weekday[age] + world.gender_weekday[gender] + rng.normal(0.0, 0.35, (n, 7))

    # Scale like the competition file (amounts there are rescaled, median ~20).
    amount_level = 3.0 + world.age_amount[age] + rng.normal(0.0, 0.5, n)
    amount_spread = np.exp(rng.normal(np.log(0.8), 0.2, n))
    group_amount_offset = world.gender_group_amount[gender] + rng.normal(0.0, 0.35, (n, k))

    type_logits = world.type_logits + world.gender_type[gender] + rng.normal(0.0, 0.8, (n, N_TRANS_TYPES))
    return _Clients(
        client_id=first_id + np.arange(n, dtype=np.int64),
        age=age,
        gender=gender,
        group_prefs=group_prefs,
        n_events=n_events,
        start_day=start_day,
        span_days=span_days,
        weekday_prefs=_softmax(weekday_logits),
        amount_level=amount_level,
        amount_spread=amount_spread,
        group_amount_offset=group_amount_offset,
        type_prefs=_softmax(type_logits),
    )


def _make_events(world: _World, clients: _Clients, rng: np.random.Generator, with_type: bool) -> pd.DataFrame:
    k = N_SMALL_GROUPS
    owner = np.repeat(np.arange(len(clients.client_id)), clients.n_events)
    n_events = len(owner)
    group = _sample_rows(clients.group_prefs, owner, rng)

    weekday = _sample_rows(clients.weekday_prefs, owner, rng)
    day = clients.start_day[owner] + rng.random(n_events) * clients.span_days[owner]
    day = day.astype(np.int64)
    day = day - day % 7 + weekday
    day[day >= N_DAYS] -= 7

    log_amount = (
        clients.amount_level[owner]
        + world.group_amount[group]
        + clients.group_amount_offset.ravel()[owner * k + group]
        + clients.amount_spread[owner] * rng.standard_normal(n_events)
    )
    outlier = rng.random(n_events) < _OUTLIER_RATE
    log_amount[outlier] += 1.5 + rng.exponential(0.7, int(outlier.sum()))  # rare big purchases
    amount = np.clip(np.round(np.exp(log_amount), 3), 0.001, _MAX_AMOUNT)

    columns = {
        "client_id": clients.client_id[owner],
        "trans_date": day,
        "small_group": group.astype(np.int64),
        "amount_rur": amount,
    }
    if with_type:
        by_group = _sample_rows(world.type_given_group, group, rng)
        by_client = _sample_rows(clients.type_prefs, owner, rng)
        columns["trans_type"] = np.where(rng.random(n_events) < 0.6, by_group, by_client).astype(np.int64)
    order = rng.permutation(n_events)  # files are not sorted: prepare must sort
    return pd.DataFrame({name: values[order] for name, values in columns.items()})


def _csv_options() -> pa_csv.WriteOptions:
    """Plain header (``client_id,...``) like pandas writes; older pyarrow quotes it, still valid CSV."""
    try:
        return pa_csv.WriteOptions(quoting_header="none")
    except TypeError:
        return pa_csv.WriteOptions()


def _check_args(n_clients: int, mean_events: float) -> None:
    if int(n_clients) != n_clients or n_clients < 1:
        raise SyntheticConfigError(f"n_clients must be a positive integer, got {n_clients!r} (example: 3000)")
    if not MIN_EVENTS <= mean_events <= MAX_EVENTS:
        raise SyntheticConfigError(
            f"mean_events must lie in [{MIN_EVENTS}, {MAX_EVENTS}], got {mean_events!r} (example: 300)"
        )


def iter_chunks(
    n_clients: int = 3000, seed: int = 0, mean_events: float = 300, with_type: bool = False
) -> Iterator[tuple[pd.DataFrame, pd.DataFrame]]:
    """Yield ``(transactions, targets)`` for each chunk of up to CHUNK_CLIENTS clients."""
    _check_args(n_clients, mean_events)
    world = _make_world(seed)
    for chunk_index, first in enumerate(range(0, n_clients, CHUNK_CLIENTS)):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 1, chunk_index]))
        n = min(CHUNK_CLIENTS, n_clients - first)
        clients = _make_clients(world, rng, n, first, mean_events)
        events = _make_events(world, clients, rng, with_type)
        targets = pd.DataFrame({"client_id": clients.client_id, "bins": clients.age, "gender": clients.gender})
        yield events, targets


def generate(
    n_clients: int = 3000, seed: int = 0, mean_events: float = 300, with_type: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Generate the whole dataset in memory: ``(transactions, targets)``.

    ``transactions``: client_id, trans_date (0..729), small_group, amount_rur
    [, trans_type]; rows shuffled within each chunk. ``targets``: client_id, bins
    (age group 0..3), gender (0/1). Sequence lengths are lognormal with median
    ``mean_events``, clipped to [50, 1500].
    """
    parts = list(iter_chunks(n_clients, seed, mean_events, with_type))
    events = pd.concat([p[0] for p in parts], ignore_index=True)
    targets = pd.concat([p[1] for p in parts], ignore_index=True)
    return events, targets


def write(
    out_dir: str | os.PathLike,
    n_clients: int = 3000,
    seed: int = 0,
    mean_events: float = 300,
    with_type: bool = False,
    fmt: str = "csv",
) -> dict[str, Path]:
    """Stream the dataset to ``out_dir`` chunk by chunk; return the written paths.

    Files: ``transactions_train.csv`` (or ``.parquet``, one row group per chunk),
    ``train_target.csv`` (client_id,bins), ``gender_target.csv`` (client_id,gender).
    Rows are identical to :func:`generate` with the same arguments.
    """
    if fmt not in ("csv", "parquet"):
        raise SyntheticConfigError(f"fmt must be 'csv' or 'parquet', got {fmt!r}")
    _check_args(n_clients, mean_events)
    out_dir = Path(out_dir)
    paths = {
        "transactions": out_dir / f"{TRANSACTIONS_STEM}.{fmt}",
        "age_target": out_dir / AGE_TARGET_FILE,
        "gender_target": out_dir / GENDER_TARGET_FILE,
    }
    targets = []
    n_chunks = -(-n_clients // CHUNK_CLIENTS)
    chunks = iter_chunks(n_clients, seed, mean_events, with_type)
    with atomic_path(paths["transactions"]) as tmp:
        writer = None
        try:
            for events, chunk_targets in tqdm(chunks, total=n_chunks, desc="synthetic", unit="chunk"):
                table = pa.Table.from_pandas(events, preserve_index=False)
                if writer is None:
                    writer = (
                        pq.ParquetWriter(tmp, table.schema)
                        if fmt == "parquet"
                        else pa_csv.CSVWriter(tmp, table.schema, write_options=_csv_options())
                    )
                if fmt == "parquet":
                    writer.write_table(table, row_group_size=len(table))  # one row group per chunk
                else:
                    writer.write_table(table)
                targets.append(chunk_targets)
        finally:
            if writer is not None:
                writer.close()
    all_targets = pd.concat(targets, ignore_index=True)
    for key, column in (("age_target", "bins"), ("gender_target", "gender")):
        with atomic_path(paths[key]) as tmp:
            all_targets[["client_id", column]].to_csv(tmp, index=False)
    return paths
