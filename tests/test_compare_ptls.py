"""bench speed --compare-ptls: ratios only from two runs of this invocation, a plain line when ptls is missing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ptls_meles.bench import speed

# an interpreter with pytorch-lifestream 0.7.0 (a scratch venv, see the README), named by PTLS_PYTHON;
# without it the end-to-end reference test skips
PTLS_PYTHON = Path(os.environ.get("PTLS_PYTHON", "/nonexistent/ptls-python"))


def test_missing_ptls_interpreter_is_said_plainly_and_our_figures_still_come(tmp_path, capsys):
    res = speed.main(["--clients", "60", "--mean-events", "60", "--threads", "1", "--phases", "prepare",
                      "--work", str(tmp_path), "--compare-ptls", "/nonexistent/python"])
    out = capsys.readouterr().out
    assert "pytorch-lifestream is not importable with /nonexistent/python (" in out
    assert "no side-by-side figures" in out and "Traceback" not in out
    assert res["prepare"]["events"] > 0 and res["prepare"]["events_s"] > 0
    assert "| prepare events/s |" in out
    assert "ptls_reference" not in res and "| ratio |" not in out


def test_interpreter_without_ptls_is_said_plainly(tmp_path, capsys):
    """An interpreter that runs but lacks ptls: the check's own error in the line, no attempt to run."""
    no_ptls = tmp_path / "site"
    (no_ptls / "ptls").mkdir(parents=True)
    (no_ptls / "ptls" / "__init__.py").write_text("raise ImportError('ptls broken on purpose')\n")
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={no_ptls} exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    args = {"raw": str(tmp_path / "none.parquet"), "threads": 1, "train_clients": 0}
    assert speed.run_reference(str(python), args, ["prepare"], tmp_path / "ref") is None
    out = capsys.readouterr().out
    assert f"not importable with {python} (ImportError: ptls broken on purpose)" in out
    assert not (tmp_path / "ref").exists()


def test_side_by_side_ratios_are_ours_over_theirs_for_each_common_figure():
    ours = {"machine": "m", "prepare": {"events_s": 1000.0, "peak_gib": 0.5},
            "train": {"clients_s": 30.0, "events_s": 9000.0, "peak_gib": 1.5}}
    theirs = {"prepare": {"events_s": 250.0, "peak_gib": 3.0},
              "train": {"clients_s": 20.0, "events_s": 6000.0, "peak_gib": 4.5},
              "embed": {"clients_s": 60.0, "events_s": 20000.0, "peak_gib": 2.0}}  # no embed on our side: not compared
    rows = {name: (a, b, r) for name, a, b, r in speed.side_by_side(ours, theirs)}
    assert list(rows) == ["prepare events/s", "train clients/s", "train events/s (in views)", "peak RSS GiB (max of phases)"]
    assert rows["prepare events/s"] == (1000.0, 250.0, 4.0)
    assert rows["train clients/s"][2] == pytest.approx(1.5)
    assert rows["train events/s (in views)"][2] == pytest.approx(1.5)
    assert rows["peak RSS GiB (max of phases)"] == (1.5, 4.5, pytest.approx(1 / 3))  # max over phases on each side


def test_reference_script_imports_nothing_of_ptls_meles():
    """The other interpreter may lack our dependencies: loading the script must not pull ptls_meles in."""
    code = ("import runpy, sys; runpy.run_path(sys.argv[1], run_name='not_main'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ptls_meles', 'ptls', 'torch')))")
    script = Path(speed.__file__).with_name("ptls_reference.py")
    out = subprocess.run([sys.executable, "-c", code, str(script)], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(not PTLS_PYTHON.exists(), reason=f"no pytorch-lifestream interpreter at {PTLS_PYTHON} (CI has none)")
def test_reference_pipeline_gives_positive_figures_on_a_tiny_log(tmp_path):
    import pandas as pd

    from ptls_meles.datasets.synthetic import write

    if subprocess.run([str(PTLS_PYTHON), "-c", "import ptls"], capture_output=True).returncode != 0:
        pytest.skip(f"{PTLS_PYTHON} exists but cannot import ptls")
    raw = write(tmp_path / "raw", n_clients=60, seed=0, mean_events=80, with_type=True, fmt="parquet")["transactions"]
    script = Path(speed.__file__).with_name("ptls_reference.py")
    run = subprocess.run([str(PTLS_PYTHON), "-c", speed.RUN_BY_FILE, str(script), "--raw", str(raw), "--work",
                          str(tmp_path / "ref"), "--threads", "1", "--phases", "prepare,train,embed"],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    assert res["versions"]["pytorch-lifestream"] == "0.7.0"
    assert res["prepare"]["events"] == len(pd.read_parquet(raw))  # every event of the same raw file
    for phase, keys in {"prepare": ("seconds", "events_s", "peak_gib"),
                        "train": ("seconds", "clients_s", "events_s", "peak_gib"),
                        "embed": ("seconds", "clients_s", "events_s", "peak_gib")}.items():
        assert all(res[phase][k] > 0 for k in keys), (phase, res[phase])
    assert res["train"]["clients"] == res["embed"]["clients"] == 60


def test_set_reaches_the_training_phase(tmp_path, capsys):
    """``--set preset=paper`` trains the reference's recipe (last-state pooling), not the defaults."""
    from ptls_meles.api import MeLES

    speed.main(["--clients", "40", "--mean-events", "60", "--threads", "1", "--phases", "train", "--work", str(tmp_path),
                "--set", "preset=paper", "--set", "hidden_size=8"])
    assert "training settings {'preset': 'paper', 'hidden_size': 8}" in capsys.readouterr().out
    model = MeLES.load(tmp_path / "store" / "bench_model")
    assert model.module_.config.pooling == "last" and model.module_.config.hidden_size == 8
