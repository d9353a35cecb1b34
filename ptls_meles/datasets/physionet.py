"""PhysioNet/CinC Challenge 2012 (sets A and B) → an events table and a targets table.

Why this shape: each ICU stay is a client whose event log (``Time,Parameter,Value``)
is a ready-made event sequence (categorical = parameter, numeric = value), and the
static descriptors plus the outcomes give the downstream labels (mortality, gender,
age group). The 8,000 small files are parsed in one pass: their bytes are joined
with a record-id prefix per line and read by a single ``pyarrow.csv.read_csv``
(about 2 s for the whole archive instead of minutes for 8,000 ``pd.read_csv`` calls).

Static descriptors, checked on the real data: ``RecordID``, ``Age``, ``Gender``,
``Height`` and ``ICUType`` occur exactly once per record, always at ``00:00``; they
never are events and all their rows go to the targets. ``Weight`` is both a
descriptor and a time-varying parameter: the *first* ``Weight`` row at ``00:00`` of
a record (in file order) is the descriptor; any later ``Weight`` row, including a
second one at ``00:00`` (one record has that), is an event. For descriptors ``-1``
means missing and becomes NaN; event values are kept as they are (counts of ``-1``
and of negative event values are logged).
"""
from __future__ import annotations

import io
import logging
import re
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

logger = logging.getLogger(__name__)

ARCHIVE_NAME = "physionet2012_setab.tar.gz"
#: Descriptors that are never events (one row per record at 00:00).
STATIC_ONLY_PARAMETERS = ("RecordID", "Age", "Gender", "Height", "ICUType")
#: ``Weight`` is a descriptor at 00:00 and a time-varying parameter afterwards.
WEIGHT = "Weight"
MISSING_MARKER = -1.0
DEFAULT_CLIP = 10.0

_RECORD_RE = re.compile(r"(?:^|/)set-[^/]+/([^/]+)\.txt$")
_OUTCOMES_RE = re.compile(r"(?:^|/)Outcomes-[^/]+\.txt$")
_OUTCOME_COLUMNS = {
    "RecordID": "record_id",
    "SAPS-I": "saps_i",
    "SOFA": "sofa",
    "Length_of_stay": "length_of_stay",
    "Survival": "survival",
    "In-hospital_death": "in_hospital_death",
}
# -1 marks a missing score / stay; in Survival -1 means "no recorded death" and is kept.
_OUTCOME_MISSING_AS_NAN = ("saps_i", "sofa", "length_of_stay")


class PhysioNetFormatError(ValueError):
    """The path or a file in it does not look like the PhysioNet 2012 challenge data."""


# ----------------------------------------------------------------------------- sources


def _iter_tar(path: Path) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of the record and outcome files, read without extracting."""
    with tarfile.open(path, "r:*") as archive:
        for member in archive:
            if member.isfile() and (_RECORD_RE.search(member.name) or _OUTCOMES_RE.search(member.name)):
                handle = archive.extractfile(member)
                if handle is not None:
                    yield member.name, handle.read()


def _iter_directory(root: Path) -> Iterator[tuple[str, bytes]]:
    """(relative name, bytes) of ``set-*/*.txt`` and ``Outcomes-*.txt`` under ``root``."""
    for base in (root, root / "physionet2012"):
        if not base.is_dir():
            continue
        for file in sorted(base.glob("Outcomes-*.txt")) + sorted(base.glob("set-*/*.txt")):
            yield file.relative_to(root).as_posix(), file.read_bytes()


def _resolve_source(path: Path) -> Iterator[tuple[str, bytes]]:
    """Pick the archive or directory reader; a directory holding only the archive also works."""
    if path.is_file():
        return _iter_tar(path)
    if path.is_dir():
        has_sets = any(path.glob("set-*")) or any(path.glob("physionet2012/set-*"))
        if not has_sets and (path / ARCHIVE_NAME).is_file():
            return _iter_tar(path / ARCHIVE_NAME)
        return _iter_directory(path)
    raise PhysioNetFormatError(
        f"{str(path)!r} does not exist: expected {ARCHIVE_NAME} or a directory with "
        "set-a/, set-b/ (or physionet2012/set-*/) and Outcomes-a.txt, Outcomes-b.txt"
    )


