"""The synthetic generator: schema, determinism, shape of distributions, and the kind of signal it carries."""
from __future__ import annotations

import runpy
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

from ptls_meles.datasets import synthetic
from ptls_meles.datasets.synthetic import (
    CHUNK_CLIENTS,
    N_SMALL_GROUPS,
    SyntheticConfigError,
    generate,
    write,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo() -> tuple[pd.DataFrame, pd.DataFrame]:
    return generate(n_clients=3000, seed=0)


def _aggregates(events: pd.DataFrame, n_clients: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Simple per-client aggregates (client ids are 0..n-1 here) and the [n, K] category shares."""
    client = events["client_id"].to_numpy()
    group = events["small_group"].to_numpy()
    amount = events["amount_rur"].to_numpy()
    log_amount = np.log(amount)
    weekday = events["trans_date"].to_numpy() % 7
    count = np.bincount(client, minlength=n_clients).astype(float)
    shares = np.bincount(client * N_SMALL_GROUPS + group, minlength=n_clients * N_SMALL_GROUPS)
    shares = shares.reshape(n_clients, N_SMALL_GROUPS) / count[:, None]
    mean_log = np.bincount(client, weights=log_amount, minlength=n_clients) / count
    features = {
        "count": count,
        "mean_amount": np.bincount(client, weights=amount, minlength=n_clients) / count,
        "mean_log_amount": mean_log,
        "std_log_amount": np.sqrt(np.bincount(client, weights=log_amount**2, minlength=n_clients) / count - mean_log**2),
        "top_share": shares.max(axis=1),
        "n_groups": (shares > 0).sum(axis=1),
        "weekend_share": np.bincount(client, weights=weekday >= 5, minlength=n_clients) / count,
    }
    for day in range(7):
        features[f"weekday_{day}"] = np.bincount(client, weights=weekday == day, minlength=n_clients) / count
    for k in range(N_SMALL_GROUPS):
        features[f"share_{k}"] = shares[:, k]
    return pd.DataFrame(features), shares


def test_schema_and_ranges(demo):
    events, targets = demo
    assert list(events.columns) == ["client_id", "trans_date", "small_group", "amount_rur"]
    assert events.dtypes.to_dict() == {
        "client_id": np.dtype("int64"),
        "trans_date": np.dtype("int64"),
        "small_group": np.dtype("int64"),
        "amount_rur": np.dtype("float64"),
    }
    assert events["trans_date"].between(0, synthetic.N_DAYS - 1).all()
    assert events["small_group"].between(0, N_SMALL_GROUPS - 1).all()
    assert events["small_group"].nunique() >= 180
    assert (events["amount_rur"] > 0).all()
    assert list(targets.columns) == ["client_id", "bins", "gender"]
    assert targets["client_id"].is_unique and len(targets) == 3000
    assert set(events["client_id"].unique()) == set(targets["client_id"])
    assert set(targets["bins"].unique()) == {0, 1, 2, 3}
    assert set(targets["gender"].unique()) == {0, 1}
    # rows are shuffled, so a consumer must sort
    assert not events["client_id"].is_monotonic_increasing


def test_with_type_column():
    events, _ = generate(n_clients=200, seed=3, mean_events=100, with_type=True)
    assert events.columns[-1] == "trans_type" and events["trans_type"].dtype == np.int64
    assert events["trans_type"].between(0, synthetic.N_TRANS_TYPES - 1).all()
    assert events["trans_type"].nunique() >= 40
    without, _ = generate(n_clients=200, seed=3, mean_events=100)
    assert "trans_type" not in without.columns


def test_heavy_tails(demo):
    events, _ = demo
    popularity = events["small_group"].value_counts(normalize=True).to_numpy()
    assert popularity[0] > 10 * np.median(popularity)  # Zipf-like: a few codes dominate
    amount = events["amount_rur"]
    assert amount.quantile(0.999) > 20 * amount.median()
    assert amount.mean() > amount.median()


@pytest.mark.parametrize("mean_events", [100, 300])
def test_length_distribution(mean_events):
    events, _ = generate(n_clients=1000, seed=1, mean_events=mean_events)
    lengths = events.groupby("client_id").size()
    assert lengths.min() >= synthetic.MIN_EVENTS and lengths.max() <= synthetic.MAX_EVENTS
    assert abs(lengths.median() / mean_events - 1) < 0.15
    assert lengths.std() > 0.3 * lengths.median()  # lengths really vary


def test_label_balance(demo):
    _, targets = demo
    age_shares = targets["bins"].value_counts(normalize=True)
    assert age_shares.between(0.2, 0.3).all()
    assert 0.40 < targets["gender"].mean() < 0.50


def test_same_seed_same_data_and_other_seed_differs():
    a = generate(n_clients=150, seed=7, mean_events=80, with_type=True)
    b = generate(n_clients=150, seed=7, mean_events=80, with_type=True)
    pd.testing.assert_frame_equal(a[0], b[0])
    pd.testing.assert_frame_equal(a[1], b[1])
    c = generate(n_clients=150, seed=8, mean_events=80, with_type=True)
    assert not a[0]["small_group"].head(1000).equals(c[0]["small_group"].head(1000))


def test_write_matches_generate_over_several_chunks(tmp_path):
    n = CHUNK_CLIENTS + 300  # two chunks, the last one partial
    events, targets = generate(n_clients=n, seed=5, mean_events=50)
    csv_paths = write(tmp_path / "a", n_clients=n, seed=5, mean_events=50)
    assert {p.name for p in csv_paths.values()} == {"transactions_train.csv", "train_target.csv", "gender_target.csv"}
    pd.testing.assert_frame_equal(pd.read_csv(csv_paths["transactions"]), events)
    pd.testing.assert_frame_equal(pd.read_csv(csv_paths["age_target"]), targets[["client_id", "bins"]])
    pd.testing.assert_frame_equal(pd.read_csv(csv_paths["gender_target"]), targets[["client_id", "gender"]])
    assert csv_paths["transactions"].read_text().startswith("client_id,trans_date,small_group,amount_rur\n")

    pq_paths = write(tmp_path / "b", n_clients=n, seed=5, mean_events=50, fmt="parquet")
    assert pq_paths["transactions"].name == "transactions_train.parquet"
    assert pq.ParquetFile(pq_paths["transactions"]).metadata.num_row_groups == 2
    pd.testing.assert_frame_equal(pd.read_parquet(pq_paths["transactions"]), events)

    again = write(tmp_path / "c", n_clients=n, seed=5, mean_events=50, fmt="parquet")
    for key in pq_paths:
        assert again[key].read_bytes() == pq_paths[key].read_bytes()
    assert not list((tmp_path / "b").glob(".*tmp*"))  # no leftovers from atomic writes


def test_script_writes_files(tmp_path):
    main = runpy.run_path(str(REPO / "data" / "make_synthetic.py"))["main"]
    main(["--out", str(tmp_path), "--clients", "40", "--seed", "2", "--mean-events", "60", "--with-type"])
    events = pd.read_csv(tmp_path / "transactions_train.csv")
    assert events["client_id"].nunique() == 40 and "trans_type" in events.columns
    assert len(pd.read_csv(tmp_path / "gender_target.csv")) == 40


@pytest.mark.parametrize(
    "kwargs, word",
    [({"n_clients": 0}, "n_clients"), ({"mean_events": 10}, "mean_events"), ({"mean_events": 5000}, "mean_events")],
)
def test_bad_arguments(kwargs, word):
    with pytest.raises(SyntheticConfigError, match=word):
        generate(**kwargs)


def test_bad_format(tmp_path):
    with pytest.raises(SyntheticConfigError, match="fmt"):
        write(tmp_path, n_clients=10, fmt="json")


def test_no_single_aggregate_leaks_age_but_all_together_do(demo):
    events, targets = demo
    features, shares = _aggregates(events, len(targets))
    age = targets["bins"].to_numpy()
    gender = targets["gender"].to_numpy()

    tree = DecisionTreeClassifier(max_depth=3, min_samples_leaf=30)
    single = {name: cross_val_score(tree, features[[name]].to_numpy(), age, cv=5).mean() for name in features}
    worst = max(single, key=single.get)
    assert single[worst] < 0.42, f"{worst} alone predicts age with accuracy {single[worst]:.3f}"

    summary = features[["count", "mean_log_amount", "std_log_amount", "top_share", "n_groups"]].to_numpy()
    weekdays = features[[f"weekday_{d}" for d in range(7)]].to_numpy()
    x = np.column_stack([np.sqrt(shares), np.log(summary[:, :1]), summary[:, 1:], weekdays])
    logreg = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
    accuracy = cross_val_score(logreg, x, age, cv=5).mean()
    assert 0.45 < accuracy < 0.75, accuracy  # real signal, but imperfect

    booster = lgb.LGBMClassifier(n_estimators=120, learning_rate=0.05, num_leaves=15, colsample_bytree=0.5,
                                 verbose=-1, n_jobs=1, random_state=0)
    train = np.arange(len(age)) < 2000
    booster.fit(x[train], age[train])
    assert booster.score(x[~train], age[~train]) > 0.40

    gender_score = cross_val_predict(logreg, x, gender, cv=5, method="predict_proba")[:, 1]
    assert 0.68 < roc_auc_score(gender, gender_score) < 0.92


def test_two_halves_of_a_client_look_alike(demo):
    """Individual habits are distinctive: a client's first half finds its own second half."""
    events, targets = demo
    n = len(targets)
    events = events.sort_values(["client_id", "trans_date"], kind="stable")
    client = events["client_id"].to_numpy()
    position = events.groupby("client_id").cumcount().to_numpy()
    second = position >= np.bincount(client, minlength=n)[client] // 2
    halves = []
    for mask in (~second, second):
        counts = np.bincount(client[mask] * N_SMALL_GROUPS + events["small_group"].to_numpy()[mask],
                             minlength=n * N_SMALL_GROUPS).reshape(n, N_SMALL_GROUPS)
        halves.append(np.sqrt(counts / counts.sum(axis=1, keepdims=True)))
    nearest = (halves[0] @ halves[1].T).argmax(axis=1)
    assert (nearest == np.arange(n)).mean() > 0.4  # chance is 1/3000
