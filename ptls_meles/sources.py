"""Raw event sources as a stream of Arrow chunks: Parquet files/directories, CSV, pandas, Arrow.

Reading in chunks keeps memory bounded on logs of tens of millions of events.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .schema import SchemaError

Source = Union[str, os.PathLike, pd.DataFrame, pa.Table]
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".csv.gz", ".txt", ".tsv")


@dataclass
class Chunk:
    table: pa.Table
    source: str  # file name or "<DataFrame>", for error messages
    first_row: int  # row number of the chunk's first row within its source


def list_files(path: Path) -> list[Path]:
    """The data files of a path: the file itself, or the Parquet/CSV files of a directory (sorted)."""
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    if path.is_file():
        return [path]
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file()
        and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)  # also .ipynb_checkpoints/, _temporary/
        and p.name.lower().endswith(PARQUET_SUFFIXES + CSV_SUFFIXES)
    )
    if not files:
        raise SchemaError(f"directory {path} holds no .parquet or .csv files")
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
        files = list_files(Path(source))
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
        for start in range(0, len(source), chunk_rows):
            part = source.iloc[start : start + chunk_rows][columns]
            yield Chunk(_from_pandas(part, "<DataFrame>"), "<DataFrame>", start)
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


def _from_pandas(df: pd.DataFrame, source: str) -> pa.Table:
    arrays = {}
    for col in df.columns:
        try:
            arrays[str(col)] = pa.array(df[col], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            # mixed Python types (or ints beyond int64) in an object column: read it as text, validation decides
            arrays[str(col)] = pa.array(df[col].map(_text_or_none), type=pa.string())
    return pa.table(arrays)


def _text_or_none(value) -> str | None:
    if pd.api.types.is_scalar(value) and pd.isna(value):  # lists and dicts are not missing values
        return None
    return str(value)


def _iter_parquet(file: Path, columns: list[str], chunk_rows: int) -> Iterator[Chunk]:
    try:
        pf = pq.ParquetFile(file)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SchemaError(f"{file}: not a readable Parquet file ({exc})") from None
    _check_columns(pf.schema_arrow.names, columns, str(file))
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=columns):
            yield Chunk(pa.Table.from_batches([batch]), str(file), row)
            row += batch.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise SchemaError(f"{file}: corrupt Parquet data after row {row} ({exc})") from None


def _iter_csv(file: Path, columns: list[str], delimiter: str | None) -> Iterator[Chunk]:
    if file.stat().st_size == 0:
        raise SchemaError(f"{file}: the file is empty (expected a header line with columns {columns})")
    if delimiter is None:
        with open(file, "rb") as fh:
            head = fh.readline().decode("utf-8", "replace")
        delimiter = max([",", ";", "\t", "|"], key=head.count)
    try:
        header = pacsv.read_csv(
            file, read_options=pacsv.ReadOptions(block_size=1 << 16), parse_options=pacsv.ParseOptions(delimiter=delimiter)
        ).column_names if file.stat().st_size < (1 << 16) else None
    except pa.ArrowInvalid as exc:
        raise SchemaError(f"{file}: not readable as CSV ({exc})") from None
    if header is None:
        with open(file, "rb") as fh:
            header = [h.strip().strip('"') for h in fh.readline().decode("utf-8", "replace").rstrip("\r\n").split(delimiter)]
    _check_columns(header, columns, str(file))
    # feature columns are read as text and validated by us, so one bad value late in a
    # large file gives our error (or a counted drop), not a reader exception
    convert = pacsv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns[1:]})
    try:
        reader = pacsv.open_csv(
            file,
            read_options=pacsv.ReadOptions(block_size=64 << 20),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=convert,
        )
        row = 0
        for batch in reader:
            yield Chunk(pa.Table.from_batches([batch]), str(file), row)
            row += batch.num_rows
    except pa.ArrowInvalid as exc:
        raise SchemaError(f"{file}: CSV read failed ({exc}); check the client id column holds one type of value") from None