def _record_chunk(name: str, data: bytes) -> bytes:
    """Header dropped, every line prefixed with ``<record id>,`` (id from the file name)."""
    stem = name.rsplit("/", 1)[-1][: -len(".txt")]
    if not stem.isdigit():
        raise PhysioNetFormatError(f"record file {name!r}: name must be a numeric RecordID, e.g. '132539.txt'")
    data = data.replace(b"\r", b"")
    header, _, body = data.partition(b"\n")
    if not header.startswith(b"Time,Parameter,Value"):
        raise PhysioNetFormatError(
            f"record file {name!r}: header {header[:40]!r}, expected b'Time,Parameter,Value'"
        )
    body = body.strip(b"\n")
    if not body:
        return b""
    prefix = stem.encode() + b","
    return prefix + body.replace(b"\n", b"\n" + prefix) + b"\n"


def _collect(path: Path, show_progress: bool) -> tuple[list[bytes], list[int], list[pd.DataFrame]]:
    """Record chunks, record ids (all files, even empty ones) and outcome tables."""
    from tqdm.auto import tqdm

    chunks: list[bytes] = []
    record_ids: list[int] = []
    outcomes: list[pd.DataFrame] = []
    files = tqdm(_resolve_source(path), desc="physionet2012 files", unit="file", disable=not show_progress)
    for name, data in files:
        if _OUTCOMES_RE.search(name):
            outcomes.append(_parse_outcomes(name, data))
        else:
            chunks.append(_record_chunk(name, data))
            record_ids.append(int(name.rsplit("/", 1)[-1][:-4]))
    return chunks, record_ids, outcomes


# ----------------------------------------------------------------------------- parsing


def _parse_events(chunks: list[bytes]) -> pd.DataFrame:
    """One ``pyarrow.csv`` pass over all records → record_id, minute, parameter, value."""
    read = pacsv.ReadOptions(column_names=["record_id", "time", "parameter", "value"], block_size=1 << 24)
    convert = pacsv.ConvertOptions(
        column_types={"record_id": pa.int64(), "time": pa.string(), "parameter": pa.string(), "value": pa.float64()}
    )
    try:
        table = pacsv.read_csv(pa.py_buffer(b"".join(chunks)), read_options=read, convert_options=convert)
    except pa.ArrowInvalid as error:
        raise PhysioNetFormatError(f"record files: rows are not 'hh:mm,Parameter,Value': {error}") from None
    parts = pc.split_pattern(table["time"], ":")
    if pc.any(pc.not_equal(pc.list_value_length(parts), 2)).as_py():
        bad = pc.filter(table["time"], pc.not_equal(pc.list_value_length(parts), 2))[0]
        raise PhysioNetFormatError(f"record files: column Time must be 'hh:mm', got {bad.as_py()!r}")
    hours = pc.cast(pc.list_element(parts, 0), pa.int64())
    minutes = pc.cast(pc.list_element(parts, 1), pa.int64())
    return pd.DataFrame(
        {
            "record_id": table["record_id"].to_numpy(),
            "minute": pc.add(pc.multiply(hours, 60), minutes).to_numpy(),
            "parameter": table["parameter"].to_pandas(),
            "value": table["value"].to_numpy(zero_copy_only=False),
        }
    )


def _parse_outcomes(name: str, data: bytes) -> pd.DataFrame:
    table = pd.read_csv(io.BytesIO(data))
    missing = [c for c in _OUTCOME_COLUMNS if c not in table.columns]
    if missing:
        raise PhysioNetFormatError(
            f"outcomes file {name!r}: missing columns {missing}, has {list(table.columns)}"
        )
    return table[list(_OUTCOME_COLUMNS)].rename(columns=_OUTCOME_COLUMNS)


