"""The event schema (which column is what) and the validation of raw columns.

Every problem in the input is reported by :class:`SchemaError`, naming the source,
the column, the problem and an example value, or — when the user asked to drop bad
rows — counted per reason so nothing disappears silently.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

TIME_FORMATS = ("auto", "number", "timestamp", "day_hms")  # or a strftime pattern such as "%y%m%d"
DAY_HMS_PATTERN = r"^\s*(?P<d>\d+)\s+(?P<h>\d{1,2}):(?P<m>\d{1,2}):(?P<s>\d{1,2}(?:\.\d*)?)\s*$"
TZ_SUFFIX_PATTERN = r"(?:Z|[+-]\d{2}:?\d{2})\s*$"  # a time zone at the end of a timestamp text
FLOAT32_MAX = float(np.finfo(np.float32).max)
INT64_MAX = 2**63 - 1
EXACT_FLOAT_INT = 2**53  # integers up to this magnitude are exact in float64
CSV_NULL_TEXTS = ("", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                  "N/A", "NA", "NULL", "NaN", "n/a", "nan", "null")  # pyarrow's CSV null markers


def is_strftime_pattern(time_format: str) -> bool:
    """A ``time_format`` that is a strftime pattern (``"%y%m%d"``) rather than a named format."""
    return "%" in time_format


def strftime_example(pattern: str) -> str:
    """One time written in ``pattern``, to show the user what is expected."""
    return pd.Timestamp("1996-07-28 10:23:26").strftime(pattern)


class SchemaError(ValueError):
    """Input does not match the schema: the message names source, column, problem and example."""


@dataclass
class EventSchema:
    """Which column of the raw events is what.

    ``time_format``: ``number`` (e.g. a day index), ``timestamp`` (converted to seconds
    since the epoch), ``day_hms`` (the gender dataset's ``"d hh:mm:ss"``, converted to
    seconds), ``auto`` to detect one of these from the data, or a strftime pattern such as
    ``"%y%m%d"`` (integer dates like ``960728``) or ``"%d.%m.%Y %H:%M"``, converted to seconds
    since the epoch, so a gap across a month's end is the true gap.
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
        if not isinstance(self.time_format, str) or not (self.time_format in TIME_FORMATS or is_strftime_pattern(self.time_format)):
            raise SchemaError(
                f"time_format {self.time_format!r} is not one of {TIME_FORMATS} nor a strftime pattern (e.g. '%y%m%d' for 960728)"
            )
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
        from .io_utils import write_json

        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EventSchema":
        from .io_utils import read_json

        fields = read_json(path, "schema")
        try:
            return cls(**fields)
        except TypeError as exc:
            raise SchemaError(f"{path}: not a schema file ({exc}); expected keys client_col, time_col, categorical, numeric, time_format") from None


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


