"""Small file helpers shared by every writer: outputs appear whole or not at all, output
paths are checked before the work starts, and JSON state files fail naming the file."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield a temporary path beside ``target``; rename it to ``target`` only on success.

    A killed or failed run therefore never leaves a partial file at the output path.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj, default=None) -> None:
    """Write ``obj`` as indented JSON, whole or not at all (:func:`atomic_path`); ``default``
    as in ``json.dumps`` (e.g. ``float`` for NumPy scalars)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=default))


def read_json(path: str | os.PathLike, what: str):
    """The JSON content of a state file (``config``, ``encoding``, ``schema``); a truncated or
    edited file gives a ValueError naming the file, not a bare JSON parser message."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a valid {what} file ({exc}); restore or rewrite it") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a valid {what} file (not UTF-8 text); restore or rewrite it") from None


def read_table(path: str | os.PathLike, what: str = "table"):
    """A pandas table from Parquet (a file or a directory of files) or CSV/TSV, with errors
    that name the file (feature tables, target tables)."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no {what} at {path}")
    name = path.name.lower()
    try:
        if path.is_dir() or name.endswith((".parquet", ".pq")):
            return pd.read_parquet(path)
        if name.endswith((".csv", ".csv.gz", ".tsv", ".txt")):
            return pd.read_csv(path, sep="\t" if name.endswith(".tsv") else ",")
    except (ValueError, OSError) as exc:  # pyarrow's and pandas' parser errors are ValueErrors
        raise ValueError(f"{path}: cannot read the {what} ({exc})") from None
    raise ValueError(f"{what} {path}: unknown format (expected .parquet, .pq, .csv, .csv.gz, .tsv or .txt)")


def check_output_dir(path: str | os.PathLike, option: str = "--out") -> None:
    """Refuse, before any work, an output directory that is an existing file or cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is an existing file; the output is a directory: name a directory")
    _check_writable(path, option)


def check_output_file(path: str | os.PathLike, option: str = "--out") -> None:
    """Refuse, before any work, an output file path that is an existing directory or cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is an existing directory; the output is a file: name a file, e.g. {path / 'out'}")
    _check_writable(path.parent, option)


def _check_writable(directory: Path, option: str) -> None:
    """Create nothing: find the nearest existing ancestor and try to create a file in it."""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {directory}: {existing} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ptls-meles-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{option} {directory}: cannot write there ({exc.strerror or exc}); choose a writable location") from None