def _split_static(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """Mask of descriptor rows (see module docstring) and the events without them."""
    parameter = rows["parameter"].to_numpy()
    static = np.isin(parameter, STATIC_ONLY_PARAMETERS)
    late = static & (rows["minute"].to_numpy() != 0)
    if late.any():
        logger.warning("physionet2012: %d static descriptor rows not at 00:00 (treated as descriptors)", late.sum())
    weight_at_0 = (parameter == WEIGHT) & (rows["minute"].to_numpy() == 0)
    first_weight = np.zeros(len(rows), dtype=bool)
    candidates = np.flatnonzero(weight_at_0)
    first_weight[candidates[~rows["record_id"].iloc[candidates].duplicated().to_numpy()]] = True
    static |= first_weight
    return rows.loc[~static], pd.Series(static, index=rows.index)


def _static_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Descriptor rows pivoted to one row per record; -1 (missing) → NaN."""
    wide = rows.pivot_table(index="record_id", columns="parameter", values="value", aggfunc="first")
    n_missing = int((wide == MISSING_MARKER).sum().sum())
    logger.info("physionet2012: %d static descriptor values are -1 (missing) → NaN: %s",
                n_missing, (wide == MISSING_MARKER).sum().to_dict())
    wide = wide.mask(wide == MISSING_MARKER)
    for column in (*STATIC_ONLY_PARAMETERS, WEIGHT):
        if column not in wide.columns:
            wide[column] = np.nan
    return wide


def _int_if_complete(values: pd.Series) -> pd.Series:
    """int64 when nothing is missing, else float64 with NaN."""
    return values.astype("int64") if values.notna().all() else values.astype("float64")


def age_groups(age: pd.Series) -> tuple[pd.Series, tuple[float, float, float]]:
    """Age quartile class 0..3 with right-open bins ``[q_k, q_k+1)``, and the cut points.

    On the 8,000 records the quartiles are exactly 53, 67, 78, giving
    ``< 53``, ``53–66``, ``67–77``, ``>= 78`` → 1963 / 1938 / 1933 / 2166.
    """
    edges = tuple(float(q) for q in age.quantile([0.25, 0.5, 0.75]).to_numpy())
    group = pd.Series(np.searchsorted(np.asarray(edges), age.to_numpy(), side="right"), index=age.index, dtype="float64")
    return _int_if_complete(group.where(age.notna())), edges


def _targets(record_ids: np.ndarray, static: pd.DataFrame, outcomes: list[pd.DataFrame]) -> pd.DataFrame:
    targets = pd.DataFrame({"record_id": np.sort(record_ids)})
    static = static.reindex(targets["record_id"])
    targets["gender"] = static["Gender"].to_numpy(dtype="float64")
    targets["age"] = static["Age"].to_numpy(dtype="float64")
    targets["age_group"], edges = age_groups(targets["age"])
    targets["icu_type"] = static["ICUType"].to_numpy(dtype="float64")
    targets["height"] = static["Height"].to_numpy(dtype="float64")
    targets["weight"] = static[WEIGHT].to_numpy(dtype="float64")
    targets["icu_type"] = _int_if_complete(targets["icu_type"])
    if outcomes:
        outcome = pd.concat(outcomes, ignore_index=True).drop_duplicates("record_id")
        extra = ~outcome["record_id"].isin(targets["record_id"])
        if extra.any():
            logger.warning("physionet2012: %d outcome rows have no record file, dropped (e.g. %s)",
                           extra.sum(), outcome.loc[extra, "record_id"].iloc[0])
        targets = targets.merge(outcome, on="record_id", how="left")
    else:
        for column in _OUTCOME_COLUMNS.values():
            if column != "record_id":
                targets[column] = np.nan
    for column in _OUTCOME_COLUMNS.values():
        if column != "record_id":
            targets[column] = targets[column].astype("float64")
    for column in _OUTCOME_MISSING_AS_NAN:
        targets[column] = targets[column].mask(targets[column] == MISSING_MARKER)
    n_unlabelled = int(targets["in_hospital_death"].isna().sum())
    if n_unlabelled:
        logger.warning("physionet2012: %d records have no outcome (in_hospital_death NaN)", n_unlabelled)
    targets["in_hospital_death"] = _int_if_complete(targets["in_hospital_death"])
    targets.attrs["age_group_edges"] = edges
    order = ["record_id", "in_hospital_death", "gender", "age", "age_group", "icu_type", "height", "weight",
             "saps_i", "sofa", "length_of_stay", "survival"]
    return targets[order]


# ----------------------------------------------------------------------------- scaling


def scale_per_parameter(events: pd.DataFrame, clip: float = DEFAULT_CLIP) -> pd.DataFrame:
    """Robust per-parameter standardisation: ``value = clip((raw − median) / IQR, ±clip)``.

    Why robust: lab values have heavy tails and entry errors (e.g. negative Temp), so
    mean/std would be dominated by outliers. Where the IQR is 0 (near-constant
    parameters such as MechVent) the std is used, and 1 where that is 0 too. The raw
    value is kept in ``value_raw`` (read from it when present, so calling twice is
    harmless). Statistics come from ``events`` itself: pass training rows only if
    test leakage matters.
    """
    for column in ("parameter", "value"):
        if column not in events.columns:
            raise PhysioNetFormatError(f"scale_per_parameter: column {column!r} missing, has {list(events.columns)}")
    out = events.copy()
    raw = out["value_raw"] if "value_raw" in out.columns else out["value"]
    out["value_raw"] = raw.astype("float64")
    codes, names = pd.factorize(out["parameter"])
    grouped = out["value_raw"].groupby(codes)
    quartiles = grouped.quantile([0.25, 0.5, 0.75]).unstack()
    stats = pd.DataFrame({"median": quartiles[0.5], "iqr": quartiles[0.75] - quartiles[0.25], "std": grouped.std()})
    scale = stats["iqr"].where(stats["iqr"] > 0, stats["std"])
    stats["scale"] = scale.where(scale > 0, 1.0)
    median = stats["median"].to_numpy()[codes]
    deviation = out["value_raw"].to_numpy() - median
    bound = clip * stats["scale"].to_numpy()[codes]
    scaled = np.clip(deviation / stats["scale"].to_numpy()[codes], -clip, clip)
    logger.info("physionet2012: scaled %d values over %d parameters, %d clipped at ±%g",
                len(out), len(names), int((np.abs(deviation) > bound).sum()), clip)
    out["value"] = scaled.astype("float64")
    return out


# ----------------------------------------------------------------------------- public


def read_physionet(path: str | Path, show_progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the PhysioNet 2012 archive or unpacked directory → (events, targets).

    ``events``: record_id (int64), minute (int64, hh*60+mm since admission),
    parameter (str), value (float64, scaled by :func:`scale_per_parameter`),
    value_raw (float64); sorted by record_id, minute (file order within a minute).
    ``targets``: one row per record file — record_id, in_hospital_death, gender
    (0/1, NaN if -1), age, age_group (0..3 by age quartiles, cut points in
    ``targets.attrs["age_group_edges"]``), icu_type, height, weight, saps_i, sofa,
    length_of_stay (-1 → NaN), survival (raw; -1 = no recorded death).
    """
    path = Path(path)
    start = time.perf_counter()
    chunks, record_ids, outcomes = _collect(path, show_progress)
    if not record_ids:
        raise PhysioNetFormatError(
            f"no PhysioNet records found in {str(path)!r}: expected {ARCHIVE_NAME} or a directory with "
            "set-a/, set-b/ (or physionet2012/set-*/) holding '<RecordID>.txt' files and Outcomes-*.txt"
        )
    duplicated = pd.Series(record_ids).duplicated()
    if duplicated.any():
        raise PhysioNetFormatError(
            f"{str(path)!r}: record id {record_ids[int(np.argmax(duplicated))]} appears in more than one file"
        )
    rows = _parse_events(chunks)
    declared = rows.loc[rows["parameter"] == "RecordID"]
    mismatch = declared["value"].to_numpy() != declared["record_id"].to_numpy()
    if mismatch.any():
        bad = declared.loc[mismatch].iloc[0]
        raise PhysioNetFormatError(
            f"record file {int(bad['record_id'])}.txt: RecordID row says {bad['value']:g}, file name says otherwise"
        )
    events, static_mask = _split_static(rows)
    static = _static_table(rows.loc[static_mask.to_numpy()])
    targets = _targets(np.asarray(record_ids), static, outcomes)

    order = np.lexsort((events["minute"].to_numpy(), events["record_id"].to_numpy()))
    events = events.iloc[order].reset_index(drop=True)
    n_minus_one = int((events["value"] == MISSING_MARKER).sum())
    n_negative = int((events["value"] < 0).sum())
    logger.info("physionet2012: %d static descriptor rows moved to targets; events kept as they are: "
                "%d with value -1, %d negative (by parameter: %s)",
                int(static_mask.sum()), n_minus_one, n_negative,
                events.loc[events["value"] < 0, "parameter"].value_counts().to_dict())
    events = scale_per_parameter(events)
    logger.info("physionet2012: %d records, %d events, %d parameters read from %s in %.1f s",
                len(targets), len(events), events["parameter"].nunique(), path, time.perf_counter() - start)
    return events, targets
