"""``prepare``: raw events → validated, encoded, time-sorted sequence store.

One streaming pass over the input: each chunk is validated, its categorical values and
client ids are dictionary-encoded against growing global dictionaries (so only
per-chunk *unique* values touch Python), numbers are transformed; then one global
sort by (client, time) builds the flat arrays and offsets of the store.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from .encoding import UNSEEN_ID, CategoryVocab, Encoding, as_category_strings
from .prepare_rules import (
    NULL_CLIENT_PROBLEM, all_dropped_error, bad_rows_error, check_arguments, drop_reasons, no_rows_error, numeric_transforms,
)
from .schema import (
    EventSchema, check_column_types, detect_time_format, exact_client_ids, parse_number, parse_time, unify_id_types,
)
from .sources import Source, count_rows, iter_chunks
from .store import TIME_COLUMN, SequenceStore, offsets_from_lengths

log = logging.getLogger(__name__)


@dataclass
class PrepareReport:
    """What prepare did, for the one-line summary and for tests."""

    n_clients: int = 0
    n_events: int = 0
    n_rows_read: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason → rows
    null_categories: Counter = field(default_factory=Counter)  # column → nulls mapped to the unseen id
    merged_client_ids: int = 0  # ids read as a number in one place and as text in another (3 and "3"): one client
    duplicate_rows: int = 0  # rows equal to an earlier row in every column (kept unless drop_duplicates)
    naive_times_as_utc: int = 0  # timestamps without a time zone, in a column where others have one
    unseen_categories: Counter = field(default_factory=Counter)  # column → events whose value the applied encoding does not know
    seconds: float = 0.0
    phases: dict = field(default_factory=dict)  # phase -> seconds, where the engine times its phases (Spark)

    @property
    def events_per_second(self) -> float:
        return self.n_rows_read / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        dropped = sum(self.dropped.values())
        detail = f" ({', '.join(f'{k}: {v}' for k, v in self.dropped.items())})" if dropped else ""
        nulls = f", null categories → unseen id: {dict(self.null_categories)}" if self.null_categories else ""
        if self.merged_client_ids:
            nulls += f", {self.merged_client_ids:,} client ids given both as number and text merged"
        if self.duplicate_rows and "duplicate row" not in self.dropped:
            nulls += f", {self.duplicate_rows:,} duplicate rows kept (drop them with --drop-duplicates)"
        if self.naive_times_as_utc:
            nulls += f", {self.naive_times_as_utc:,} timestamps without a time zone read as UTC beside ones with a zone"
        if self.unseen_categories and self.n_events:
            shares = ", ".join(f"{c} {n / self.n_events:.1%}" for c, n in self.unseen_categories.items())
            nulls += f", values unknown to the encoding → unseen id: {shares} of events"
        return (
            f"prepared {self.n_clients:,} clients, {self.n_events:,} events; dropped {dropped:,} rows{detail}{nulls}; "
            f"{self.seconds:.1f} s ({self.events_per_second:,.0f} events/s)"
        )


class _GrowingDictionary:
    """Maps values to stable integer codes across chunks; only unique values touch Python."""

    def __init__(self) -> None:
        self.index = pd.Index([], dtype=object)
        self.counts = np.zeros(0, dtype=np.int64)

    def codes(self, uniques: np.ndarray) -> np.ndarray:
        pos = self.index.get_indexer(uniques)
        new = pos < 0
        if new.any():
            fresh = pd.Index(uniques[new]).unique()
            self.index = self.index.append(fresh)
            self.counts = np.concatenate([self.counts, np.zeros(len(fresh), np.int64)])
            pos = self.index.get_indexer(uniques)
        return pos.astype(np.int64)

    def encode(self, arr: pa.Array, canon=None) -> np.ndarray:
        """Codes for every row of ``arr`` (nulls → -1), counting occurrences."""
        enc = pc.dictionary_encode(arr)
        if isinstance(enc, pa.ChunkedArray):
            enc = enc.combine_chunks()
        dictionary = enc.dictionary.to_numpy(zero_copy_only=False)
        if canon is not None:
            dictionary = canon(dictionary)
        local = self.codes(np.asarray(dictionary, dtype=object)) if len(dictionary) else np.zeros(0, np.int64)
        idx = enc.indices.to_numpy(zero_copy_only=False)
        if enc.indices.null_count:
            idx = np.where(pc.is_null(enc.indices).to_numpy(zero_copy_only=False), -1, np.nan_to_num(idx, nan=-1)).astype(np.int64)
        out = np.where(idx >= 0, local[np.maximum(idx, 0)] if len(local) else -1, -1).astype(np.int32)  # 4 bytes per event
        valid = out[out >= 0]
        self.counts += np.bincount(valid, minlength=len(self.counts))[: len(self.counts)]
        return out


def prepare(
    source: Source,
    schema: EventSchema,
    out: str | Path | None = None,
    encoding: Encoding | None = None,
    on_error: str = "raise",
    min_count: int = 1,
    max_vocab: int | None = None,
    chunk_rows: int = 1_000_000,
    show_progress: bool = True,
    drop_duplicates: bool = False,
) -> tuple[SequenceStore, PrepareReport]:
    """Validate and encode raw events into a :class:`SequenceStore` (saved to ``out`` if given).

    ``encoding``: a saved encoding to apply (unseen categories → the reserved id, counted)
    instead of fitting a new one. ``on_error="drop"`` drops bad rows and counts them per
    reason; the default raises :class:`SchemaError` at the first bad value. Rows equal to
    an earlier row in every column are counted, and dropped when ``drop_duplicates``.
    """
    check_arguments(schema, encoding, on_error)
    t0 = time.perf_counter()
    report = PrepareReport()
    time_format = encoding.time_format if encoding is not None else schema.time_format
    clients = _GrowingDictionary()
    cat_dicts = {c: _GrowingDictionary() for c in schema.categorical}
    parts: dict[str, list[np.ndarray]] = {"client": [], TIME_COLUMN: [], **{c: [] for c in schema.categorical}, **{c: [] for c in schema.numeric}}
    num_sums = {c: [0.0, 0.0, 0] for c in schema.numeric}
    transforms = numeric_transforms(schema, encoding)
    client_reason, time_reason, *number_reasons = drop_reasons(schema)

    typed_rows = Counter()  # rows of typed timestamp chunks, by whether the type has a zone
    bar = tqdm(total=count_rows(source), unit="rows", unit_scale=True, desc="prepare", disable=not show_progress)
    for chunk in iter_chunks(source, schema.raw_columns, chunk_rows):
        tbl = check_column_types(chunk.table, chunk.source)
        tbl = tbl.set_column(0, schema.client_col, exact_client_ids(tbl.column(0)))
        report.merged_client_ids += chunk.merged_ids
        n = tbl.num_rows
        report.n_rows_read += n
        bad = np.zeros(n, dtype=bool)

        def fail(column: str, problem: str, example, row: int, count: int, reason: str) -> None:
            if on_error == "raise":
                raise bad_rows_error(chunk.source, column, count, problem, example, chunk.first_row + row)
            report.dropped[reason] += int(count)

        client_raw = tbl.column(schema.client_col)
        null_client = pc.is_null(client_raw).to_numpy(zero_copy_only=False)
        if null_client.any():
            row = int(np.flatnonzero(null_client)[0])
            fail(schema.client_col, NULL_CLIENT_PROBLEM, None, row, int(null_client.sum()), client_reason)
            bad |= null_client

        time_raw = tbl.column(schema.time_col)
        if time_format == "auto":
            time_format = detect_time_format(time_raw)
            log.info("time column %r detected as %s", schema.time_col, time_format)
        t = parse_time(time_raw, time_format)
        report.naive_times_as_utc += t.naive_as_utc
        if pa.types.is_timestamp(time_raw.type):  # typed stamps: zoned in one file, naive in another
            typed_rows[time_raw.type.tz is not None] += n
        t_bad = t.bad & ~bad
        if t_bad.any():
            fail(schema.time_col, t.problem, t.example, t.example_row, int(t_bad.sum()), time_reason)
            bad |= t.bad

        nums = {}
        for c, reason in zip(schema.numeric, number_reasons):
            p = transforms[c].check_range(parse_number(tbl.column(c)))
            c_bad = p.bad & ~bad
            if c_bad.any():
                row = int(np.flatnonzero(c_bad)[0])
                fail(c, p.problem_of(row), tbl.column(c)[row].as_py(), row, int(c_bad.sum()), reason)
                bad |= p.bad
            nums[c] = p.values

        keep = ~bad
        if not keep.any():  # every row of the chunk dropped (and counted): nothing to encode
            bar.update(n)
            continue
        all_kept = bool(keep.all())
        if not all_kept:
            tbl = tbl.filter(pa.array(keep))
        parts["client"].append(clients.encode(tbl.column(schema.client_col)))
        parts[TIME_COLUMN].append(t.values if all_kept else t.values[keep])
        for c in schema.categorical:
            col = tbl.column(c)
            if col.null_count:
                report.null_categories[c] += col.null_count
            parts[c].append(cat_dicts[c].encode(col, canon=as_category_strings).astype(np.int32))
        for c in schema.numeric:
            base = transforms[c].base(nums[c] if all_kept else nums[c][keep])
            s = num_sums[c]
            s[0] += float(base.sum()); s[1] += float(np.square(base).sum()); s[2] += len(base)
            parts[c].append(base.astype(np.float32))
        bar.update(n)
    bar.close()

    if report.n_rows_read == 0:
        raise no_rows_error(_name(source))
    if typed_rows[True] and typed_rows[False]:
        report.naive_times_as_utc += typed_rows[False]
    if report.naive_times_as_utc:
        log.warning("column %r: %d timestamps without a time zone beside ones with a zone; they are read as UTC",
                    schema.time_col, report.naive_times_as_utc)
    client_code = np.concatenate(parts.pop("client") or [np.zeros(0, np.int64)])
    if len(client_code) == 0:
        raise all_dropped_error(_name(source), report.n_rows_read, report.dropped)

    # clients ordered by id, so the store does not depend on file order
    client_values, client_code, merged = unify_id_types(clients.index.to_numpy(), client_code)
    report.merged_client_ids += merged
    order_of = _sort_order(client_values)
    rank = np.empty(len(order_of), np.int32)
    rank[order_of] = np.arange(len(order_of))
    client_code = rank[client_code]
    client_values = client_values[order_of]

    event_time = np.concatenate(parts.pop(TIME_COLUMN))
    order = np.lexsort((event_time, client_code))
    fields = {c: np.concatenate(parts.pop(c)) for c in [*schema.categorical, *schema.numeric]}
    sorted_time = event_time[order]
    del event_time
    duplicate = _duplicate_rows(client_code, sorted_time, fields, order)  # in sorted positions
    report.duplicate_rows = int(duplicate.sum())
    if report.duplicate_rows:
        if drop_duplicates:
            report.dropped["duplicate row"] += report.duplicate_rows
            order, sorted_time = order[~duplicate], sorted_time[~duplicate]
        else:
            log.warning("%d rows repeat an earlier row in every column; they are kept (drop_duplicates=True / --drop-duplicates drops them)",
                        report.duplicate_rows)
    counts = np.bincount(client_code[order] if report.duplicate_rows and drop_duplicates else client_code, minlength=len(client_values))
    offsets = offsets_from_lengths(counts)
    del client_code

    columns: dict[str, np.ndarray] = {TIME_COLUMN: sorted_time}
    del sorted_time
    vocabs: dict[str, CategoryVocab] = {}
    for c in schema.categorical:
        codes = fields.pop(c)
        uniques = cat_dicts[c].index.to_numpy().astype(str)
        if encoding is None:
            vocab = CategoryVocab.fit(uniques, cat_dicts[c].counts, min_count=min_count, max_size=max_vocab)
        else:
            vocab = encoding.categorical[c]
        ids = vocab.encode(uniques)
        remap = np.append(ids, np.int32(UNSEEN_ID))  # code -1 (null) → unseen
        columns[c] = remap[codes[order]]
        vocabs[c] = vocab
        if encoding is not None:
            unseen = ids == UNSEEN_ID  # values (not nulls) that the applied encoding does not know
            n_unseen = int(np.isin(codes[order], np.flatnonzero(unseen)).sum()) if unseen.any() else 0
            if n_unseen:
                report.unseen_categories[c] = n_unseen
                log.warning("column %r: %d of %d events (%.1f%%) hold values the encoding does not know, e.g. %r; they get the unseen id",
                            c, n_unseen, len(order), 100 * n_unseen / max(len(order), 1), uniques[unseen][0])
    for c in schema.numeric:
        if encoding is None:
            transforms[c].fit_moments(*num_sums[c])
        columns[c] = transforms[c].standardize(fields.pop(c)[order])

    enc = encoding or Encoding(schema.client_col, schema.time_col, time_format, vocabs, transforms)
    store = SequenceStore(_plain_ids(client_values), offsets, columns, enc, {"schema": schema.to_dict()})
    report.n_clients, report.n_events = store.n_clients, store.n_events
    report.seconds = time.perf_counter() - t0
    if out is not None:
        store.save(out)
        remove_stale_outputs(out)
        report.seconds = time.perf_counter() - t0
    log.info(report.summary())
    return store, report


def _name(source: Source) -> str:
    return type(source).__name__ if isinstance(source, (pd.DataFrame, pa.Table)) else str(source)


STALE_OUTPUTS = ("targets.parquet",)  # files that describe a store's clients, written beside it by data recipes or --targets


def remove_stale_outputs(out: str | Path) -> None:
    """A re-run of ``prepare`` into a directory replaces the store: files that described the
    previous store's clients (``targets.parquet``) are removed, with a warning, not left beside it."""
    for name in STALE_OUTPUTS:
        stale = Path(out) / name
        if stale.exists():
            stale.unlink()
            log.warning("removed %s, left by an earlier prepare into %s: it described the previous clients "
                        "(pass --targets to store targets with the new data)", stale, out)


