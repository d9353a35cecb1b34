"""Training, embedding and the API end to end on a small synthetic log."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import synthetic_events_and_store
from ptls_meles import EventSchema, MeLES
from ptls_meles.embed import embed_frame
from ptls_meles.prepare import prepare
from ptls_meles.train import load_model

SMALL = dict(hidden_size=24, cat_embedding_dim=16, batch_size=16, max_epochs=3, num_workers=0, val_fraction=0.2,
             cnt_min=5, cnt_max=30, lr=1e-2, patience=None)


@pytest.fixture(scope="module")
def data():
    return synthetic_events_and_store(n_clients=120, seed=3, mean_events=60)


@pytest.fixture(scope="module")
def events(data) -> pd.DataFrame:
    return data[0]


@pytest.fixture(scope="module")
def store(data):
    return data[1]


@pytest.fixture(scope="module")
def fitted(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    model = MeLES(**SMALL).fit(store, out_dir=out, show_progress=False)
    return model, out


def test_training_beats_chance_and_logs(fitted):
    model, out = fitted
    metrics = pd.read_csv(out / "logs" / "metrics.csv")
    recall = metrics["val_recall"].dropna().to_numpy()
    n_val_views = 24 * 5
    chance = 4 / (n_val_views - 1)
    assert len(recall) == 3
    assert recall.max() > 3 * chance, recall
    assert (out / "checkpoints" / "last.ckpt").exists()
    assert metrics["loss_epoch"].dropna().iloc[-1] < metrics["loss_epoch"].dropna().iloc[0]


def test_checkpoint_carries_config_and_encoding_and_loads_weights_only(fitted, store):
    model, out = fitted
    module = load_model(out / "checkpoints" / "last.ckpt")
    assert module.config.hidden_size == SMALL["hidden_size"]
    assert module.encoding.categorical["small_group"].values == store.encoding.categorical["small_group"].values


def test_save_load_round_trip_gives_identical_embeddings(fitted, store, tmp_path, events):
    model, _ = fitted
    before = model.transform(store)
    model.save(tmp_path / "m")
    again = MeLES.load(tmp_path / "m")
    after = again.transform(store)
    pd.testing.assert_frame_equal(before, after)
    # raw events are encoded with the saved encoding and give the same table
    raw = again.transform(events)
    np.testing.assert_allclose(raw.iloc[:, 1:].to_numpy(), before.iloc[:, 1:].to_numpy(), atol=1e-6)
    assert list(before.columns[:3]) == ["client_id", "emb_000", "emb_001"]
    assert len(before) == store.n_clients


def test_embedding_does_not_depend_on_batch_company(fitted, store):
    model, _ = fitted
    full = embed_frame(model.module_.embedder, store, batch_size=64, show_progress=False)
    alone = embed_frame(model.module_.embedder, store.take(np.array([5])), batch_size=1, show_progress=False)
    np.testing.assert_allclose(alone.iloc[0, 1:].to_numpy(float), full.iloc[5, 1:].to_numpy(float), atol=1e-5)
    odd = embed_frame(model.module_.embedder, store, batch_size=7, show_progress=False)
    np.testing.assert_allclose(odd.iloc[:, 1:].to_numpy(), full.iloc[:, 1:].to_numpy(), atol=1e-5)


def test_max_events_uses_the_last_events(fitted, store):
    model, _ = fitted
    emb = model.module_.embedder
    last10 = embed_frame(emb, store, max_events=10, show_progress=False)
    i = int(np.argmax(store.lengths))
    a, b = store.offsets[i], store.offsets[i + 1]
    cut = store.take(np.array([i]))
    cut.columns = {k: v[-10:] for k, v in cut.columns.items()}
    cut.offsets = np.array([0, 10])
    alone = embed_frame(emb, cut, show_progress=False)
    assert b - a > 10
    np.testing.assert_allclose(alone.iloc[0, 1:].to_numpy(float), last10.iloc[i, 1:].to_numpy(float), atol=1e-5)


def test_training_head_normalises_and_the_table_stays_raw(fitted, store, monkeypatch):
    import torch
    from torch.nn.functional import normalize

    from ptls_meles.batch import pad_segments
    from ptls_meles.datamodule import ViewBatches
    from ptls_meles.train import AUX_REFERENCE_STEPS

    module = fitted[0].module_
    padded, labels = ViewBatches(store, np.arange(16), module.config)[(0, 0)]
    with torch.no_grad():
        raw = module.embedder(padded)
        assert not torch.allclose(raw.norm(dim=1), torch.ones(len(raw)), atol=1e-3)
        module._val.clear()
        module.validation_step((padded, labels), 0)
        np.testing.assert_allclose(module._val.pop()[0].norm(dim=1).numpy(), 1.0, atol=1e-5)
        unit = normalize(raw, dim=-1)
        space = module.metric_space(raw)  # the projection head's output where there is one, else unit
        np.testing.assert_allclose(space.norm(dim=1).numpy(), 1.0, atol=1e-5)
        expected = module.loss_fn(space, labels)
        if module.config.aux_relative:  # the reference frozen, so the expected step reads the same one
            steps = module.aux_reference_steps.clone()
            module.aux_reference_steps.fill_(AUX_REFERENCE_STEPS)
        if module.view_stats is not None:
            stats = module.relative_to_start({"view_stats_loss": module.view_stats(unit, padded, labels)})
            expected = expected + module.config.aux_weight * stats["view_stats_loss"]
        monkeypatch.setattr(module, "log", lambda *a, **k: None)  # no Trainer attached
        assert torch.allclose(module.training_step((padded, labels), 0), expected)
        if module.config.aux_relative:
            module.aux_reference_steps.copy_(steps)
    table = embed_frame(module.embedder, store.take(np.arange(16)), show_progress=False)
    one = store.take(np.array([3]))
    with torch.no_grad():
        direct = module.embedder(pad_segments(one.columns, np.arange(one.n_events), one.offsets))[0].numpy()
    np.testing.assert_allclose(table.iloc[3, 1:].to_numpy(float), direct, atol=1e-5)  # embed writes the raw vector


def test_write_embeddings_streams_a_parquet_table_with_metadata(fitted, store, tmp_path):
    model, _ = fitted
    path = tmp_path / "emb.parquet"
    stats = model.write_embeddings(store, path, show_progress=False)
    table = pq.read_table(path)
    assert stats["clients"] == table.num_rows == store.n_clients
    meta = json.loads(table.schema.metadata[b"ptls_meles"])
    assert meta["config"]["hidden_size"] == SMALL["hidden_size"]
    assert "small_group" in meta["encoding"]["categorical"]
    df = table.to_pandas().set_index("client_id").loc[store.client_ids]
    ref = model.transform(store).set_index("client_id")
    np.testing.assert_allclose(df.to_numpy(), ref.to_numpy(), atol=1e-6)
    assert not list(tmp_path.glob(".*tmp*"))


def test_same_seed_gives_bitwise_identical_training(store):
    cfg = {**SMALL, "max_epochs": 1, "val_fraction": 0.0}
    a = MeLES(**cfg).fit(store, show_progress=False).transform(store)
    b = MeLES(**cfg).fit(store, show_progress=False).transform(store)
    assert np.array_equal(a.iloc[:, 1:].to_numpy(), b.iloc[:, 1:].to_numpy())


@pytest.mark.parametrize("encoder,split,loss,miner", [
    ("lstm", "samples", "triplet", "random"),
    ("transformer", "disjoint", "binomial_deviance", "distance_weighted"),
    ("gru", "slices", "histogram", "all"),
    ("gru", "slices", "margin", "hard"),
    ("bag", "slices", "contrastive", "hard"),
])
def test_every_component_trains(store, encoder, split, loss, miner):
    cfg = {**SMALL, "max_epochs": 1, "encoder": encoder, "split": split, "loss": loss, "miner": miner, "val_fraction": 0.0}
    if encoder == "transformer":
        cfg["encoder_kwargs"] = {"nhead": 2, "dim_feedforward": 32}
    model = MeLES(**cfg).fit(store, show_progress=False)
    emb = model.transform(store)
    assert np.isfinite(emb.iloc[:, 1:].to_numpy()).all()
    assert emb.iloc[:, 1:].to_numpy().std(axis=0).mean() > 0


def test_resume_continues_from_last_checkpoint(store, tmp_path):
    cfg = {**SMALL, "max_epochs": 2, "val_fraction": 0.0}
    full = MeLES(**cfg).fit(store, out_dir=tmp_path / "full", show_progress=False).transform(store)
    MeLES(**{**cfg, "max_epochs": 1}).fit(store, out_dir=tmp_path / "cut", show_progress=False)
    resumed = MeLES(**cfg).fit(store, out_dir=tmp_path / "cut", resume=True, show_progress=False).transform(store)
    np.testing.assert_allclose(resumed.iloc[:, 1:].to_numpy(), full.iloc[:, 1:].to_numpy(), atol=1e-6)


def test_errors_are_clear(store):
    with pytest.raises(TypeError, match="unknown MeLES setting"):
        MeLES(hidden=3)
    with pytest.raises(RuntimeError, match="not fitted"):
        MeLES().transform(store)
    with pytest.raises(ValueError, match="schema"):
        MeLES(**SMALL).fit(pd.DataFrame({"a": [1]}))
    with pytest.raises(ValueError, match="split"):
        MeLES(**{**SMALL, "split": "nope", "max_epochs": 1}).fit(store, show_progress=False)


def test_length_sorted_batches_respect_the_work_budget():
    from ptls_meles.embed import _length_sorted_batches

    take = np.array([5, 1000, 3, 1000, 400, 2, 7, 999])
    order = np.argsort(take, kind="stable")
    batches = list(_length_sorted_batches(order, take, batch_size=4, fits=lambda n, t: n * t <= 2000))
    assert np.array_equal(np.concatenate(batches), order)  # every client once, in length order
    assert all(len(b) <= 4 for b in batches)
    assert all(len(b) == 1 or len(b) * take[b].max() <= 2000 for b in batches)
    assert [len(b) for b in batches] == [4, 2, 2]  # short clients together, long ones in halves


def test_chunks_cut_each_window_evenly_and_chunked_embedding_is_the_mean_of_the_chunks():
    import torch
    from conftest import events_frame
    from ptls_meles.config import MeLESConfig
    from ptls_meles.embed import chunk_segments
    from ptls_meles.store import SequenceStore
    from ptls_meles.train import MeLESModule

    starts, lengths, owner = chunk_segments(np.array([0, 10, 17]), np.array([10, 7, 3]), 4)
    # 10 events → 3 chunks (3, 3, 4), 7 → 2 chunks (3, 4), 3 → 1 chunk
    assert starts.tolist() == [0, 3, 6, 10, 13, 17] and lengths.tolist() == [3, 3, 4, 3, 4, 3]
    assert owner.tolist() == [0, 0, 0, 1, 1, 2]

    torch.manual_seed(0)
    tx = events_frame(n_clients=12, max_len=40, seed=3)
    store, _ = prepare(tx, EventSchema("client", "day", ["mcc"], ["amount"], time_format="number"), show_progress=False)
    embedder = MeLESModule(MeLESConfig(hidden_size=8), store.encoding).embedder
    chunked = embed_frame(embedder, store, max_events=30, chunk=8, show_progress=False)
    # by hand: client 0's last 30 events, cut in chunks, each embedded alone, averaged
    n = min(int(store.lengths[0]), 30)
    c_starts, c_lengths, _ = chunk_segments(np.array([store.offsets[1] - n]), np.array([n]), 8)
    offsets = np.concatenate([[0], np.cumsum(c_lengths)])
    index = np.concatenate([np.arange(s, s + l) for s, l in zip(c_starts, c_lengths)])
    pieces = SequenceStore(client_ids=np.arange(len(c_lengths)), offsets=offsets,
                           columns={k: v[index] for k, v in store.columns.items()}, encoding=store.encoding)
    by_hand = embed_frame(embedder, pieces, show_progress=False).drop(columns="client_id").to_numpy().mean(0)
    assert np.allclose(chunked.iloc[0, 1:].to_numpy(dtype=float), by_hand, atol=1e-5)
    whole = embed_frame(embedder, store, max_events=30, show_progress=False)
    assert not np.allclose(whole.iloc[0, 1:].to_numpy(dtype=float), by_hand, atol=1e-3)  # chunking changes the vector


def test_training_silences_lightning_noise_only_while_it_runs(tmp_path):
    """Importing ``train`` leaves the process's warning filters alone; a fit shows neither
    Lightning's advertising tip nor its internal deprecation, and restores the filters."""
    import subprocess
    import sys

    script = """
import logging, warnings
from ptls_meles.train import fit
from ptls_meles.config import MeLESConfig
from ptls_meles.datasets.synthetic import generate
from ptls_meles.prepare import prepare
from ptls_meles import EventSchema
ours = lambda: [f for f in warnings.filters if f[1] is not None and "LeafSpec" in f[1].pattern]
rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
assert not ours() and not rank_zero.filters, "importing train changed the process's warning filters"
before = list(warnings.filters)
tx, _ = generate(n_clients=24, seed=1, mean_events=50)
store, _ = prepare(tx, EventSchema("client_id", "trans_date", ["small_group"], ["amount_rur"], time_format="number"), show_progress=False)
fit(store, MeLESConfig(hidden_size=8, cat_embedding_dim=4, batch_size=8, max_epochs=1, num_workers=0, val_fraction=0.0,
                       cnt_min=5, cnt_max=20, patience=None), show_progress=False)
assert warnings.filters == before and not rank_zero.filters, "fit left filters behind"
print("done")
"""
    import os

    env = {**os.environ, "PYTHONWARNINGS": "default"}  # show every warning that is not filtered on purpose
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "done" in out.stdout
    assert "litlogger" not in out.stderr + out.stdout and "LeafSpec" not in out.stderr + out.stdout
