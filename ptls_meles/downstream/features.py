"""Hand-crafted per-client aggregates: the MeLES paper's non-learned baseline.

Per client: event count, time span, sum/mean/std/min/max of every numeric field, and,
for the top-K values of every categorical field, the number of events with that value
and the mean/std of the main numeric field over those events. A careful practitioner's
additions, on by default (``detailed``): per category value also the min, max, first and
last value of the main numeric field and the recency of the value (time from its last
event to the client's last event) — on ICU data, e.g., the last lab value and when it
was taken are the standard strong features. Everything is computed
over the store's flat arrays with ``reduceat`` / ``bincount`` (one pass per field, no
Python loop per client or event), so 50k clients × 44M events take well under a minute.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..encoding import N_RESERVED
from ..store import TIME_COLUMN, SequenceStore


class FeatureError(ValueError):
    """Bad arguments for feature building (unknown field, bad top_k)."""


def handcrafted_features(
    store: SequenceStore,
    top_k: int = 50,
    main_numeric: str | None = None,
    raw_numeric: bool = True,
    detailed: bool = True,
    shares: bool = False,
) -> pd.DataFrame:
    """One row per client (column ``client_id`` first, store order) of aggregate features.

    ``top_k`` most frequent values per categorical field (vocab ids ``2..top_k+1``; the
    "unseen/rare" id is not a value of its own). ``main_numeric`` (default: the first
    numeric field) is the one averaged per category value. ``raw_numeric`` undoes the
    store's numeric transform (log / standardize) first, so sums and means are of the
    original amounts as in the paper; pass ``False`` to aggregate the stored values.
    ``detailed=False`` gives the paper's features only (count, mean, std per value).
    ``shares=True`` adds each client's share of events for *every* value of each categorical
    field (not only the top ``k``), the unseen/rare id included: where the mix of many
    values carries the signal, as category mixes often do, the top ``k`` counts miss it.

    Stds are sample stds (ddof=1, as pandas), NaN for fewer than two events; means,
    mins and maxes are NaN for no events. NaN numeric values are ignored.
    """
    if top_k < 0:
        raise FeatureError(f"top_k must be >= 0, got {top_k}")
    numeric = store.numeric
    if main_numeric is None:
        main_numeric = numeric[0] if numeric else None
    elif main_numeric not in numeric:
        raise FeatureError(f"main_numeric {main_numeric!r} is not a numeric field of the store; numeric fields: {numeric}")

    n = store.n_clients
    lengths = store.lengths
    segments = _Segments(store.offsets)
    out: dict[str, np.ndarray] = {"client_id": np.asarray(store.client_ids), "count": lengths.astype(np.int64)}

    if TIME_COLUMN in store.columns:
        t = np.asarray(store.columns[TIME_COLUMN], dtype=np.float64)
        out["time_span"] = segments.reduce(np.fmax, t) - segments.reduce(np.fmin, t)

    values: dict[str, np.ndarray] = {}
    for name in numeric:
        x = _numeric_values(store, name, raw_numeric)
        values[name] = x
        out.update({f"{name}_{k}": v for k, v in _numeric_aggregates(x, segments).items()})

    client_of_event = np.repeat(np.arange(n, dtype=np.int64), lengths)
    main = values.get(main_numeric) if main_numeric is not None else None
    time = np.asarray(store.columns[TIME_COLUMN], dtype=np.float64) if TIME_COLUMN in store.columns else None
    for field, vocab in store.encoding.categorical.items():
        if field not in store.columns:
            continue
        if shares:
            out.update(_value_shares(field, vocab.values, store.columns[field], client_of_event, lengths))
        k = min(top_k, len(vocab.values))
        if k == 0:
            continue
        out.update(_category_aggregates(field, vocab.values[:k], store.columns[field], client_of_event, n, main, main_numeric))
        if detailed:
            out.update(_category_details(field, vocab.values[:k], store.columns[field], client_of_event, n, main, main_numeric, time, segments))

    frame = pd.DataFrame(out, copy=False)
    duplicated = frame.columns[frame.columns.duplicated()]
    if len(duplicated):
        raise FeatureError(f"feature names collide, e.g. {duplicated[0]!r}: rename the field or the category value")
    return frame


def share_features(store: SequenceStore) -> pd.DataFrame:
    """Only the shares of every categorical value (``client_id`` first): the columns that
    ``handcrafted_features(shares=True)`` adds to the plain features, as a yardstick of its own."""
    fields = [field for field in store.encoding.categorical if field in store.columns]
    if not fields:
        raise FeatureError(f"the store has no categorical field, so no value shares; its fields: {sorted(store.columns)} "
                           f"(prepare it with --cat, e.g. --cat mcc)")
    n = store.n_clients
    client_of_event = np.repeat(np.arange(n, dtype=np.int64), store.lengths)
    out: dict[str, np.ndarray] = {"client_id": np.asarray(store.client_ids)}
    for field in fields:
        out.update(_value_shares(field, store.encoding.categorical[field].values, store.columns[field], client_of_event,
                                 store.lengths))
    return pd.DataFrame(out, copy=False)


class _Segments:
    """Per-client reductions over flat arrays; clients without events get NaN."""

    def __init__(self, offsets: np.ndarray) -> None:
        offsets = np.asarray(offsets, dtype=np.int64)
        self.n = len(offsets) - 1
        self.lengths = np.diff(offsets)
        self.nonempty = self.lengths > 0
        self.starts = offsets[:-1][self.nonempty]

    def broadcast(self, per_client: np.ndarray) -> np.ndarray:
        """Repeat each client's value over its events."""
        return np.repeat(per_client, self.lengths)

    def reduce(self, ufunc: np.ufunc, values: np.ndarray) -> np.ndarray:
        result = np.full(self.n, np.nan)
        if len(self.starts):
            result[self.nonempty] = ufunc.reduceat(values, self.starts)
        return result


