"""The synthetic generator: schema, determinism, shape of distributions, and the kind of signal it carries."""
from __future__ import annotations

import runpy
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict, cross_val_score
from sklearn.tree import DecisionTreeClassifier

from ptls_meles.datasets import synthetic
from ptls_meles.datasets.recipes import synthetic_schema
from ptls_meles.datasets.synthetic import (
    CHUNK_CLIENTS,
    HIDDEN_PARAMETERS,
    N_SMALL_GROUPS,
    SECONDS_PER_DAY,
    SyntheticConfigError,
    calendar_fields,
    client_parameters,
    generate,
    write,
)
from ptls_meles.downstream.features import handcrafted_features
from ptls_meles.prepare import prepare

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo() -> tuple[pd.DataFrame, pd.DataFrame]:
    return generate(n_clients=1500, seed=0, mean_events=150)


def test_schema_and_ranges(demo):
    events, targets = demo
    assert list(events.columns) == ["client_id", "trans_date", "trans_datetime", "small_group", "amount_rur"]
    assert events.dtypes.to_dict() == {
        "client_id": np.dtype("int64"),
        "trans_date": np.dtype("int64"),
        "trans_datetime": np.dtype("int64"),
        "small_group": np.dtype("int64"),
        "amount_rur": np.dtype("float64"),
    }
    assert events["trans_date"].between(0, synthetic.N_DAYS - 1).all()
    assert (events["trans_datetime"] // SECONDS_PER_DAY == events["trans_date"]).all()
    assert events["small_group"].between(0, N_SMALL_GROUPS - 1).all()
    assert events["small_group"].nunique() >= 180
    assert (events["amount_rur"] > 0).all()
    assert list(targets.columns) == ["client_id", "bins", "gender"]
    assert targets["client_id"].is_unique and len(targets) == 1500
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
    assert csv_paths["transactions"].read_text().startswith("client_id,trans_date,trans_datetime,small_group,amount_rur\n")

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


# ------------------------------------------------------------------ honesty of the signal
# LightGBM with a small budget, one thread: each check stays at a few seconds.
SMALL_LGBM = dict(n_estimators=60, learning_rate=0.1, num_leaves=7, colsample_bytree=0.3, max_bin=31, subsample=0.8,
                  subsample_freq=1, min_child_samples=20, verbose=-1, n_jobs=1, random_state=0)


@pytest.fixture(scope="module")
def features(demo) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Hand-crafted features of the store the synthetic recipe builds, the hidden parameters
    and the targets, all in client order."""
    events, targets = demo
    raw = pd.concat([events, calendar_fields(events["trans_datetime"])], axis=1)
    store, _ = prepare(raw, synthetic_schema(), show_progress=False)
    hand = handcrafted_features(store).set_index("client_id").sort_index()
    hidden = client_parameters(n_clients=1500, seed=0, mean_events=150).set_index("client_id").sort_index()
    assert (hidden.index == hand.index).all()
    assert (hidden["bins"].to_numpy() == targets.set_index("client_id").sort_index()["bins"].to_numpy()).all()
    return hand, hidden[list(HIDDEN_PARAMETERS)], hidden[["bins", "gender"]]


def _cv_score(x: pd.DataFrame, y: np.ndarray) -> float:
    """Cross-validated AUROC (binary) or accuracy (multiclass) of a small LightGBM."""
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    if len(np.unique(y)) == 2:
        proba = cross_val_predict(lgb.LGBMClassifier(**SMALL_LGBM), x, y, cv=cv, method="predict_proba")[:, 1]
        return roc_auc_score(y, proba)
    return accuracy_score(y, cross_val_predict(lgb.LGBMClassifier(**SMALL_LGBM), x, y, cv=cv))


@pytest.fixture(scope="module")
def handcrafted_scores(features) -> dict[str, float]:
    hand, _, labels = features
    return {target: _cv_score(hand, labels[target].to_numpy()) for target in ("gender", "bins")}


def test_handcrafted_features_read_the_labels_partly(handcrafted_scores):
    """Aggregates keep real signal but are not sufficient: gender AUROC roughly 0.70-0.85,
    age accuracy clearly above chance (0.25)."""
    assert 0.68 < handcrafted_scores["gender"] < 0.85, handcrafted_scores
    assert 0.30 < handcrafted_scores["bins"] < 0.50, handcrafted_scores


def test_oracle_knowing_the_mechanisms_beats_handcrafted(features, handcrafted_scores):
    """The labels act through timing and order too: adding the hidden per-client mechanism
    parameters (regularity, bursts, sessions, transitions, ...) scores clearly higher."""
    hand, hidden, labels = features
    oracle = pd.concat([hand, hidden], axis=1)
    for target, margin in (("gender", 0.07), ("bins", 0.12)):
        score = _cv_score(oracle, labels[target].to_numpy())
        assert score > handcrafted_scores[target] + margin, (target, score, handcrafted_scores[target])


def test_no_single_feature_reveals_a_label(features, handcrafted_scores):
    hand, _, labels = features
    gender = labels["gender"].to_numpy()
    x = hand.fillna(-1.0)
    single_auc = {name: roc_auc_score(gender, column) for name, column in x.items()}
    best = max(single_auc, key=lambda name: abs(single_auc[name] - 0.5))
    best_auc = max(single_auc[best], 1.0 - single_auc[best])
    assert best_auc < handcrafted_scores["gender"] - 0.05 and best_auc < 0.70, (best, best_auc)

    age = labels["bins"].to_numpy()
    tree = DecisionTreeClassifier(max_depth=3, min_samples_leaf=30)
    top = sorted(single_auc, key=lambda name: -abs(single_auc[name] - 0.5))[:20]  # plus the most age-like ones:
    top += list(x.columns[np.argsort(-np.abs(np.corrcoef(x.to_numpy().T, age)[-1, :-1]))[:20]])
    single_acc = {name: cross_val_score(tree, x[[name]], age, cv=3).mean() for name in dict.fromkeys(top)}
    worst = max(single_acc, key=single_acc.get)
    assert single_acc[worst] < 0.33, (worst, single_acc[worst])


def test_two_halves_of_a_client_look_alike(demo):
    """Individual habits are distinctive: a client's first half finds its own second half."""
    events, targets = demo
    n = len(targets)
    events = events.sort_values(["client_id", "trans_datetime"], kind="stable")
    client = events["client_id"].to_numpy()
    position = events.groupby("client_id").cumcount().to_numpy()
    second = position >= np.bincount(client, minlength=n)[client] // 2
    halves = []
    for mask in (~second, second):
        counts = np.bincount(client[mask] * N_SMALL_GROUPS + events["small_group"].to_numpy()[mask],
                             minlength=n * N_SMALL_GROUPS).reshape(n, N_SMALL_GROUPS)
        halves.append(np.sqrt(counts / counts.sum(axis=1, keepdims=True)))
    nearest = (halves[0] @ halves[1].T).argmax(axis=1)
    assert (nearest == np.arange(n)).mean() > 0.3  # chance is 1/1500


# ------------------------------------------------------------------ each mechanism leaves its trace
def _per_client(events: pd.DataFrame, n: int, values: np.ndarray) -> np.ndarray:
    client = events["client_id"].to_numpy()
    return np.bincount(client, weights=values, minlength=n) / np.bincount(client, minlength=n)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pd.Series(a).corr(pd.Series(b), method="spearman")


@pytest.fixture(scope="module")
def sorted_demo(demo) -> tuple[pd.DataFrame, pd.DataFrame]:
    events, _ = demo
    hidden = client_parameters(n_clients=1500, seed=0, mean_events=150)
    return events.sort_values(["client_id", "trans_datetime"], kind="stable", ignore_index=True), hidden


def test_sessions_and_time_of_day_follow_the_hidden_habits(sorted_demo):
    events, hidden = sorted_demo
    n = len(hidden)
    t = events["trans_datetime"].to_numpy()
    same_client = np.r_[False, events["client_id"].to_numpy()[1:] == events["client_id"].to_numpy()[:-1]]
    quick = same_client & (np.r_[np.inf, np.diff(t)] < 1800)  # within 30 minutes of the previous purchase
    assert _spearman(_per_client(events, n, quick), hidden["session_extra"]) > 0.5
    assert 0.2 < quick.mean() < 0.6

    hour = calendar_fields(t)["hour"].to_numpy()
    assert np.bincount(hour, minlength=24)[2:5].sum() < 0.02 * len(hour)  # quiet nights
    evening_minus_morning = ((hour >= 18) & (hour < 22)).astype(float) - ((hour >= 7) & (hour < 11))
    assert _spearman(_per_client(events, n, evening_minus_morning), hidden["hour_loading"]) > 0.4


def test_transitions_follow_the_old_or_young_link_map(sorted_demo):
    events, hidden = sorted_demo
    n = len(hidden)
    links = synthetic._make_world(0).links
    group = events["small_group"].to_numpy()
    client = events["client_id"].to_numpy()
    nxt = np.r_[client[1:] == client[:-1], False] & (np.r_[np.diff(events["trans_datetime"].to_numpy()), np.inf] < 3600)
    prev, succ = group[:-1][nxt[:-1]], group[1:][nxt[:-1]]
    differ = links[0, prev] != links[1, prev]
    old_minus_young = np.zeros(len(group))
    old_minus_young[1:][nxt[:-1]] = differ * ((succ == links[1, prev]).astype(float) - (succ == links[0, prev]))
    assert _spearman(_per_client(events, n, old_minus_young), hidden["old_map"]) > 0.3


def test_recurring_payments_are_more_regular_for_older_clients(sorted_demo):
    """A client's recurring payments repeat the same category and amount (to 1%) every month;
    the spread of their day of month falls with age group."""
    events, hidden = sorted_demo
    key = events[["client_id", "small_group"]].assign(amount=np.round(np.log(events["amount_rur"]), 2))
    day = synthetic.DAY_OF_MONTH[events["trans_date"].to_numpy()]
    repeated = key.assign(day=day).groupby(["client_id", "small_group", "amount"])["day"].agg(["size", "std"])
    monthly = repeated[repeated["size"] >= 6].reset_index()
    spread = monthly.groupby("client_id")["std"].median()
    age = hidden.set_index("client_id").loc[spread.index, "bins"]
    by_age = spread.groupby(age).median()
    assert by_age.is_monotonic_decreasing and by_age.iloc[0] > 1.5 * by_age.iloc[-1], by_age
