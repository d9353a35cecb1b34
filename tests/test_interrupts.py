"""Interrupted runs: a ``kill -9`` in the middle of ``fit``, ``prepare`` or ``embed`` leaves
no partial output at the output path, and rerunning (``fit --resume``) completes — for
training, with exactly the embeddings of an uninterrupted run of the same seed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import torch

from ptls_meles import EventSchema, MeLES
from ptls_meles.prepare import prepare
from ptls_meles.store import SequenceStore
from ptls_meles.train import MeLESModule

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
SCHEMA = EventSchema("client", "day", ["mcc"], ["amount"], time_format="number")
FIT_SETS = dict(hidden_size=32, cat_embedding_dim=8, batch_size=32, max_epochs=3, num_workers=0, val_fraction=0.0,
                cnt_min=10, cnt_max=60, patience=None, seed=7, lr=1e-2, lr_step_size=1, lr_gamma=0.5)


def cli(*argv) -> list[str]:
    return [sys.executable, "-m", "ptls_meles.cli", *map(str, argv)]


def raw_events(n_clients: int, mean_len: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(mean_len // 2, mean_len * 3 // 2 + 1, n_clients)
    client = np.repeat(np.arange(n_clients), lengths)
    n = len(client)
    return pd.DataFrame({
        "client": client,
        "day": rng.integers(0, 1000, n),
        "mcc": rng.integers(0, 50, n) ** 2 % 97,
        "amount": np.round(rng.normal(0, 100, n), 2),
    })


LOGS: dict[int, Path] = {}  # pid → the log file of a started process


def start(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, cwd=REPO, env=ENV, stdout=fh, stderr=subprocess.STDOUT)
    LOGS[proc.pid] = log
    return proc


def tail(proc: subprocess.Popen) -> str:
    return LOGS[proc.pid].read_text()[-2000:]


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}: {tail(proc)}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def kill9(proc: subprocess.Popen) -> None:
    assert proc.poll() is None, "the process finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def run_ok(argv: list[str], timeout: float = 120) -> str:
    r = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def fit_store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fit_store")
    prepare(raw_events(1500, 60), SCHEMA, out=out, show_progress=False)
    return out


def test_killed_training_resumes_to_the_uninterrupted_result(fit_store, tmp_path):
    sets = [a for k, v in FIT_SETS.items() for a in ("--set", f"{k}={v}")]
    base_dir, cut_dir = tmp_path / "uninterrupted", tmp_path / "interrupted"
    baseline = start(cli("fit", fit_store, "--out", base_dir, *sets, "--threads", "1", "-q"), tmp_path / "base.log")
    victim = start(cli("fit", fit_store, "--out", cut_dir, *sets, "--threads", "1", "-q"), tmp_path / "cut.log")
    last = cut_dir / "checkpoints" / "last.ckpt"
    try:
        wait_for(last.exists, victim, 120, "the first checkpoint")
        size = -1
        while size != last.stat().st_size:  # the checkpoint is written completely, then kill mid-epoch 2
            size = last.stat().st_size
            time.sleep(0.1)
        kill9(victim)
    finally:
        if victim.poll() is None:
            victim.kill()
    interrupted_at = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    assert interrupted_at == 0, "the run was not killed during epoch 2"
    assert not (cut_dir / "model").exists()

    run_ok(cli("fit", fit_store, "--out", cut_dir, *sets, "--resume", "--threads", "1", "-q"))
    assert baseline.wait(timeout=120) == 0, tail(baseline)
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == FIT_SETS["max_epochs"] - 1

    store = SequenceStore.load(fit_store)
    resumed = MeLES.load(cut_dir / "model").transform(store).iloc[:, 1:].to_numpy()
    reference = MeLES.load(base_dir / "model").transform(store).iloc[:, 1:].to_numpy()
    assert np.isfinite(reference).all() and reference.std() > 0
    np.testing.assert_allclose(resumed, reference, rtol=0, atol=1e-6)


def test_killed_prepare_and_embed_leave_no_partial_output(tmp_path):
    raw = raw_events(100_000, 24, seed=1)
    pacsv.write_csv(pa.Table.from_pandas(raw, preserve_index=False), tmp_path / "events.csv")
    store_dir = tmp_path / "store"
    prep = cli("prepare", tmp_path / "events.csv", "--out", store_dir, "--client-col", "client", "--time-col", "day",
               "--cat", "mcc", "--num", "amount", "--time-format", "number")  # with the progress bar: it shows the run began

    victim = start(prep, tmp_path / "prep.log")
    try:
        wait_for(lambda: "prepare" in Path(tmp_path / "prep.log").read_text(), victim, 60, "prepare to start")
        time.sleep(0.3)
        kill9(victim)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert not (store_dir / "sequences.parquet").exists()
    out = run_ok(prep)
    assert f"{len(raw):,} events" in out
    store = SequenceStore.load(store_dir)
    assert store.n_events == len(raw) and store.n_clients == raw["client"].nunique()

    model = MeLES(hidden_size=16, cat_embedding_dim=4)
    torch.manual_seed(0)
    model.module_ = MeLESModule(model.config.to_dict(), store.encoding.to_dict())
    model.encoding_, model.schema_ = store.encoding, None
    model.save(tmp_path / "model")
    table = tmp_path / "emb" / "embeddings.parquet"
    embed = cli("embed", store_dir, "--model", tmp_path / "model", "--out", table, "--threads", "1", "-q")

    victim = start(embed, tmp_path / "embed.log")
    try:
        wait_for(lambda: any(table.parent.glob(f".{table.name}.tmp-*")), victim, 120, "embed to open its output")
        time.sleep(0.2)
        kill9(victim)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert not table.exists()  # only the temporary name, which readers ignore
    assert [p.name for p in table.parent.iterdir()] == [f".{table.name}.tmp-{victim.pid}"]
    run_ok(embed)
    emb = pd.read_parquet(table)
    assert len(emb) == store.n_clients
    assert np.array_equal(np.sort(emb["client_id"].to_numpy()), store.client_ids)


def test_data_loader_workers_do_not_change_training(tmp_path):
    """Batches are built from (seed, epoch, batch) alone, so 0 or 1 worker processes train identically."""
    store, _ = prepare(raw_events(120, 40, seed=2), SCHEMA, show_progress=False)
    cfg = dict(hidden_size=16, cat_embedding_dim=4, batch_size=16, max_epochs=1, val_fraction=0.0, cnt_min=5, cnt_max=30,
               patience=None, seed=3)
    a = MeLES(**cfg, num_workers=0).fit(store, show_progress=False).transform(store)
    b = MeLES(**cfg, num_workers=1).fit(store, show_progress=False).transform(store)
    assert np.array_equal(a.iloc[:, 1:].to_numpy(), b.iloc[:, 1:].to_numpy())


# small and fast epochs; lr=0 keeps the validation recall constant (fixed validation views), so
# a checkpoint that followed only improvements would stay at epoch 0
STALL_SETS = dict(hidden_size=16, cat_embedding_dim=4, batch_size=32, max_epochs=200, num_workers=0, val_fraction=0.1,
                  cnt_min=5, cnt_max=20, patience=None, seed=1, lr=0.0)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small_store")
    prepare(raw_events(300, 30, seed=4), SCHEMA, out=out, show_progress=False)
    return out


def checkpoint_epoch(path: Path) -> int | None:
    """The epoch stored in a checkpoint, or None while it does not exist yet."""
    if not path.exists():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])


def test_killed_run_resumes_at_the_last_finished_epoch(small_store, tmp_path):
    sets = [a for k, v in STALL_SETS.items() for a in ("--set", f"{k}={v}")]
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    victim = start(cli("fit", small_store, "--out", run_dir, *sets, "--threads", "1", "-q"), tmp_path / "fit.log")
    try:
        wait_for(lambda: (checkpoint_epoch(last) or 0) >= 2, victim, 180, "last.ckpt of epoch 2")
        kill9(victim)
    finally:
        if victim.poll() is None:
            victim.kill()
    k = checkpoint_epoch(last)  # whole: checkpoints are renamed into place, never half-written
    assert k >= 2
    run_ok(cli("fit", small_store, "--out", run_dir, *sets, "--set", f"max_epochs={k + 3}", "--resume", "--threads", "1", "-q"))
    resumed = pd.read_csv(next((run_dir / "logs").glob("resumed-*/metrics.csv")))
    assert sorted(resumed["epoch"].dropna().astype(int).unique().tolist()) == [k + 1, k + 2]
    assert checkpoint_epoch(last) == k + 2


def test_sigterm_stops_training_like_ctrl_c(small_store, tmp_path):
    """SIGTERM to the process group (a terminal, ``timeout``, a scheduler), DataLoader workers
    included: Lightning's graceful shutdown and exit code 1, no traceback, the checkpoint kept."""
    sets = [a for k, v in {**STALL_SETS, "num_workers": 1}.items() for a in ("--set", f"{k}={v}")]
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    with open(tmp_path / "fit.log", "w") as fh:
        proc = subprocess.Popen(cli("fit", small_store, "--out", run_dir, *sets, "--threads", "1", "-q"), cwd=REPO, env=ENV,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    LOGS[proc.pid] = tmp_path / "fit.log"
    try:
        wait_for(last.exists, proc, 180, "the first checkpoint")
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 1, tail(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "fit.log").read_text()
    assert "Traceback" not in log and "graceful shutdown" in log, log[-3000:]
    assert checkpoint_epoch(last) >= 0
