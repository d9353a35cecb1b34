"""The neural baselines (Lightning, early stopping) on evaluate()'s protocol."""
from __future__ import annotations

import lightgbm
import numpy as np
import pandas as pd
import pytest
import torch

from ptls_meles.config import MeLESConfig
from ptls_meles.downstream import finetune
from ptls_meles.downstream.evaluate import evaluate
from ptls_meles.downstream.finetune import SequenceClassifier, labelled_clients, supervised_eval
from ptls_meles.downstream.protocol import EvaluationError, plan_cv
from ptls_meles.encoding import CategoryVocab, Encoding, NumericTransform
from ptls_meles.store import SequenceStore
from ptls_meles.train import MeLESModule, embedder_from_config

N_GROUPS = 3
VALUES = [f"m{i}" for i in range(2 * N_GROUPS + 2)]


def make_store(n_clients: int = 240, seed: int = 0) -> tuple[SequenceStore, pd.DataFrame]:
    """Client ``i`` belongs to group ``i % 3``; 85% of its events carry one of the group's two
    mcc ids (2+2g, 3+2g), the rest a random id, so the group is clearly in the categories.
    Targets: ``group`` (3 classes), ``is_zero`` (binary: group 0), clients c0..c{n-1}."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 40, n_clients)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    group = np.arange(n_clients) % N_GROUPS
    ev_group = np.repeat(group, lengths)
    n = int(offsets[-1])
    signal = 2 + 2 * ev_group + rng.integers(0, 2, n)
    noise = rng.integers(1, len(VALUES) + 2, n)
    mcc = np.where(rng.random(n) < 0.85, signal, noise).astype(np.int32)
    times = np.concatenate([np.sort(rng.random(k) * 100) for k in lengths])
    encoding = Encoding(
        client_col="client_id",
        time_col="event_time",
        time_format="float",
        categorical={"mcc": CategoryVocab(values=list(VALUES), counts=[1] * len(VALUES))},
        numeric={"amount": NumericTransform("log")},
    )
    columns = {
        "event_time": times.astype(np.float64),
        "mcc": mcc,
        "amount": rng.normal(size=n).astype(np.float32),
    }
    ids = np.array([f"c{i}" for i in range(n_clients)])
    store = SequenceStore(ids, offsets, columns, encoding)
    targets = pd.DataFrame({"client_id": ids, "group": group, "is_zero": (group == 0).astype(int)})
    return store, targets


# the GRU: these tests check the supervised / fine-tuning machinery, whose thresholds were set for it
CONFIG = MeLESConfig(encoder="gru", projection_head=0, hidden_size=16, cat_embedding_dim=4, max_events=30, embed_batch_size=128, seed=1)
FAST = dict(n_folds=2, test_size=0.2, max_epochs=3, batch_size=32, lr=0.01, show_progress=False)


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    return make_store()


def test_supervised_binary_learns_well_above_chance(data):
    store, targets = data
    rng_before = torch.get_rng_state()
    r = supervised_eval(store, targets, "is_zero", CONFIG, seed=3, **FAST)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    assert (r.task, r.metric, r.n_folds, r.target) == ("binary", "auroc", 2, "is_zero")
    assert len(r.cv_scores) == 2 and len(r.test_scores) == 2
    assert r.test_mean > 0.85 and r.cv_mean > 0.85, r.summary()
    assert all(0 <= s <= 1 for s in r.cv_scores + r.test_scores)
    assert r.n_test == 48 and r.n_train == 192 and r.join.n_used == 240
    assert r.classes == [0, 1] and r.n_features == embedder_from_config(CONFIG, store.encoding).output_size
    assert r.model == "supervised_encoder" and r.to_dict()["model"] == "supervised_encoder"
    assert r.params["encoder_lr"] == r.params["lr"] == 0.01 and r.params["max_epochs"] == 3
    assert len(r.best_epochs) == 2 and all(1 <= e <= 3 for e in r.best_epochs)
    assert f"best epoch per fold {r.best_epochs}" in r.summary()
    assert np.isfinite(r.test_interval) and "auroc" in r.summary()
    assert r.to_dict()["test_mean"] == pytest.approx(r.test_mean)


def test_supervised_multiclass_learns_and_is_deterministic(data):
    store, targets = data
    targets = targets.assign(group=targets["group"].map({0: "x", 1: "y", 2: "z"}))
    settings = {**FAST, "max_epochs": 2}
    r = supervised_eval(store, targets, "group", CONFIG, seed=5, **settings)
    assert (r.task, r.metric, r.classes) == ("multiclass", "accuracy", ["x", "y", "z"])
    assert r.test_mean > 0.6, r.summary()  # chance is 1/3
    again = supervised_eval(store, targets, "group", CONFIG, seed=5, **settings)
    assert again.cv_scores == r.cv_scores and again.test_scores == r.test_scores


class _RecordingClassifier:
    """Stands in for LightGBM: records which rows (column 0 = store position) each fold sees."""

    log: list = []

    def __init__(self, **_):
        pass

    def fit(self, X, y):
        self.log.append(("fit", X[:, 0].astype(int).tolist()))
        return self

    def predict_proba(self, X):
        self.log.append(("predict", X[:, 0].astype(int).tolist()))
        p = (X[:, 0] % 7) / 7.0
        return np.stack([1 - p, p], axis=1)

    def predict(self, X):
        self.log.append(("predict", X[:, 0].astype(int).tolist()))
        return np.zeros(len(X), dtype=int)


@pytest.mark.parametrize("target_col", ["is_zero", "group"])
def test_splits_identical_to_evaluate(data, monkeypatch, target_col):
    store, targets = data
    # a non-trivial join: shuffled target rows, unlabelled clients, unknown clients, missing clients
    t = targets.sample(frac=1.0, random_state=1).reset_index(drop=True).astype({target_col: "float"})
    t.loc[t.index[:9], target_col] = np.nan
    t = pd.concat([t.iloc[6:], pd.DataFrame({"client_id": ["ghost1", "ghost2"], target_col: [1.0, 0.0]})])
    features = pd.DataFrame({"client_id": store.client_ids, "pos": np.arange(store.n_clients, dtype=float)})

    _RecordingClassifier.log = []
    monkeypatch.setattr(lightgbm, "LGBMClassifier", _RecordingClassifier)
    evaluate(features, t, target_col, n_folds=3, test_size=0.15, seed=11)
    log = _RecordingClassifier.log
    assert [kind for kind, _ in log] == ["fit", "predict", "predict"] * 3
    lgbm_folds = [(log[i][1], log[i + 1][1], log[i + 2][1]) for i in range(0, 9, 3)]

    # the protocol reproduces the same rows ...
    clients, y_raw, report = labelled_clients(store, t, target_col)
    assert report.n_used == len(clients) == store.n_clients - 9
    plan = plan_cv(y_raw, report, target_col, n_folds=3, test_size=0.15, seed=11)
    for (fit, val, test), (fit_rows, val_rows) in zip(lgbm_folds, plan.folds):
        assert clients[fit_rows].tolist() == fit
        assert clients[val_rows].tolist() == val
        assert clients[plan.test_idx].tolist() == test

    # ... and supervised_eval trains, validates and tests on exactly those clients
    position = {cid: i for i, cid in enumerate(store.client_ids)}
    seen, tested = [], []

    def record(model, data, validation, **kw):
        seen.append((data.clients.tolist(), [position[c] for c in validation.store.client_ids]))
        validation.scores.append(0.5)
        return 0

    def predict(self, store_, batch_size=256):
        tested.append([position[c] for c in store_.client_ids])
        return np.full((store_.n_clients, self.head.out_features), 1 / self.head.out_features, np.float32)

    monkeypatch.setattr(finetune, "train_fold", record)
    monkeypatch.setattr(SequenceClassifier, "predict_proba", predict)
    r = supervised_eval(store, t, target_col, CONFIG, n_folds=3, test_size=0.15, seed=11, show_progress=False)
    assert seen == [(fit, val) for fit, val, _ in lgbm_folds]
    assert tested == [test for _, _, test in lgbm_folds]
    assert r.n_test == len(lgbm_folds[0][2]) and r.n_train == len(lgbm_folds[0][0]) + len(lgbm_folds[0][1])
    assert r.best_epochs == [1, 1, 1]


def _state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_finetune_starts_from_pretrained_and_leaves_it_alone(data, monkeypatch):
    store, targets = data
    torch.manual_seed(0)
    pretrained = MeLESModule(CONFIG.to_dict(), store.encoding.to_dict()).eval()  # as load_model returns it
    before, before_embedder = _state(pretrained), _state(pretrained.embedder)
    created = []
    real_train_fold = finetune.train_fold

    def spy(model, *args, **kwargs):
        created.append((model, _state(model.embedder)))
        return real_train_fold(model, *args, **kwargs)

    monkeypatch.setattr(finetune, "train_fold", spy)
    r = supervised_eval(store, targets, "is_zero", CONFIG, pretrained=pretrained, seed=3, **{**FAST, "max_epochs": 2})
    assert r.model == "meles_finetuned"
    assert r.params["encoder_lr"] == pytest.approx(0.001)
    assert len(created) == 2
    for model, at_start in created:
        assert model.embedder is not pretrained.embedder
        assert at_start.keys() == before_embedder.keys()  # starts from the pretrained weights
        assert all(torch.equal(at_start[k], v) for k, v in before_embedder.items())
        trained = model.embedder.state_dict()
        assert any(not torch.equal(trained[k], at_start[k]) for k in at_start)  # and was trained,
        assert not torch.equal(trained["event_encoder.numeric_norm.running_mean"],  # in training mode
                               at_start["event_encoder.numeric_norm.running_mean"])
    after = _state(pretrained)  # the pretrained module is untouched
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not pretrained.training


def test_frozen_encoder_stays_pretrained(data, monkeypatch):
    store, targets = data
    pretrained = MeLESModule(CONFIG.to_dict(), store.encoding.to_dict())
    created = []
    real_train_fold = finetune.train_fold

    def spy(model, *args, **kwargs):
        created.append(model)
        return real_train_fold(model, *args, **kwargs)

    monkeypatch.setattr(finetune, "train_fold", spy)
    settings = {**FAST, "max_epochs": 1, "freeze_epochs": 1, "test_size": 0.0}
    r = supervised_eval(store, targets, "is_zero", CONFIG, pretrained=pretrained, **settings)
    assert r.n_test == 0 and r.test_scores == [] and r.test_mean is None
    reference = pretrained.embedder.state_dict()
    for model in created:
        assert all(torch.equal(v, reference[k]) for k, v in model.embedder.state_dict().items())


def test_encoding_mismatch_is_refused(data):
    store, targets = data
    other = store.encoding.to_dict()
    other["categorical"]["mcc"]["values"] = list(reversed(VALUES))
    pretrained = MeLESModule(CONFIG.to_dict(), other)
    with pytest.raises(ValueError, match="another vocabulary for 'mcc'"):
        supervised_eval(store, targets, "is_zero", CONFIG, pretrained=pretrained, **FAST)
    with pytest.raises(ValueError, match="n_folds"):
        supervised_eval(store, targets, "is_zero", CONFIG, n_folds=1, show_progress=False)


def test_early_stopping_keeps_and_reports_the_best_epoch(data, monkeypatch):
    store, targets = data
    histories = []
    real_train_fold = finetune.train_fold

    def spy(model, data_, validation, **kwargs):
        best = real_train_fold(model, data_, validation, **kwargs)
        histories.append((list(validation.scores), best))
        return best

    monkeypatch.setattr(finetune, "train_fold", spy)
    settings = {**FAST, "max_epochs": 50, "lr": 0.05}
    r = supervised_eval(store, targets, "group", CONFIG, seed=2, patience=2, **settings)
    assert len(histories) == 2 and r.params["patience"] == 2 and r.params["max_epochs"] == 50
    for (scores, best), best_epoch, cv in zip(histories, r.best_epochs, r.cv_scores):
        assert len(scores) < 50  # stopped early ...
        assert best == int(np.argmax(scores)) and best_epoch == best + 1  # ... kept the first best epoch ...
        assert len(scores) == best + 1 + 2  # ... after exactly `patience` epochs without improvement
        assert cv == max(scores)


def test_without_patience_every_fold_runs_to_the_cap(data, monkeypatch):
    store, targets = data
    lengths = []
    real_train_fold = finetune.train_fold

    def spy(model, data_, validation, **kwargs):
        best = real_train_fold(model, data_, validation, **kwargs)
        lengths.append(len(validation.scores))
        return best

    monkeypatch.setattr(finetune, "train_fold", spy)
    r = supervised_eval(store, targets, "is_zero", CONFIG, patience=None, **{**FAST, "max_epochs": 4, "test_size": 0.0})
    assert lengths == [4, 4] and all(1 <= e <= 4 for e in r.best_epochs)
    with pytest.raises(EvaluationError, match="patience"):
        supervised_eval(store, targets, "is_zero", CONFIG, patience=0, **FAST)


def test_head_reads_standardised_features_and_scoring_leaves_their_statistics(data):
    store, _ = data
    torch.manual_seed(0)
    model = SequenceClassifier(MeLESModule(CONFIG.to_dict(), store.encoding.to_dict()).embedder, 3)
    batch = finetune.pad_segments(store.columns, np.arange(int(store.offsets[40])), store.offsets[:41])
    emb = model.embedder(batch).detach()
    # a feature scaled 10x (a max beside a mean) reaches the head with the same spread as the others
    normed = model.norm(emb * torch.linspace(0.1, 10, emb.shape[1]))
    varying = emb.std(0) > 1e-3  # (a ReLU unit may be dead on every client)
    assert varying.sum() > emb.shape[1] // 2
    assert torch.allclose(normed.std(0, unbiased=False)[varying], torch.ones(int(varying.sum())), atol=0.02)  # (BatchNorm eps)
    running = model.norm.running_mean.clone()
    assert not torch.equal(running, torch.zeros_like(running))  # training-mode calls move the statistics
    model.predict_proba(store.take(np.arange(40)))
    assert torch.equal(model.norm.running_mean, running) and model.norm.training  # scoring does not


def test_a_fold_whose_clients_leave_one_over_a_batch_still_trains(data):
    store, targets = data
    # 2 folds of 192 clients: 96 fit a fold, so batches of 95 would leave one client alone (BatchNorm needs two)
    r = supervised_eval(store, targets, "is_zero", CONFIG, **{**FAST, "batch_size": 95, "max_epochs": 1})
    assert len(r.cv_scores) == 2 and all(0.0 <= s <= 1.0 for s in r.cv_scores)