def _duplicate_rows(client: np.ndarray, sorted_time: np.ndarray, fields: dict[str, np.ndarray], order: np.ndarray) -> np.ndarray:
    """Mask, in sorted order, of rows equal to an earlier row in client, time and every field.
    Only rows sharing (client, time) with a neighbour in sorted order are compared, so inputs
    with distinct times cost two vectorised comparisons."""
    dup = np.zeros(len(order), dtype=bool)
    if len(order) < 2:
        return dup
    tie = sorted_time[1:] == sorted_time[:-1]
    if tie.any():
        c = client[order]
        tie &= c[1:] == c[:-1]
    if not tie.any():
        return dup
    in_tie = np.zeros(len(order), dtype=bool)
    in_tie[1:] |= tie
    in_tie[:-1] |= tie
    pos = np.flatnonzero(in_tie)  # stable sort: the rows of a tie group keep their input order
    rows = order[pos]
    frame = pd.DataFrame({"__client": client[rows], "__time": sorted_time[pos], **{k: v[rows] for k, v in fields.items()}})
    dup[pos[frame.duplicated(keep="first").to_numpy()]] = True
    return dup


def _sort_order(values: np.ndarray) -> np.ndarray:
    try:
        return np.argsort(values, kind="stable")
    except TypeError:  # mixed types: order by text
        return np.argsort(values.astype(str), kind="stable")


def _plain_ids(values: np.ndarray) -> np.ndarray:
    """Client ids as a typed array (int64 when all ints, else str) rather than Python objects."""
    s = pd.Series(values)
    inferred = pd.api.types.infer_dtype(s, skipna=False)
    if inferred == "integer":
        return s.astype(np.int64).to_numpy()
    if inferred in ("floating", "mixed-integer-float"):
        x = s.astype(np.float64).to_numpy()
        # integer ids read as float (a null in a pandas int column) stay integers
        return x.astype(np.int64) if np.isfinite(x).all() and np.all(np.mod(x, 1) == 0) and np.all(np.abs(x) < 2**53) else x
    return s.astype(str).to_numpy()
