"""PhysioNet 2012 reader: a tiny hand-made archive with known rows, and the real archive."""
from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ptls_meles.datasets.physionet import (
    PhysioNetFormatError,
    age_groups,
    read_physionet,
    scale_per_parameter,
)

REAL_ARCHIVE = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "physionet2012"

RECORDS = {
    # gender -1 (missing), height -1, two Weight rows at 00:00: the first is the descriptor
    "set-a/100001.txt": (
        "Time,Parameter,Value\n"
        "00:00,RecordID,100001\n00:00,Age,40\n00:00,Gender,-1\n00:00,Height,-1\n"
        "00:00,ICUType,2\n00:00,Weight,80\n00:00,Weight,81\n"
        "00:07,HR,60\n00:07,GCS,15\n01:30,HR,70\n48:00,Weight,79.5\n"
    ),
    # descriptors interleaved with events (as in ~190 real files), CRLF line ends
    "set-a/100002.txt": (
        "Time,Parameter,Value\r\n"
        "00:00,RecordID,100002\r\n00:00,Age,60\r\n00:00,HR,80\r\n00:00,Gender,1\r\n"
        "00:00,Height,175.3\r\n00:00,ICUType,4\r\n00:00,Weight,-1\r\n"
        "12:05,HR,100\r\n12:05,MechVent,1\r\n"
    ),
    "set-b/100003.txt": (
        "Time,Parameter,Value\n"
        "00:00,RecordID,100003\n00:00,Age,80\n00:00,Gender,0\n00:00,Height,160\n"
        "00:00,ICUType,1\n00:00,Weight,55\n"
        "02:00,MechVent,1\n02:00,Temp,-17.8"  # no trailing newline
    ),
}
OUTCOMES = {
    "Outcomes-a.txt": "RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death\n"
    "100001,12,3,5,-1,0\n100002,-1,-1,9,7,1\n",
    "Outcomes-b.txt": "RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death\n100003,20,8,2,2,1\n",
}


