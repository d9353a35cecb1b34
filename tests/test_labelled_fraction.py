"""The labelled-fraction protocol: a stratified, nested subsample of the training part; the test part never moves."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ptls_meles.downstream.evaluate import evaluate
from ptls_meles.downstream.protocol import JoinReport, labelled_subsample, plan_cv


def test_labelled_subsample_is_stratified_nested_and_order_preserving():
    y = np.array([0] * 10 + [1] * 4)
    train_idx = np.arange(14)[::-1]
    half = labelled_subsample(y, train_idx, 0.5, min_per_class=3, seed=1)
    tenth = labelled_subsample(y, train_idx, 0.1, min_per_class=3, seed=1)
    # ceil(0.5·10)=5 of class 0, max(3, ceil(0.5·4)=2)=3 of class 1; at 10%: 3 and 3 (the minimum)
    assert np.bincount(y[half]).tolist() == [5, 3]
    assert np.bincount(y[tenth]).tolist() == [3, 3]
    assert set(tenth) <= set(half)
    assert (np.diff(half) < 0).all()  # the order of train_idx is kept
    assert labelled_subsample(y, train_idx, 1.0, 3, 1) is train_idx
    with pytest.raises(ValueError, match="labelled fraction"):
        labelled_subsample(y, train_idx, 0.0, 3, 1)


def test_fraction_one_is_evaluate_and_the_test_part_is_fixed():
    rng = np.random.default_rng(0)
    n = 120
    y = rng.integers(0, 2, n)
    feats = pd.DataFrame({"client_id": np.arange(n), "a": y + rng.normal(0, 1.0, n), "b": rng.normal(size=n)})
    targets = pd.DataFrame({"client_id": np.arange(n), "label": y})
    kw = dict(n_folds=3, test_size=0.2, seed=7, lgbm_params={"n_estimators": 15, "min_child_samples": 5}, n_jobs=1)
    full = evaluate(feats, targets, "label", labelled_fraction=1.0, **kw)
    ref = evaluate(feats, targets, "label", **kw)
    assert full.test_scores == ref.test_scores and full.cv_scores == ref.cv_scores
    part = evaluate(feats, targets, "label", labelled_fraction=0.3, **kw)
    assert part.n_test == ref.n_test and part.n_train < 0.35 * ref.n_train
    # the test part is evaluate's, whatever the fraction: flip the feature on exactly those clients and
    # every fold model (which learnt a = y on training clients) must score AUROC 0 on it
    test_idx = plan_cv(y, JoinReport([n], n, 0, n, 0, 0, 0, n), "label", n_folds=3, test_size=0.2, seed=7).test_idx
    a = y.astype(float)
    a[test_idx] = 1 - a[test_idx]
    flipped = feats.assign(a=a)
    for fraction in (1.0, 0.3):
        assert evaluate(flipped, targets, "label", labelled_fraction=fraction, **kw).test_scores == [0.0] * 3