def _numeric_values(store: SequenceStore, name: str, raw: bool) -> np.ndarray:
    x = np.asarray(store.columns[name], dtype=np.float64)
    return store.encoding.numeric[name].inverse(x) if raw else x


def _numeric_aggregates(x: np.ndarray, segments: _Segments) -> dict[str, np.ndarray]:
    valid = ~np.isnan(x)
    all_valid = bool(valid.all())
    filled = x if all_valid else np.where(valid, x, 0.0)
    n_valid = segments.reduce(np.add, valid.astype(np.float64))
    n_valid = np.nan_to_num(n_valid, nan=0.0)
    total = np.nan_to_num(segments.reduce(np.add, filled), nan=0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n_valid > 0, total / n_valid, np.nan)
        # two-pass variance: no cancellation for large amounts
        dev = filled - segments.broadcast(np.nan_to_num(mean))
        if not all_valid:
            dev[~valid] = 0.0
        np.square(dev, out=dev)
        sq = np.nan_to_num(segments.reduce(np.add, dev), nan=0.0)
        std = np.where(n_valid > 1, np.sqrt(sq / (n_valid - 1)), np.nan)
    return {
        "sum": total,
        "mean": mean,
        "std": std,
        "min": segments.reduce(np.fmin, x),
        "max": segments.reduce(np.fmax, x),
    }