def _write_fake_archive(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, text in {**RECORDS, **OUTCOMES}.items():
            data = text.encode()
            info = tarfile.TarInfo(f"physionet2012/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def fake(tmp_path):
    return read_physionet(_write_fake_archive(tmp_path / "fake.tar.gz"), show_progress=False)


def test_events_parsed_with_minutes_and_without_static_rows(fake):
    events, _ = fake
    assert events["record_id"].dtype == np.int64
    assert events["minute"].dtype == np.int64
    got = list(events[["record_id", "minute", "parameter", "value_raw"]].itertuples(index=False, name=None))
    assert got == [
        (100001, 0, "Weight", 81.0),  # second Weight at 00:00 is an event
        (100001, 7, "HR", 60.0),
        (100001, 7, "GCS", 15.0),
        (100001, 90, "HR", 70.0),
        (100001, 2880, "Weight", 79.5),
        (100002, 0, "HR", 80.0),
        (100002, 725, "HR", 100.0),
        (100002, 725, "MechVent", 1.0),
        (100003, 120, "MechVent", 1.0),
        (100003, 120, "Temp", -17.8),  # event values are kept as they are
    ]


def test_static_rows_go_to_targets(fake):
    _, targets = fake
    assert list(targets["record_id"]) == [100001, 100002, 100003]
    assert list(targets["in_hospital_death"]) == [0, 1, 1]
    assert targets["in_hospital_death"].dtype == np.int64
    assert targets["gender"].isna().tolist() == [True, False, False]  # -1 → NaN
    assert targets["gender"].iloc[1:].tolist() == [1.0, 0.0]
    assert targets["age"].tolist() == [40.0, 60.0, 80.0]
    assert targets["icu_type"].tolist() == [2, 4, 1]
    np.testing.assert_array_equal(targets["height"], [np.nan, 175.3, 160.0])
    np.testing.assert_array_equal(targets["weight"], [80.0, np.nan, 55.0])
    np.testing.assert_array_equal(targets["saps_i"], [12.0, np.nan, 20.0])
    np.testing.assert_array_equal(targets["sofa"], [3.0, np.nan, 8.0])
    assert targets["survival"].tolist() == [-1.0, 7.0, 2.0]  # -1 = no recorded death, kept
    # ages 40, 60, 80 → quartiles 50, 60, 70; bins are right-open
    assert targets.attrs["age_group_edges"] == (50.0, 60.0, 70.0)
    assert targets["age_group"].tolist() == [0, 2, 3]


def test_scaling_is_per_parameter(fake):
    events, _ = fake
    by = events.set_index(["record_id", "minute", "parameter"])["value"]
    # HR raw 60, 70, 80, 100: median 75, quartiles 67.5 and 85 → IQR 17.5
    assert by[(100001, 7, "HR")] == pytest.approx((60 - 75) / 17.5)
    assert by[(100002, 725, "HR")] == pytest.approx((100 - 75) / 17.5)
    # Weight raw 81, 79.5: median 80.25, IQR 0.75
    assert by[(100001, 0, "Weight")] == pytest.approx(0.75 / 0.75)
    # single or constant values: IQR 0 and std 0/NaN → scale 1 → 0
    assert by[(100002, 725, "MechVent")] == 0.0
    assert by[(100003, 120, "Temp")] == 0.0


def test_scale_per_parameter_fallbacks_clip_and_idempotence():
    events = pd.DataFrame(
        {
            "parameter": ["A"] * 6 + ["B"] * 5,
            "value": [1.0, 1, 1, 1, 1, 5] + [0.0, 1, 2, 3, 1000],
        }
    )
    scaled = scale_per_parameter(events, clip=10.0)
    # A: IQR 0 → std of [1,1,1,1,1,5] (ddof 1)
    std_a = np.std([1, 1, 1, 1, 1, 5], ddof=1)
    np.testing.assert_allclose(scaled["value"].iloc[:6], (np.array([1, 1, 1, 1, 1, 5]) - 1) / std_a)
    # B: median 2, IQR 3 - 1 = 2; 1000 clipped to +10
    np.testing.assert_allclose(scaled["value"].iloc[6:], [-1.0, -0.5, 0.0, 0.5, 10.0])
    assert scaled["value_raw"].tolist() == events["value"].tolist()
    again = scale_per_parameter(scaled)
    np.testing.assert_allclose(again["value"], scaled["value"])
    assert events["value"].iloc[-1] == 1000.0  # input not modified


def test_age_groups_by_quartiles():
    groups, edges = age_groups(pd.Series(np.arange(1.0, 9.0)))
    assert edges == (2.75, 4.5, 6.25)
    assert groups.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_directory_reads_like_archive(tmp_path, fake):
    archive = _write_fake_archive(tmp_path / "fake.tar.gz")
    with tarfile.open(archive) as handle:
        handle.extractall(tmp_path / "unpacked", filter="data")
    for root in (tmp_path / "unpacked", tmp_path / "unpacked" / "physionet2012"):
        events, targets = read_physionet(root, show_progress=False)
        pd.testing.assert_frame_equal(events, fake[0])
        pd.testing.assert_frame_equal(targets, fake[1])


def test_no_records_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no PhysioNet records found in .*empty"):
        read_physionet(tmp_path / "empty", show_progress=False)
    with pytest.raises(PhysioNetFormatError, match="does not exist"):
        read_physionet(tmp_path / "missing.tar.gz", show_progress=False)
    bad = tmp_path / "bad"
    (bad / "set-a").mkdir(parents=True)
    (bad / "set-a" / "abc.txt").write_text("Time,Parameter,Value\n00:00,HR,1\n")
    with pytest.raises(PhysioNetFormatError, match="abc.txt"):
        read_physionet(bad, show_progress=False)


@pytest.mark.skipif(not (REAL_ARCHIVE / "physionet2012_setab.tar.gz").is_file(), reason="real archive absent")
def test_real_archive():
    start = time.perf_counter()
    events, targets = read_physionet(REAL_ARCHIVE / "physionet2012_setab.tar.gz", show_progress=False)
    elapsed = time.perf_counter() - start
    print(f"physionet2012 parsed in {elapsed:.1f} s")
    assert elapsed < 20
    assert len(targets) == 8000 and targets["record_id"].is_unique
    assert targets["in_hospital_death"].sum() == 554 + 568
    assert targets["age_group"].value_counts().sort_index().tolist() == [1963, 1938, 1933, 2166]
    assert targets.attrs["age_group_edges"] == (53.0, 67.0, 78.0)
    assert targets["gender"].isna().sum() == 8
    # 37 time-varying parameters (incl. Weight) + 5 static-only descriptors = 42 names
    assert events["parameter"].nunique() == 37
    assert "RecordID" not in set(events["parameter"]) and "Age" not in set(events["parameter"])
    # all raw rows: events + 6 descriptor rows per record
    assert len(events) + 6 * len(targets) == 3_293_708
    assert events["minute"].between(0, 48 * 60).all()
    assert events["value"].abs().max() <= 10
