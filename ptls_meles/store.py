"""The sequence store: one row per client, events as ragged columns.

In memory a store is flat NumPy arrays plus an ``offsets`` array (client ``i`` owns
events ``offsets[i]:offsets[i+1]``), so slicing, batching and feature building are
vectorised and never create one Python object per client. On disk it is a Parquet
file with list columns (one row per client) and the encoding state as JSON beside it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .encoding import Encoding
from .io_utils import atomic_path

TIME_COLUMN = "event_time"
STORE_FILE = "sequences.parquet"
ENCODING_FILE = "encoding.json"


@dataclass
class SequenceStore:
    """Ragged event sequences of many clients.

    ``columns`` holds one flat array per field, all of length ``offsets[-1]``:
    ``event_time`` (float64, sorted within each client), categorical fields as int32
    ids (0 = padding, 1 = unseen/rare, see :class:`Encoding`), numeric fields as float32
    (already transformed).
    """

    client_ids: np.ndarray
    offsets: np.ndarray
    columns: dict[str, np.ndarray]
    encoding: Encoding
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        if len(self.offsets) != len(self.client_ids) + 1:
            raise ValueError(
                f"offsets must have n_clients + 1 = {len(self.client_ids) + 1} entries, got {len(self.offsets)}"
            )
        n = int(self.offsets[-1]) if len(self.offsets) else 0
        for name, values in self.columns.items():
            if len(values) != n:
                raise ValueError(f"column {name!r} has {len(values)} events, offsets say {n}")

    @property
    def n_clients(self) -> int:
        return len(self.client_ids)

    @property
    def n_events(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def categorical(self) -> list[str]:
        return list(self.encoding.categorical)

    @property
    def numeric(self) -> list[str]:
        return list(self.encoding.numeric)

    def take(self, client_index: np.ndarray) -> "SequenceStore":
        """A new store with the given clients (by position), in that order."""
        client_index = np.asarray(client_index, dtype=np.int64)
        starts = self.offsets[client_index]
        lens = self.offsets[client_index + 1] - starts
        event_index = ragged_arange(starts, lens)
        cols = {k: v[event_index] for k, v in self.columns.items()}
        return SequenceStore(self.client_ids[client_index], offsets_from_lengths(lens), cols, self.encoding, dict(self.meta))

    def client_frame(self, i: int):
        """One client's events as a DataFrame (for inspection and debugging)."""
        import pandas as pd

        a, b = self.offsets[i], self.offsets[i + 1]
        return pd.DataFrame({k: v[a:b] for k, v in self.columns.items()})

    # ---------------------------------------------------------------- disk
    def to_arrow(self) -> pa.Table:
        offsets = pa.array(self.offsets.astype(np.int32) if self.n_events < 2**31 else self.offsets)
        list_type = pa.ListArray if offsets.type == pa.int32() else pa.LargeListArray
        arrays = {"client_id": pa.array(self.client_ids)}
        for name, values in self.columns.items():
            arrays[name] = list_type.from_arrays(offsets, pa.array(values))
        return pa.table(arrays)

    def save(self, path: str | os.PathLike, row_group_size: int = 10_000) -> Path:
        """Write ``sequences.parquet`` and ``encoding.json`` into directory ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with atomic_path(path / STORE_FILE) as tmp:
            table = self.to_arrow()
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), **file_metadata(self.meta, self.encoding)})
            pq.write_table(table, tmp, row_group_size=row_group_size)
        self.encoding.save(path / ENCODING_FILE)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, columns: list[str] | None = None) -> "SequenceStore":
        """Load a store written by :meth:`save` (a directory, or the Parquet file inside it)."""
        path = Path(path)
        directory = path if path.is_dir() else path.parent
        file = directory / STORE_FILE if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"no sequence store at {file}: run `ptls-meles prepare` first")
        table = pq.read_table(file, columns=None if columns is None else ["client_id", TIME_COLUMN, *columns])
        embedded = (table.schema.metadata or {}).get(b"ptls_meles_encoding")
        encoding = Encoding.from_dict(json.loads(embedded)) if embedded else Encoding.load(directory / ENCODING_FILE)
        return cls.from_arrow(table, encoding)

    @classmethod
    def from_arrow(cls, table: pa.Table, encoding: Encoding) -> "SequenceStore":
        meta = {}
        if table.schema.metadata and b"ptls_meles" in table.schema.metadata:
            meta = json.loads(table.schema.metadata[b"ptls_meles"])
        client_ids = table.column("client_id").to_numpy(zero_copy_only=False)
        offsets = None
        cols: dict[str, np.ndarray] = {}
        for name in table.column_names:
            if name == "client_id":
                continue
            arr = table.column(name).combine_chunks()
            if arr.null_count:
                raise ValueError(f"store column {name!r} has {arr.null_count} null lists; the store is corrupt")
            arr_offsets = arr.offsets.to_numpy().astype(np.int64)
            values = arr.values.to_numpy(zero_copy_only=False)
            start = arr_offsets[0]
            if offsets is None:
                offsets = arr_offsets - start
            elif not np.array_equal(offsets, arr_offsets - start):
                raise ValueError(f"store column {name!r} has lists of other lengths than the first column")
            cols[name] = values[start : start + offsets[-1]]
        if offsets is None:
            offsets = np.zeros(len(client_ids) + 1, dtype=np.int64)
        return cls(client_ids, offsets, cols, encoding, meta)


def file_metadata(meta: dict, encoding: Encoding) -> dict[bytes, bytes]:
    """The Parquet metadata of ``sequences.parquet`` (both engines write it): ``meta`` (the
    schema) and the encoding, which travels inside the file too, so a store can never be
    paired with another run's ``encoding.json``."""
    return {b"ptls_meles": json.dumps(meta).encode(), b"ptls_meles_encoding": json.dumps(encoding.to_dict()).encode()}


def offsets_from_lengths(lengths: np.ndarray) -> np.ndarray:
    """``[0, l0, l0+l1, ...]`` (int64, one longer than ``lengths``): segment ``i`` is ``offsets[i]:offsets[i+1]``."""
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def ragged_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for each (s, n), without a Python loop."""
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    seg_start = np.cumsum(lengths) - lengths
    out = np.arange(total, dtype=np.int64) - np.repeat(seg_start - starts, lengths)
    return out
