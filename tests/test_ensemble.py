"""Several trained models read side by side: MeLESEnsemble, embed --model A B, the SideBySide embedder."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from conftest import synthetic_events_and_store
from ptls_meles import MeLES, MeLESEnsemble
from ptls_meles.embed import MAX_BATCH_ATTENTION, _cost_fn
from ptls_meles.nn.side_by_side import SideBySide
from ptls_meles.prepare import prepare

SMALL = dict(hidden_size=16, cat_embedding_dim=8, batch_size=16, max_epochs=1, num_workers=0, val_fraction=0.2,
             cnt_min=5, cnt_max=30, lr=1e-2, patience=None, category_pooling=4, category_share_pooling=8)


@pytest.fixture(scope="module")
def data():
    return synthetic_events_and_store(n_clients=60, seed=5, mean_events=50)


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Two seeds of one setting, each trained and saved on its own (as two `fit` runs side by side)."""
    paths = []
    for seed in (42, 7):
        model = MeLES(schema=data[2], seed=seed, **SMALL).fit(data[1], show_progress=False)
        paths.append(model.save(tmp_path_factory.mktemp(f"seed{seed}")))
    return paths


def test_side_by_side_embedding_is_each_models_embedding_in_order(runs, data):
    events, store, _ = data
    members = [MeLES.load(p) for p in runs]
    alone = [m.transform(store) for m in members]
    both = MeLESEnsemble(members).transform(store)
    dim = alone[0].shape[1] - 1
    assert list(both.columns) == ["client_id", *[f"emb_{i:03d}" for i in range(2 * dim)]]
    np.testing.assert_array_equal(both["client_id"].to_numpy(), alone[0]["client_id"].to_numpy())
    np.testing.assert_allclose(both.iloc[:, 1:1 + dim].to_numpy(), alone[0].iloc[:, 1:].to_numpy(), atol=1e-6)
    np.testing.assert_allclose(both.iloc[:, 1 + dim:].to_numpy(), alone[1].iloc[:, 1:].to_numpy(), atol=1e-6)
    assert not np.allclose(alone[0].iloc[:, 1:].to_numpy(), alone[1].iloc[:, 1:].to_numpy())  # two seeds, two models
    # a list of per-client frames: row i is X[i], as for one model
    frames = [g for _, g in events.groupby("client_id")][::-1][:5]
    rows = MeLESEnsemble(members).transform(frames)
    assert list(rows.index) == [f["client_id"].iloc[0] for f in frames]
    np.testing.assert_allclose(rows.iloc[:, :dim].to_numpy(), members[0].transform(frames).to_numpy(), atol=1e-5)


def test_ensemble_writes_the_same_table_with_every_members_config(runs, data, tmp_path):
    store = data[1]
    ensemble = MeLESEnsemble.load(runs)
    path = tmp_path / "both.parquet"
    stats = ensemble.write_embeddings(store, path, show_progress=False)
    table = pq.read_table(path)
    assert stats["dim"] == table.num_columns - 1 == ensemble.transform(store).shape[1] - 1
    meta = json.loads(table.schema.metadata[b"ptls_meles"])
    assert [c["seed"] for c in meta["configs"]] == [42, 7]
    written = table.to_pandas().set_index("client_id").loc[store.client_ids]
    np.testing.assert_allclose(written.to_numpy(), ensemble.transform(store).set_index("client_id").to_numpy(), atol=1e-6)


def test_ensemble_fit_trains_every_member_on_one_store(data):
    store = data[1]
    ensemble = MeLESEnsemble([MeLES(seed=1, **SMALL), MeLES(seed=2, **SMALL)]).fit(store, show_progress=False)
    assert all(hasattr(m, "module_") for m in ensemble.models)
    table = ensemble.transform(store)
    assert table.shape == (store.n_clients, 1 + 2 * ensemble.models[0].module_.embedder.output_size)


def test_ensemble_refuses_members_that_do_not_fit_together(runs, data):
    events = data[0]
    first = MeLES.load(runs[0])
    with pytest.raises(ValueError, match="two or more MeLES models"):
        MeLESEnsemble([first]).transform(events)
    other_store, _ = prepare(events[events["small_group"] != events["small_group"].iloc[0]], data[2], show_progress=False)
    stranger = MeLES(**SMALL).fit(other_store, show_progress=False)
    with pytest.raises(ValueError, match="model 1 was trained on another encoding"):
        MeLESEnsemble([first, stranger]).transform(events)
    shorter = MeLES.load(runs[1])
    shorter.module_.config.max_events = 10
    with pytest.raises(ValueError, match="model 1 embeds with"):
        MeLESEnsemble([first, shorter]).transform(events)
    with pytest.raises(RuntimeError, match="not fitted"):
        MeLESEnsemble([first, MeLES(**SMALL)]).transform(events)


def test_cli_embed_reads_several_models_side_by_side(runs, data, tmp_path, capsys):
    store = data[1]
    from ptls_meles.cli import main

    store.save(tmp_path / "store")
    main(["embed", str(tmp_path / "store"), "--model", str(runs[0]), str(runs[1]), "--out", str(tmp_path / "e.parquet"), "--quiet"])
    dim = MeLES.load(runs[0]).module_.embedder.output_size
    assert f"({2 * dim} dims)" in capsys.readouterr().out
    assert pq.read_table(tmp_path / "e.parquet").num_columns == 1 + 2 * dim
    with pytest.raises(SystemExit, match="spark reads one model"):
        main(["embed", str(tmp_path / "store"), "--model", str(runs[0]), str(runs[1]), "--out", str(tmp_path / "s.parquet"),
              "--engine", "spark"])


def test_a_transformer_member_sets_the_attention_budget():
    class Member(torch.nn.Module):
        output_size = 3

        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.seq_encoder = inner

    from ptls_meles.nn.seq_encoder import TransformerSeqEncoder

    rnn, transformer = Member(torch.nn.Linear(2, 2)), Member(TransformerSeqEncoder(8, d_model=8))
    assert _cost_fn(SideBySide([rnn, rnn]))(1, 20_000)  # events budget: one long client fits
    assert not _cost_fn(SideBySide([rnn, transformer]))(1, int(MAX_BATCH_ATTENTION ** 0.5) + 1)
    with pytest.raises(ValueError, match="at least two"):
        SideBySide([rnn])