def _top_k_keys(ids: np.ndarray, client_of_event: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Events whose value is one of the top ``k`` (a boolean mask) and their group key
    ``client * k + slot``."""
    ids = np.asarray(ids)
    mask = (ids >= N_RESERVED) & (ids < N_RESERVED + k)
    return mask, client_of_event[mask] * k + (ids[mask].astype(np.int64) - N_RESERVED)


def _value_shares(field: str, value_names: list[str], ids: np.ndarray, client_of_event: np.ndarray,
                  lengths: np.ndarray) -> dict[str, np.ndarray]:
    """Share of each client's events per value (ids ``N_RESERVED..``) and for the rare/unseen
    id (``N_RESERVED - 1``), one bincount over ``client * width + id``; NaN for no events."""
    n, width = len(lengths), N_RESERVED + len(value_names)
    counts = np.bincount(client_of_event * width + np.asarray(ids, dtype=np.int64), minlength=n * width).reshape(n, width)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = counts / lengths[:, None].astype(np.float64)
    out = {f"{field}_{value}_share": share[:, N_RESERVED + j] for j, value in enumerate(value_names)}
    out[f"{field}__rare_share"] = share[:, N_RESERVED - 1]
    return out


def _category_aggregates(
    field: str,
    value_names: list[str],
    ids: np.ndarray,
    client_of_event: np.ndarray,
    n_clients: int,
    main: np.ndarray | None,
    main_name: str | None,
) -> dict[str, np.ndarray]:
    """Count and main-numeric mean/std per (client, top-K value), via bincount on client*K + slot."""
    k = len(value_names)
    mask, key = _top_k_keys(ids, client_of_event, k)
    size = n_clients * k
    counts = np.bincount(key, minlength=size).reshape(n_clients, k)
    result: dict[str, np.ndarray] = {}
    mean = std = None
    if main is not None:
        x = main[mask]
        valid = ~np.isnan(x)
        if not valid.all():
            key, x = key[valid], x[valid]
        n_valid = np.bincount(key, minlength=size).astype(np.float64)
        total = np.bincount(key, weights=x, minlength=size)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_flat = np.where(n_valid > 0, total / n_valid, np.nan)
            dev = x - mean_flat[key]
            sq = np.bincount(key, weights=dev * dev, minlength=size)
            std_flat = np.where(n_valid > 1, np.sqrt(sq / (n_valid - 1)), np.nan)
        mean, std = mean_flat.reshape(n_clients, k), std_flat.reshape(n_clients, k)
    for j, value in enumerate(value_names):
        prefix = f"{field}_{value}"
        result[f"{prefix}_count"] = counts[:, j]
        if mean is not None:
            result[f"{prefix}_{main_name}_mean"] = mean[:, j]
            result[f"{prefix}_{main_name}_std"] = std[:, j]
    return result


def _category_details(
    field: str,
    value_names: list[str],
    ids: np.ndarray,
    client_of_event: np.ndarray,
    n_clients: int,
    main: np.ndarray | None,
    main_name: str | None,
    time: np.ndarray | None,
    segments: _Segments,
) -> dict[str, np.ndarray]:
    """Per (client, top-K value): min / max / first / last of the main numeric field and the
    recency of the value. Events are in time order within a client, so a stable sort by
    ``client * K + slot`` keeps each group's events in time order: first and last are the
    group's ends, min and max one ``reduceat`` each."""
    k = len(value_names)
    event, key = _top_k_keys(ids, client_of_event, k)
    size = n_clients * k
    result: dict[str, np.ndarray] = {}

    def grouped(values: np.ndarray, keys: np.ndarray) -> dict[str, np.ndarray]:
        order = np.argsort(keys, kind="stable")
        keys, values = keys[order], values[order]
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, np.int64)
        ends = np.r_[starts[1:], len(keys)] - 1
        out = {}
        for name, reduced in (
            ("min", np.fmin.reduceat(values, starts) if len(starts) else values[:0]),
            ("max", np.fmax.reduceat(values, starts) if len(starts) else values[:0]),
            ("first", values[starts]),
            ("last", values[ends]),
        ):
            flat = np.full(size, np.nan)
            flat[keys[starts]] = reduced
            out[name] = flat.reshape(n_clients, k)
        return out

    if main is not None:
        x = main[event]
        valid = ~np.isnan(x)
        stats = grouped(x[valid], key[valid])
        for j, value in enumerate(value_names):
            for name, table in stats.items():
                result[f"{field}_{value}_{main_name}_{name}"] = table[:, j]
    if time is not None:
        last_time = grouped(time[event], key)["last"]
        client_end = segments.reduce(np.fmax, time)
        recency = client_end[:, None] - last_time
        for j, value in enumerate(value_names):
            result[f"{field}_{value}_recency"] = recency[:, j]
    return result
