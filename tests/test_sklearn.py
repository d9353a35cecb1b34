"""ptls_meles.MeLES follows scikit-learn's estimator contract: clone, set_params, Pipeline, GridSearchCV."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.utils.estimator_checks import (
    check_get_params_invariance,
    check_no_attributes_set_in_init,
    check_parameters_default_constructible,
    check_set_params,
)

from ptls_meles import EventSchema, MeLES
from ptls_meles.config import MeLESConfig

SCHEMA = EventSchema(client_col="client", time_col="t", categorical=["mcc"], numeric=["amount"])
TINY = dict(hidden_size=4, pooling="last", cat_embedding_dim=2, max_epochs=1, batch_size=8, num_workers=0, cnt_min=2, cnt_max=10,
            val_fraction=0.0, patience=None, seed=0, category_pooling=0)  # 4 columns: the last state


@pytest.mark.parametrize("check", [check_parameters_default_constructible, check_get_params_invariance,
                                   check_set_params, check_no_attributes_set_in_init])
def test_sklearn_estimator_checks(check):
    check("MeLES", MeLES())
    check("MeLES", MeLES(schema=SCHEMA, **TINY))


def test_params_are_the_config_fields_stored_verbatim():
    model = MeLES(SCHEMA, hidden_size=7, lr="not a number")  # no validation in __init__ ...
    assert model.get_params(deep=True) == model.get_params(deep=False)
    assert set(model.get_params()) == {"schema"} | {f for f in MeLESConfig.__dataclass_fields__}
    assert model.get_params()["hidden_size"] == 7 and model.get_params()["schema"] is SCHEMA
    with pytest.raises(ValueError, match="setting 'lr' must be float"):  # ... but when the config is built
        model.config
    assert model.set_params(lr=0.01, hidden_size=9) is model and model.config.hidden_size == 9
    assert MeLES().config == MeLESConfig()  # None of a dict-valued field is the config's default
    assert repr(MeLES(hidden_size=7)) == "MeLES(hidden_size=7)"
    with pytest.raises(TypeError, match="unknown MeLES setting"):
        MeLES(hidden=3)


def test_clone_copies_params_not_fitted_state(events):
    model = MeLES(schema=SCHEMA, **TINY).fit(events, show_progress=False)
    twin = clone(model)
    assert twin.get_params() == model.get_params() and not hasattr(twin, "module_")
    assert hasattr(model, "module_") and hasattr(model, "encoding_")


def make_clients(n: int = 40, seed: int = 0) -> tuple[list[pd.DataFrame], np.ndarray]:
    """One events frame per client; the label is whether the client's events mostly carry mcc 'a'."""
    rng = np.random.default_rng(seed)
    frames, labels = [], []
    for i in range(n):
        k = int(rng.integers(5, 20))
        label = i % 2
        mcc = np.where(rng.random(k) < 0.9, "a" if label else "b", "c")
        frames.append(pd.DataFrame({"client": f"u{i:03d}", "t": np.sort(rng.random(k) * 100), "mcc": mcc,
                                    "amount": rng.normal(size=k) + 3 * label}))
        labels.append(label)
    return frames, np.array(labels)


@pytest.fixture(scope="module")
def clients():
    torch.set_num_threads(1)
    return make_clients()


@pytest.fixture(scope="module")
def events(clients):
    return pd.concat(clients[0], ignore_index=True)


def test_events_frame_gives_one_row_per_client_in_store_order(events):
    emb = MeLES(schema=SCHEMA, **TINY).fit_transform(events, show_progress=False)
    assert emb["client_id"].tolist() == sorted(events["client"].unique())
    assert emb.shape == (40, 1 + 4)


def test_list_of_clients_rows_follow_x(clients):
    frames, _ = clients
    model = MeLES(schema=SCHEMA, **TINY).fit(frames, show_progress=False)
    order = [7, 3, 30, 0]
    emb = model.transform([frames[i] for i in order])
    assert emb.index.tolist() == [f"u{i:03d}" for i in order] and list(emb.columns) == [f"emb_{j:03d}" for j in range(4)]
    full = model.transform(frames)
    np.testing.assert_allclose(emb.to_numpy(), full.iloc[order].to_numpy(), atol=1e-6)
    with pytest.raises(ValueError, match=r"X\[1\]: a list X must hold one client per DataFrame"):
        model.transform([frames[0], pd.concat(frames[1:3])])


def test_pipeline_and_grid_search(clients):
    from lightgbm import LGBMClassifier
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import Pipeline

    frames, y = clients
    pipe = Pipeline([("meles", MeLES(schema=SCHEMA, **TINY)),
                     ("lgbm", LGBMClassifier(n_estimators=10, min_child_samples=2, verbose=-1, n_jobs=1))])
    proba = pipe.fit(frames, y).predict_proba(frames[:5])
    assert proba.shape == (5, 2) and np.allclose(proba.sum(axis=1), 1)
    search = GridSearchCV(pipe, {"meles__hidden_size": [4, 6]}, cv=2, scoring="roc_auc", error_score="raise")
    search.fit(frames, y)
    assert search.best_params_["meles__hidden_size"] in (4, 6)
    assert search.best_estimator_.named_steps["meles"].module_.config.hidden_size == search.best_params_["meles__hidden_size"]
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
