"""Distributed training: two CPU processes (Lightning ``ddp``, gloo) on a tiny store.

The training runs in a subprocess script, as ``torchrun`` or a cluster launcher would run
it: Lightning's ``ddp`` strategy re-launches the script once per extra process. The store
has 5 batches per epoch for 2 processes, the case that used to fail: one process had a
third batch and waited in the gradient all-reduce for a peer that had finished (a hang,
or with gloo a "Connection closed by peer" crash).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path


from ptls_meles.datamodule import EpochBatchSampler

TESTS = Path(__file__).resolve().parent
N_CLIENTS, BATCH, EPOCHS = 40, 8, 2  # 5 batches per epoch: odd, for 2 processes

SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys
    from pathlib import Path
    import numpy as np
    import torch

    sys.path.insert(0, {tests!r})
    from conftest import store_from_lengths
    from ptls_meles import datamodule as data_module
    from ptls_meles.config import MeLESConfig
    from ptls_meles.embed import embed_frame
    from ptls_meles.encoding import Encoding, NumericTransform
    from ptls_meles.train import fit

    torch.set_num_threads(1)
    out = Path(sys.argv[1])

    # record which clients this process's training batches hold (store positions), per epoch
    seen, build = {{}}, data_module.ViewBatches.__getitem__
    def recording(self, key):
        epoch, b = key
        if self.fixed_epoch is None:
            seen.setdefault(int(epoch), []).append([int(c) for c in self._epoch_plan(epoch)[b]])
        return build(self, key)
    data_module.ViewBatches.__getitem__ = recording

    store = store_from_lengths(np.random.default_rng(0).integers(30, 60, {n}))
    store.encoding = Encoding("client", "event_time", "number",
                              numeric={{"amount": NumericTransform("identity"), "pos": NumericTransform("identity")}})
    cfg = MeLESConfig(hidden_size=16, pooling="last", batch_size={batch}, split_count=2, cnt_min=5, cnt_max=20, max_epochs={epochs},
                      val_fraction=0.0, num_workers=0, patience=None, max_events=64)
    module = fit(store, cfg, accelerator="cpu", devices=2, strategy="ddp", show_progress=False)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    params = torch.cat([p.detach().flatten() for p in module.parameters()]).double()
    result = {{"rank": rank, "seen": seen, "params_sum": float(params.sum()), "params_abs": float(params.abs().sum())}}
    if rank == 0:
        emb = embed_frame(module.embedder, store, show_progress=False)
        result["emb_shape"] = list(emb.shape)
        result["emb_finite"] = bool(np.isfinite(emb.iloc[:, 1:].to_numpy()).all())
        result["emb_distinct"] = int(len(np.unique(emb.iloc[:, 1:].to_numpy().round(5), axis=0)))
    (out / f"rank{{rank}}.json").write_text(json.dumps(result))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sampler_gives_every_rank_the_same_disjoint_share():
    for n_batches, world in ((5, 2), (7, 3), (8, 2), (1, 2), (2, 3)):
        shards = [EpochBatchSampler(n_batches, world, r) for r in range(world)]
        counts = {len(s) for s in shards}
        assert len(counts) == 1, (n_batches, world, counts)  # same number of steps on every rank
        keys = [[b for _, b in s] for s in shards]
        assert [len(k) for k in keys] == [len(s) for s in shards]
        flat = [b for k in keys for b in k]
        if n_batches >= world:
            assert len(set(flat)) == len(flat) == n_batches - n_batches % world  # disjoint; remainder left out
            assert set(flat) == set(range(n_batches - n_batches % world))
        else:
            assert counts == {1} and set(flat) == set(range(n_batches))  # fewer batches than ranks: shared
    assert list(EpochBatchSampler(3)) == [(0, 0), (0, 1), (0, 2)]  # one process: every batch


def test_ddp_two_cpu_processes_train_on_disjoint_clients(tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), n=N_CLIENTS, batch=BATCH, epochs=EPOCHS))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env, cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and the process Lightning started for rank 1
        output, _ = proc.communicate()
        raise AssertionError(f"DDP training did not finish (hang?):\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    # training completed on both processes, and they ended with the same weights (synchronised gradients)
    assert ranks[0]["params_sum"] == ranks[1]["params_sum"] and ranks[0]["params_abs"] == ranks[1]["params_abs"]
    assert ranks[0]["emb_shape"] == [N_CLIENTS, 1 + 16]
    assert ranks[0]["emb_finite"] and ranks[0]["emb_distinct"] > N_CLIENTS // 2

    n_batches = N_CLIENTS // BATCH
    for epoch in range(EPOCHS):
        batches = [r["seen"][str(epoch)] for r in ranks]
        assert len(batches[0]) == len(batches[1]) == n_batches // 2  # same step count, remainder batch left out
        clients = [{c for b in bs for c in b} for bs in batches]
        assert clients[0] and clients[1] and not clients[0] & clients[1]  # disjoint clients per epoch
        assert len(clients[0] | clients[1]) == (n_batches - n_batches % 2) * BATCH
        assert all(0 <= c < N_CLIENTS for c in clients[0] | clients[1])
    assert ranks[0]["seen"]["0"] != ranks[0]["seen"]["1"]  # a new client order each epoch
