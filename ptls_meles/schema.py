"""The event schema (which column is what) and the validation of raw columns.

Every problem in the input is reported by :class:`SchemaError`, naming the source,
the column, the problem and an example value, or — when the user asked to drop bad
rows — counted per reason so nothing disappears silently.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

TIME_FORMATS = ("auto", "number", "timestamp", "day_hms")
DAY_HMS_PATTERN = r"^\s*(?P<d>\d+)\s+(?P<h>\d{1,2}):(?P<m>\d{1,2}):(?P<s>\d{1,2}(?:\.\d*)?)\s*$"


class SchemaError(ValueError):
    """Input does not match the schema: the message names source, column, problem and example."""


@dataclass
class EventSchema:
    """Which column of the raw events is what.

    ``time_format``: ``number`` (e.g. a day index), ``timestamp`` (converted to seconds
    since the epoch), ``day_hms`` (the gender dataset's ``"d hh:mm:ss"``, converted to
    seconds), or ``auto`` to detect one of these from the data.
    ``numeric_transform``: one transform for all numeric columns or a dict per column
    (``identity``, ``log`` = sign·log1p|x|, ``standardize``, ``log_standardize``).
    """

    client_col: str
    time_col: str
    categorical: list[str] = field(default_factory=list)
    numeric: list[str] = field(default_factory=list)
    time_format: str = "auto"
    numeric_transform: str | dict[str, str] = "log"

    def __post_init__(self) -> None:
        if self.time_format not in TIME_FORMATS:
            raise SchemaError(f"time_format {self.time_format!r} is not one of {TIME_FORMATS}")
        self.categorical = list(self.categorical)
        self.numeric = list(self.numeric)
        names = [self.client_col, self.time_col, *self.categorical, *self.numeric]
        dupes = {n for n in self.categorical + self.numeric if (self.categorical + self.numeric).count(n) > 1}
        if dupes:
            raise SchemaError(f"columns {sorted(dupes)} are named more than once among categorical/numeric fields")
        if self.client_col in self.categorical + self.numeric:
            raise SchemaError(f"client column {self.client_col!r} cannot also be a feature")
        if not all(isinstance(n, str) and n for n in names):
            raise SchemaError(f"column names must be non-empty strings, got {names}")

    @property
    def raw_columns(self) -> list[str]:
        """The raw columns to read, each once."""
        return list(dict.fromkeys([self.client_col, self.time_col, *self.categorical, *self.numeric]))

    def transform_of(self, column: str) -> str:
        if isinstance(self.numeric_transform, str):
            return self.numeric_transform
        return self.numeric_transform.get(column, "log")

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EventSchema":
        return cls(**json.loads(Path(path).read_text()))


# ----------------------------------------------------------------- column types
def check_column_types(table: pa.Table, source: str) -> pa.Table:
    """Reject nested values (lists, structs, maps) and read bytes as UTF-8 text, so an odd
    column type gives a :class:`SchemaError` naming it instead of a deep Arrow error."""
    for i, name in enumerate(table.column_names):
        col = table.column(i)
        t = col.type
        if pa.types.is_nested(t) or pa.types.is_dictionary(t) and pa.types.is_nested(t.value_type):
            example = next((v for v in col.to_pylist() if v is not None), None)
            raise SchemaError(f"{source}: column {name!r} holds nested values of type {t}, e.g. {example!r}; expected one plain value per event")
        if pa.types.is_dictionary(t):
            table = table.set_column(i, name, pc.cast(col, t.value_type))
        elif pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
            try:
                table = table.set_column(i, name, pc.cast(pc.cast(col, pa.binary()), pa.string()))
            except pa.ArrowInvalid:
                bad = next(v for v in col.to_pylist() if v is not None and not _is_utf8(v))
                raise SchemaError(f"{source}: column {name!r} holds bytes that are not UTF-8 text, e.g. {bad!r}") from None
    return table


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ----------------------------------------------------------------- column parsing
@dataclass
class Parsed:
    """Parsed column values plus the mask of rows that failed and why."""

    values: np.ndarray
    bad: np.ndarray  # bool mask of unusable rows
    problem: str = ""
    example: object = None
    example_row: int = -1


def _first_bad(raw: pa.ChunkedArray | pa.Array, bad: np.ndarray) -> tuple[object, int]:
    idx = int(np.flatnonzero(bad)[0])
    return raw[idx].as_py(), idx


def parse_number(raw: pa.Array | pa.ChunkedArray) -> Parsed:
    """Float64 values; non-numeric, null, NaN and inf rows are marked bad."""
    if pa.types.is_integer(raw.type) or pa.types.is_floating(raw.type) or pa.types.is_boolean(raw.type) or pa.types.is_decimal(raw.type):
        # safe=False: integers beyond 2**53 become the nearest float instead of raising
        values = pc.cast(raw, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
        problem = "null, NaN or infinite value"
    else:
        text = pc.cast(raw, pa.string())
        try:
            values = pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False)
            problem = "null, NaN or infinite value"
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            values = pd.to_numeric(pd.Series(text.to_numpy(zero_copy_only=False)), errors="coerce").to_numpy(np.float64)
            problem = "non-numeric, null, NaN or infinite value"
    values = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        ex, row = _first_bad(raw, bad)
        return Parsed(values, bad, problem, ex, row)
    return Parsed(values, bad)


def detect_time_format(raw: pa.Array | pa.ChunkedArray) -> str:
    """Guess the time format from the column type and a few non-null values."""
    t = raw.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return "timestamp"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    sample = pc.drop_null(raw).slice(0, 200).to_pylist()
    sample = [str(v) for v in sample]
    if not sample:
        return "number"
    # majority, not unanimity: a few bad values must not flip the format, so that the
    # error then names the bad values rather than every good one
    if pd.Series(sample).str.match(DAY_HMS_PATTERN).mean() > 0.5:
        return "day_hms"
    if pd.to_numeric(pd.Series(sample), errors="coerce").notna().mean() > 0.5:
        return "number"
    return "timestamp"


def parse_time(raw: pa.Array | pa.ChunkedArray, time_format: str) -> Parsed:
    """Float64 event times: the number itself, seconds since epoch, or seconds for ``d hh:mm:ss``."""
    if time_format == "number":
        parsed = parse_number(raw)
        if parsed.bad.any():
            parsed.problem = "unparsable time (expected a number)"
        return parsed
    if time_format == "day_hms":
        text = pc.cast(raw, pa.string())
        parts = pc.extract_regex(text, DAY_HMS_PATTERN)
        ok = pc.fill_null(pc.is_valid(parts), False).to_numpy(zero_copy_only=False)
        values = np.full(len(raw), np.nan)
        if ok.any():
            fields = {k: pc.cast(pc.struct_field(parts, k), pa.float64()).to_numpy(zero_copy_only=False) for k in "dhms"}
            secs = fields["d"] * 86400 + fields["h"] * 3600 + fields["m"] * 60 + fields["s"]
            values = np.where(ok, np.nan_to_num(secs, nan=np.nan), np.nan)
        bad = ~np.isfinite(values)
        if bad.any():
            ex, row = _first_bad(raw, bad)
            return Parsed(values, bad, 'unparsable time (expected "d hh:mm:ss", e.g. "0 10:23:26")', ex, row)
        return Parsed(values, bad)
    if time_format == "timestamp":
        if pa.types.is_timestamp(raw.type) or pa.types.is_date(raw.type):
            # safe=False: nanosecond stamps are truncated to microseconds instead of raising
            ts = pc.cast(pc.cast(raw, pa.timestamp("us"), safe=False), pa.int64()).to_numpy(zero_copy_only=False)
            values = np.asarray(ts, dtype=np.float64) / 1e6
            if raw.null_count:
                values[pc.is_null(raw).to_numpy(zero_copy_only=False)] = np.nan
        else:
            text = pd.Series(pc.cast(raw, pa.string()).to_numpy(zero_copy_only=False))
            dt = pd.to_datetime(text, errors="coerce", format="mixed", utc=True)
            values = (dt - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy(np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            ex, row = _first_bad(raw, bad)
            return Parsed(values, bad, "unparsable time (expected a timestamp)", ex, row)
        return Parsed(values, bad)
    raise SchemaError(f"time_format {time_format!r} is not one of {TIME_FORMATS[1:]}")
