"""Raw event sources as a stream of Arrow chunks: Parquet files/directories, CSV, pandas, Arrow.

Reading in chunks keeps memory bounded on logs of tens of millions of events.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .schema import SchemaError, csv_client_ids, unify_id_types

log = logging.getLogger(__name__)
Source = Union[str, os.PathLike, pd.DataFrame, pa.Table]
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".csv.gz", ".txt", ".tsv")
# the formats a directory may hold, most specific first: a directory is read in the first
# format it has, so a README.txt beside .csv or .parquet files is skipped, not parsed as data
DIRECTORY_FORMATS = (PARQUET_SUFFIXES, (".csv", ".csv.gz"), (".tsv",), (".txt",))


@dataclass
class Chunk:
    table: pa.Table
    source: str  # file name or "<DataFrame>", for error messages
    first_row: int  # row number of the chunk's first row within its source
    merged_ids: int = 0  # client ids given both as number and text within a DataFrame column, merged


def list_files(path: Path, warn: bool = True) -> list[Path]:
    """The data files of a path: the file itself, or the files of one format in a directory
    (sorted; Parquet first, then CSV, TSV, TXT). Other visible files are skipped and named in a warning."""
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    if path.is_file():
        return [path]
    visible = sorted(
        p for p in path.rglob("*")
        if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)  # also .ipynb_checkpoints/, _temporary/
    )
    for suffixes in DIRECTORY_FORMATS:
        files = [p for p in visible if p.name.lower().endswith(suffixes)]
        if files:
            break
    else:
        raise SchemaError(f"directory {path} holds no .parquet or .csv files")
    skipped = [str(p.relative_to(path)) for p in visible if p not in files]
    if skipped and warn:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        log.warning("%s: reading the %d %s file(s); skipped %d other file(s): %s", path, len(files), "/".join(suffixes), len(skipped), shown)
    return files


def _check_columns(available: list[str], needed: list[str], source: str) -> None:
    missing = [c for c in needed if c not in available]
    if missing:
        raise SchemaError(
            f"{source}: missing column(s) {missing}; the file has columns {available}. "
            "Name the right columns in the schema (e.g. --client-col, --time-col)."
        )


def count_rows(source: Source) -> int | None:
    """Total rows when cheap to know (Parquet metadata, in-memory tables), else None."""
    if isinstance(source, (pd.DataFrame, pa.Table)):
        return len(source)
    try:
        files = list_files(Path(source), warn=False)  # the reading pass names skipped files
    except (FileNotFoundError, SchemaError):
        return None
    if all(f.name.lower().endswith(PARQUET_SUFFIXES) for f in files):
        try:
            return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        except Exception:
            return None
    return None


def iter_chunks(source: Source, columns: list[str], chunk_rows: int = 1_000_000, csv_delimiter: str | None = None) -> Iterator[Chunk]:
    """Yield the needed columns of a source chunk by chunk, with clear errors for unreadable input."""
    if isinstance(source, pd.DataFrame):
        _check_columns([str(c) for c in source.columns], columns, "<DataFrame>")
        # the client column is typed once for the whole frame, so 1 and "1" in different
        # chunks are merged (and counted) like 1 and "1" in one chunk
        clients, merged = pandas_client_ids(source[columns[0]])
        for start in range(0, len(source), chunk_rows):
            part = _from_pandas(source.iloc[start : start + chunk_rows][columns[1:]])
            table = part.add_column(0, columns[0], clients.slice(start, chunk_rows))
            yield Chunk(table, "<DataFrame>", start, merged if start == 0 else 0)
        return
    if isinstance(source, pa.Table):
        _check_columns(source.column_names, columns, "<Table>")
        for start in range(0, source.num_rows, chunk_rows):
            yield Chunk(source.select(columns).slice(start, chunk_rows), "<Table>", start)
        return
    for file in list_files(Path(source)):
        if file.name.lower().endswith(PARQUET_SUFFIXES):
            yield from _iter_parquet(file, columns, chunk_rows)
        else:
            yield from _iter_csv(file, columns, csv_delimiter)


def _from_pandas(df: pd.DataFrame) -> pa.Table:
    arrays = {}
    for col in df.columns:
        try:
            arrays[str(col)] = pa.array(df[col], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            # mixed Python types (or ints beyond int64) in an object column: read it as text, validation decides
            arrays[str(col)] = pa.array(df[col].map(_text_or_none), type=pa.string())
    return pa.table(arrays)


def pandas_client_ids(ids: pd.Series) -> tuple[pa.Array, int]:
    """A pandas client id column as one Arrow array, and the count of ids merged: an object
    column mixing numbers and text (``1`` and ``"1"``) becomes text by the same rule as
    mixed files (:func:`unify_id_types`), and the merges are counted, not silent."""
    try:
        return pa.array(ids, from_pandas=True), 0
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        pass
    try:
        codes, uniques = pd.factorize(ids, use_na_sentinel=True)
    except TypeError:  # unhashable values (lists, dicts): text, then the nested-value checks decide
        return pa.array(ids.map(_text_or_none), type=pa.string()), 0
    values, codes_all, merged = unify_id_types(np.asarray(uniques, dtype=object), np.maximum(codes, 0))
    text = np.asarray([_text_or_none(v) for v in values], dtype=object)[codes_all]
    return pa.array(np.where(codes < 0, None, text), type=pa.string()), merged


def _text_or_none(value) -> str | None:
    if pd.api.types.is_scalar(value) and pd.isna(value):  # lists and dicts are not missing values
        return None
    return str(value)


def open_parquet(file: Path, columns: list[str]) -> pq.ParquetFile:
    """A Parquet file (its footer read) checked for the needed columns, errors naming it."""
    try:
        pf = pq.ParquetFile(file)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SchemaError(f"{file}: not a readable Parquet file ({exc})") from None
    _check_columns(pf.schema_arrow.names, columns, str(file))
    return pf


def _iter_parquet(file: Path, columns: list[str], chunk_rows: int) -> Iterator[Chunk]:
    pf = open_parquet(file, columns)
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=columns):
            yield Chunk(pa.Table.from_batches([batch]), str(file), row)
            row += batch.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise SchemaError(f"{file}: corrupt Parquet data after row {row} ({exc})") from None


def csv_header(file: Path, columns: list[str], delimiter: str | None = None) -> tuple[list[str], str]:
    """The column names and delimiter of a CSV file, checked against the needed columns.
    A UTF-8 byte-order mark is not part of the first name (as pyarrow's reader also drops it)."""
    if file.stat().st_size == 0:
        raise SchemaError(f"{file}: the file is empty (expected a header line with columns {columns})")
    with open(file, "rb") as fh:
        head = fh.readline().decode("utf-8-sig", "replace").rstrip("\r\n")
    if delimiter is None:
        delimiter = max([",", ";", "\t", "|"], key=head.count)
    header = [h.strip().strip('"') for h in head.split(delimiter)]
    _check_columns(header, columns, str(file))
    return header, delimiter


def _iter_csv(file: Path, columns: list[str], delimiter: str | None) -> Iterator[Chunk]:
    _, delimiter = csv_header(file, columns, delimiter)
    # every column is read as text: features are validated by us, so one bad value late in a
    # large file gives our error (or a counted drop), not a reader exception; client ids are
    # typed by csv_client_ids, so 20-digit ids never pass through float
    convert = pacsv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns})
    try:
        reader = pacsv.open_csv(
            file,
            read_options=pacsv.ReadOptions(block_size=64 << 20),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=convert,
        )
        row = 0
        for batch in reader:
            table = pa.Table.from_batches([batch])
            table = table.set_column(0, columns[0], csv_client_ids(table.column(0)))
            yield Chunk(table, str(file), row)
            row += batch.num_rows
    except pa.ArrowInvalid as exc:
        raise SchemaError(f"{file}: not readable as CSV ({exc})") from None