# ----------------------------------------------------------------- client ids
def exact_client_ids(raw: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Client ids in a type that holds every id exactly: unsigned or decimal integers that
    fit int64 become int64, larger ones (uint64 ids of 2**63 or more) become their text —
    never wrapped to negative numbers or rounded through float."""
    t = raw.type
    if pa.types.is_unsigned_integer(t) or pa.types.is_decimal(t) and t.scale == 0:
        bounds = pc.min_max(raw)
        lo, hi = bounds["min"].as_py(), bounds["max"].as_py()
        if hi is None or (lo >= -INT64_MAX - 1 and hi <= INT64_MAX):
            return pc.cast(raw, pa.int64())
        return pc.cast(raw, pa.string())
    return raw


def csv_client_ids(text: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Type the client column of a CSV, read as text, without passing it through float:
    int64 when every id is an integer within int64, float64 when every id is a number
    exactly held by float64 (``"1.0"``), otherwise the text itself (20-digit ids stay text).
    pyarrow's null markers (``""``, ``NA``, ...) are missing ids in a numeric column; in a
    text column only the empty field is."""
    text = pc.cast(text, pa.string())
    try:
        return pc.cast(text, pa.int64())  # the common case, without looking for null markers
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    marked = pc.if_else(pc.is_in(text, value_set=pa.array(CSV_NULL_TEXTS)), pa.scalar(None, pa.string()), text)
    try:
        return pc.cast(marked, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    try:
        numbers = pc.cast(marked, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
    x = numbers.to_numpy(zero_copy_only=False)
    x = x[~np.isnan(x)]
    if np.isfinite(x).all() and not (np.abs(x[np.mod(x, 1) == 0]) > EXACT_FLOAT_INT).any():
        return numbers
    return pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)


def unify_id_types(values: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Distinct client ids ``values`` (``codes`` index them) that mix numbers and text all
    become text, and ``3`` and ``"3"`` (or ``3.0`` and ``"3"``) become one client; returns
    (values, codes, merged) where ``merged`` counts the ids folded into another."""
    import logging

    if pd.api.types.infer_dtype(values, skipna=False) not in ("mixed", "mixed-integer"):
        return values, codes, 0
    # one Python call per distinct client, only on this rare path
    keys = np.array([_id_text(v) for v in values], dtype=object).astype(str)
    uniques, inverse = np.unique(keys, return_inverse=True)
    merged = len(values) - len(uniques)
    logging.getLogger(__name__).warning("client ids mix numbers and text; all are read as text (%d ids given both ways merged)", merged)
    return uniques.astype(object), inverse[codes], merged


def _id_text(value) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


# ----------------------------------------------------------------- column parsing
@dataclass
class Parsed:
    """Parsed column values plus the mask of rows that failed and why."""

    values: np.ndarray
    bad: np.ndarray  # bool mask of unusable rows
    problem: str = ""
    example: object = None
    example_row: int = -1
    overflow: np.ndarray | None = None  # rows bad because their value does not fit the store's type
    overflow_problem: str = ""
    naive_as_utc: int = 0  # timestamps without a zone read as UTC beside ones with a zone

    def problem_of(self, row: int) -> str:
        """The problem text of one bad row."""
        if self.overflow is not None and self.overflow[row]:
            return self.overflow_problem
        return self.problem


def _first_bad(raw: pa.ChunkedArray | pa.Array, bad: np.ndarray) -> tuple[object, int]:
    idx = int(np.flatnonzero(bad)[0])
    return raw[idx].as_py(), idx


BAD_NUMBER = "null, NaN or infinite value"  # the problem of a bad number (NOT_A_NUMBER: in a text column)
NOT_A_NUMBER = "non-numeric, null, NaN or infinite value"


def parse_number(raw: pa.Array | pa.ChunkedArray) -> Parsed:
    """Float64 values; non-numeric, null, NaN and inf rows are marked bad."""
    if pa.types.is_integer(raw.type) or pa.types.is_floating(raw.type) or pa.types.is_boolean(raw.type) or pa.types.is_decimal(raw.type):
        # safe=False: integers beyond 2**53 become the nearest float instead of raising
        values = pc.cast(raw, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
        problem = BAD_NUMBER
    else:
        text = pc.cast(raw, pa.string())
        try:
            values = pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False)
            problem = BAD_NUMBER
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            values = pd.to_numeric(pd.Series(text.to_numpy(zero_copy_only=False)), errors="coerce").to_numpy(np.float64)
            problem = NOT_A_NUMBER
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
    """Float64 event times: the number itself, seconds since epoch (timestamps and strftime
    patterns), or seconds for ``d hh:mm:ss``."""
    if time_format == "number":
        parsed = parse_number(raw)
        if parsed.bad.any():
            parsed.problem = "unparsable time (expected a number)"
        return parsed
    if time_format == "day_hms":
        return _parse_day_hms(raw)
    if time_format == "timestamp" or is_strftime_pattern(time_format):
        naive_as_utc = 0
        if pa.types.is_timestamp(raw.type) or pa.types.is_date(raw.type):
            # safe=False: nanosecond stamps are truncated to microseconds instead of raising
            ts = pc.cast(pc.cast(raw, pa.timestamp("us"), safe=False), pa.int64()).to_numpy(zero_copy_only=False)
            values = np.asarray(ts, dtype=np.float64) / 1e6
            if raw.null_count:
                values[pc.is_null(raw).to_numpy(zero_copy_only=False)] = np.nan
        else:
            text = pd.Series(pc.cast(raw, pa.string()).to_numpy(zero_copy_only=False), dtype=object)
            fmt = time_format if is_strftime_pattern(time_format) else "mixed"
            dt = pd.to_datetime(text, errors="coerce", format=fmt, utc=True)
            values = (dt - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy(np.float64)
            if fmt == "mixed":
                zoned = text.str.contains(TZ_SUFFIX_PATTERN, regex=True, na=False).to_numpy(bool)
                ok = np.isfinite(values)
                if (zoned & ok).any():
                    naive_as_utc = int((~zoned & ok).sum())
        bad = ~np.isfinite(values)
        if bad.any():
            ex, row = _first_bad(raw, bad)
            expected = (f"the pattern {time_format!r}, e.g. {strftime_example(time_format)!r}" if is_strftime_pattern(time_format)
                        else "a timestamp")
            return Parsed(values, bad, f"unparsable time (expected {expected})", ex, row, naive_as_utc=naive_as_utc)
        return Parsed(values, bad, naive_as_utc=naive_as_utc)
    raise SchemaError(f"time_format {time_format!r} is not one of {TIME_FORMATS[1:]} nor a strftime pattern")


def _parse_day_hms(raw: pa.Array | pa.ChunkedArray) -> Parsed:
    """Seconds of ``"d hh:mm:ss"`` times; hours outside 0–23 and minutes or seconds outside
    0–59 are bad rows, not carried into the next day or hour."""
    text = pc.cast(raw, pa.string())
    parts = pc.extract_regex(text, DAY_HMS_PATTERN)
    ok = pc.fill_null(pc.is_valid(parts), False).to_numpy(zero_copy_only=False)
    values = np.full(len(raw), np.nan)
    if ok.any():
        f = {k: pc.cast(pc.struct_field(parts, k), pa.float64()).to_numpy(zero_copy_only=False) for k in "dhms"}
        with np.errstate(invalid="ignore"):
            in_range = (f["h"] < 24) & (f["m"] < 60) & (f["s"] < 60)
        secs = f["d"] * 86400 + f["h"] * 3600 + f["m"] * 60 + f["s"]
        values = np.where(ok & in_range, secs, np.nan)
    bad = ~np.isfinite(values)
    if bad.any():
        ex, row = _first_bad(raw, bad)
        return Parsed(values, bad, 'unparsable time (expected "d hh:mm:ss" with hours 0-23, minutes and seconds 0-59, e.g. "0 10:23:26")', ex, row)
    return Parsed(values, bad)
