"""Hand-crafted features and the LightGBM evaluation protocol."""
from __future__ import annotations

import json
import logging
import math
import re

import numpy as np
import pandas as pd
import pytest

from ptls_meles.downstream.evaluate import (
    BLEND_WEIGHTS,
    LINEAR_CS,
    EvaluationError,
    evaluate,
    evaluate_splits,
    interval_half_width,
    load_feature_table,
)
from ptls_meles.downstream.features import FeatureError, handcrafted_features, share_features
from ptls_meles.encoding import CategoryVocab, Encoding, NumericTransform
from ptls_meles.store import SequenceStore

SMALL_LGBM = {"n_estimators": 30, "num_leaves": 8, "min_child_samples": 5, "learning_rate": 0.1}


# --------------------------------------------------------------------------- features
def make_store() -> SequenceStore:
    """Clients a, (empty), b, c; mcc ids 2,3,4 = values '5411','6011','4829'; 1 = unseen."""
    times = [0.0, 2.0, 5.0] + [] + [1.0, 4.0, 6.0] + [3.0]
    mcc = [2, 3, 2] + [] + [3, 4, 1] + [2]
    amount = [10.0, 20.0, 30.0] + [] + [5.0, 7.0, 100.0] + [-1.0]
    raw_count = [1.0, 0.0, 99.0] + [] + [3.0, 3.0, 3.0] + [-7.0]
    log = NumericTransform("log")
    encoding = Encoding(
        client_col="client_id",
        time_col="event_time",
        time_format="float",
        categorical={"mcc": CategoryVocab(values=["5411", "6011", "4829"], counts=[3, 2, 1])},
        numeric={"amount": NumericTransform("identity"), "n_items": log},
    )
    columns = {
        "event_time": np.array(times),
        "mcc": np.array(mcc, dtype=np.int32),
        "amount": np.array(amount, dtype=np.float32),
        "n_items": log.apply(np.array(raw_count)),
    }
    return SequenceStore(np.array(["a", "empty", "b", "c"]), np.array([0, 3, 3, 6, 7]), columns, encoding)


def test_value_shares_cover_every_value_beyond_top_k():
    """top_k=1 keeps one value's counts, yet shares name every value and the rare id, by hand."""
    f = handcrafted_features(make_store(), top_k=1, shares=True).set_index("client_id")
    share_cols = [c for c in f.columns if c.endswith("_share")]
    assert share_cols == ["mcc_5411_share", "mcc_6011_share", "mcc_4829_share", "mcc__rare_share"]
    np.testing.assert_allclose(f.loc["a", share_cols], [2 / 3, 1 / 3, 0, 0])
    np.testing.assert_allclose(f.loc["b", share_cols], [0, 1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(f.loc["c", share_cols], [1, 0, 0, 0])
    assert f.loc["empty", share_cols].isna().all()
    assert "mcc_6011_count" not in f.columns
    assert not any(c.endswith("_share") for c in handcrafted_features(make_store()).columns)


def test_share_features_are_the_columns_shares_add_to_the_plain_features():
    store = make_store()
    plain, with_shares = handcrafted_features(store), handcrafted_features(store, shares=True)
    added = ["client_id"] + [c for c in with_shares.columns if c not in plain.columns]
    pd.testing.assert_frame_equal(share_features(store), with_shares[added])


def test_cli_evaluate_builds_the_share_yardsticks_from_a_store(tmp_path):
    """``handcrafted+shares:STORE`` and ``shares:STORE`` score the tables ``bench quality`` calls its yardsticks."""
    from conftest import events_frame
    from ptls_meles.cli import main
    from ptls_meles.prepare import prepare
    from ptls_meles.schema import EventSchema

    store, _ = prepare(events_frame(n_clients=60, max_len=20, seed=2), EventSchema("client", "day", ["mcc"], ["amount"],
                       time_format="number"), out=tmp_path / "store", show_progress=False)
    labels = np.random.default_rng(3).integers(0, 2, store.n_clients)
    pd.DataFrame({"client_id": store.client_ids, "label": labels}).to_csv(tmp_path / "t.csv", index=False)
    n_plain, n_shares = handcrafted_features(store).shape[1] - 1, share_features(store).shape[1] - 1
    widths = {}
    for source in ("handcrafted", "handcrafted+shares", "shares"):
        main(["evaluate", "--features", f"{source}:{tmp_path / 'store'}", "--targets", str(tmp_path / "t.csv"),
              "--target-col", "label", "--folds", "2", "--test-size", "0", "--jobs", "1", "-q",
              "--out", str(tmp_path / f"{source}.json")])
        widths[source] = json.loads((tmp_path / f"{source}.json").read_text())[0]["n_features"]
    assert n_shares > 1
    assert widths == {"handcrafted": n_plain, "handcrafted+shares": n_plain + n_shares, "shares": n_shares}


def test_handcrafted_features_by_hand():
    f = handcrafted_features(make_store(), top_k=3).set_index("client_id")
    assert list(handcrafted_features(make_store()).columns[:3]) == ["client_id", "count", "time_span"]
    assert f["count"].tolist() == [3, 0, 3, 1]
    np.testing.assert_allclose(f["time_span"], [5.0, np.nan, 5.0, 0.0])
    np.testing.assert_allclose(f["amount_sum"], [60.0, 0.0, 112.0, -1.0])
    np.testing.assert_allclose(f["amount_mean"], [20.0, np.nan, 112.0 / 3, -1.0])
    b_std = math.sqrt(((5 - 112 / 3) ** 2 + (7 - 112 / 3) ** 2 + (100 - 112 / 3) ** 2) / 2)
    np.testing.assert_allclose(f["amount_std"], [10.0, np.nan, b_std, np.nan])
    np.testing.assert_allclose(f["amount_min"], [10.0, np.nan, 5.0, -1.0])
    np.testing.assert_allclose(f["amount_max"], [30.0, np.nan, 100.0, -1.0])
    # per-category: real value strings in the names, the unseen id (100.0 event of b) in no column
    assert f["mcc_5411_count"].tolist() == [2, 0, 0, 1]
    assert f["mcc_6011_count"].tolist() == [1, 0, 1, 0]
    assert f["mcc_4829_count"].tolist() == [0, 0, 1, 0]
    np.testing.assert_allclose(f["mcc_5411_amount_mean"], [20.0, np.nan, np.nan, -1.0])
    np.testing.assert_allclose(f["mcc_5411_amount_std"], [math.sqrt(200.0), np.nan, np.nan, np.nan])
    np.testing.assert_allclose(f["mcc_6011_amount_mean"], [20.0, np.nan, 5.0, np.nan])
    np.testing.assert_allclose(f["mcc_4829_amount_mean"], [np.nan, np.nan, 7.0, np.nan])


def test_handcrafted_features_undo_numeric_transform_and_main_numeric():
    store = make_store()
    raw = handcrafted_features(store, main_numeric="n_items").set_index("client_id")
    np.testing.assert_allclose(raw["n_items_sum"], [100.0, 0.0, 9.0, -7.0], rtol=1e-5)
    np.testing.assert_allclose(raw["n_items_max"], [99.0, np.nan, 3.0, -7.0], rtol=1e-5)
    np.testing.assert_allclose(raw["mcc_5411_n_items_mean"], [50.0, np.nan, np.nan, -7.0], rtol=1e-5)
    assert "mcc_5411_amount_mean" not in raw.columns
    stored = handcrafted_features(store, raw_numeric=False).set_index("client_id")
    np.testing.assert_allclose(stored["n_items_sum"], [np.log1p(1) + np.log1p(99), 0.0, 3 * np.log1p(3), -np.log1p(7)],
                               rtol=1e-5)


def test_handcrafted_features_top_k_truncates():
    f = handcrafted_features(make_store(), top_k=2, detailed=False)
    cat_cols = [c for c in f.columns if c.startswith("mcc_")]
    assert cat_cols == [f"mcc_{v}_{s}" for v in ("5411", "6011") for s in ("count", "amount_mean", "amount_std")]
    assert not any(c.startswith("mcc_") for c in handcrafted_features(make_store(), top_k=0).columns)


def test_handcrafted_features_errors():
    with pytest.raises(FeatureError, match="'price'.*amount"):
        handcrafted_features(make_store(), main_numeric="price")
    with pytest.raises(FeatureError, match="top_k"):
        handcrafted_features(make_store(), top_k=-1)


def test_handcrafted_features_match_pandas_groupby():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 30, size=200)
    n = int(lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    cats = rng.integers(1, 8, size=n).astype(np.int32)
    amount = rng.normal(100, 50, size=n).astype(np.float32)
    amount[rng.choice(n, size=40, replace=False)] = np.nan  # missing amounts are skipped, as pandas does
    times = np.sort(rng.uniform(0, 100, size=n))
    encoding = Encoding("client_id", "event_time", "float",
                        categorical={"g": CategoryVocab(values=[str(v) for v in range(10, 16)])},
                        numeric={"amount": NumericTransform("identity")})
    store = SequenceStore(np.arange(200) + 1000, offsets, {"event_time": times, "g": cats, "amount": amount}, encoding)
    f = handcrafted_features(store, top_k=4).set_index("client_id")

    df = pd.DataFrame({"client_id": np.repeat(store.client_ids, lengths), "g": cats, "amount": amount.astype(float),
                       "t": times})
    agg = df.groupby("client_id")["amount"].agg(["sum", "mean", "std", "min", "max"])
    for stat in agg.columns:
        np.testing.assert_allclose(f[f"amount_{stat}"], agg[stat], rtol=1e-9, err_msg=stat)
    np.testing.assert_allclose(f["time_span"], df.groupby("client_id")["t"].agg(lambda t: t.max() - t.min()))
    for cat_id, value in [(2, "10"), (5, "13")]:
        sub = df[df.g == cat_id].groupby("client_id")["amount"]
        counts = sub.size().reindex(f.index, fill_value=0)
        np.testing.assert_array_equal(f[f"g_{value}_count"], counts)
        np.testing.assert_allclose(f[f"g_{value}_amount_mean"], sub.mean().reindex(f.index), rtol=1e-9)
        np.testing.assert_allclose(f[f"g_{value}_amount_std"], sub.std().reindex(f.index), rtol=1e-9)
        # the detailed features: pandas' first/last skip missing values, as ours do
        for stat in ("min", "max", "first", "last"):
            np.testing.assert_allclose(f[f"g_{value}_amount_{stat}"], sub.agg(stat).reindex(f.index), rtol=1e-9, err_msg=stat)
        last_t = df[df.g == cat_id].groupby("client_id")["t"].max().reindex(f.index)
        end_t = df.groupby("client_id")["t"].max()
        np.testing.assert_allclose(f[f"g_{value}_recency"], end_t - last_t, rtol=1e-9)
    assert "g_14_count" not in f.columns
    plain = handcrafted_features(store, top_k=4, detailed=False)
    assert not any(c.endswith(("_first", "_last", "_recency")) for c in plain.columns)


# --------------------------------------------------------------------------- evaluate
def separable(n: int = 300, n_classes: int = 2, seed: int = 0, labels=None):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, size=n)
    ids = np.arange(n)
    feats = pd.DataFrame({"client_id": ids, "signal": y + rng.normal(0, 0.1, size=n), "noise": rng.normal(size=n)})
    target = np.asarray(labels, dtype=object)[y] if labels is not None else y
    return feats, pd.DataFrame({"client_id": ids, "label": target})


def test_evaluate_separable_binary_and_result_format():
    feats, targets = separable()
    res = evaluate(feats, targets, "label", lgbm_params=SMALL_LGBM, n_jobs=1)
    assert res.task == "binary" and res.metric == "auroc"
    assert res.cv_mean > 0.97 and res.test_mean > 0.97
    assert len(res.cv_scores) == 5 and len(res.test_scores) == 5
    assert res.n_test == 30 and res.n_train == 270 and res.n_features == 2
    assert res.params["n_estimators"] == 30 and res.params["subsample"] == 0.75
    assert re.fullmatch(r"label: auroc test \d\.\d{3} ± \d\.\d{3} \(cv \d\.\d{3} ± \d\.\d{3}\), 5 folds, "
                        r"270 train / 30 test clients", res.summary()), res.summary()
    d = json.loads(json.dumps(res.to_dict()))
    assert d["cv_mean"] == pytest.approx(res.cv_mean) and d["join"]["n_used"] == 300


def test_evaluate_multiclass_maps_labels():
    feats, targets = separable(n=300, n_classes=3, labels=["low", "mid", "high"])
    res = evaluate(feats, targets, "label", lgbm_params=SMALL_LGBM, n_jobs=1)
    assert res.task == "multiclass" and res.metric == "accuracy"
    assert res.classes == ["high", "low", "mid"] and res.label_mapping == {"high": 0, "low": 1, "mid": 2}
    assert res.cv_mean > 0.95 and res.test_mean > 0.95


def test_evaluate_noise_is_chance_and_interval_covers_it():
    rng = np.random.default_rng(1)
    n = 400
    feats = pd.DataFrame({"client_id": np.arange(n), **{f"f{i}": rng.normal(size=n) for i in range(3)}})
    targets = pd.DataFrame({"client_id": np.arange(n), "label": rng.integers(0, 2, size=n)})
    res = evaluate(feats, targets, "label", lgbm_params=SMALL_LGBM, n_jobs=1, seed=3)
    assert abs(res.cv_mean - 0.5) < 0.1
    assert res.cv_mean - res.cv_interval <= 0.5 <= res.cv_mean + res.cv_interval
    assert res.cv_interval > 0


def test_evaluate_protocol_and_interval_by_hand():
    import lightgbm as lgb
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, train_test_split

    feats, targets = separable(n=200, seed=5)
    feats["signal"] += np.random.default_rng(9).normal(0, 0.6, size=200)  # make scores differ between folds
    res = evaluate(feats, targets, "label", n_folds=4, test_size=0.2, seed=7, lgbm_params=SMALL_LGBM, n_jobs=1)

    X, y = feats[["signal", "noise"]].to_numpy(np.float32), targets["label"].to_numpy()
    rest, test = train_test_split(np.arange(200), test_size=0.2, stratify=y, random_state=7)
    cv, te = [], []
    for fit, val in StratifiedKFold(4, shuffle=True, random_state=7).split(rest, y[rest]):
        params = {**res.params}
        model = lgb.LGBMClassifier(**params).fit(X[rest[fit]], y[rest[fit]])
        cv.append(roc_auc_score(y[rest[val]], model.predict_proba(X[rest[val]])[:, 1]))
        te.append(roc_auc_score(y[test], model.predict_proba(X[test])[:, 1]))
    np.testing.assert_allclose(res.cv_scores, cv)
    np.testing.assert_allclose(res.test_scores, te)
    scores = np.array(cv)
    manual = 1.96 * math.sqrt(((scores - scores.mean()) ** 2).sum() / 4) / 2
    assert res.cv_interval == pytest.approx(manual) and res.cv_interval > 0
    assert interval_half_width([0.5, 0.7]) == pytest.approx(1.96 * 0.1 / math.sqrt(2))


def test_evaluate_join_report_counts_every_left_out_client(caplog):
    feats, targets = separable(n=120, seed=2)
    emb = pd.DataFrame({"client_id": np.r_[np.arange(120)[feats.client_id != 5], 999],
                        "emb_000": np.r_[feats.signal[feats.client_id != 5], 0.0]})
    targets = targets[targets.client_id != 7].copy()
    targets["label"] = targets["label"].astype(float)
    targets.loc[targets.client_id == 8, "label"] = np.nan
    targets = pd.concat([targets, pd.DataFrame({"client_id": [1000, 1001], "label": [0.0, 1.0]})])
    with caplog.at_level(logging.INFO, logger="ptls_meles.downstream"):
        res = evaluate([feats.drop(columns="signal"), emb], targets, "label", lgbm_params=SMALL_LGBM, n_jobs=1)
    j = res.join
    assert j.rows_per_table == [120, 120]
    assert j.n_joined_features == 119 and j.n_dropped_in_join == 2  # client 5 and client 999
    assert j.n_unlabelled == 1  # client 8
    assert j.n_labelled_missing_features == 3  # clients 5 (dropped in the join), 1000, 1001
    assert j.n_features_without_target == 1  # client 7
    assert j.n_used == 117 and res.n_train + res.n_test == 117
    assert res.n_features == 2 and res.classes == [0.0, 1.0]
    assert "2 clients are in some feature tables but not all" in caplog.text
    assert "3 labelled clients have no features" in caplog.text


def dense_signal(n: int = 400, width: int = 64, seed: int = 0, n_classes: int = 2):
    """A label carried by a direction over ``width`` dense columns, each column weak alone
    (the shape of a self-supervised embedding); a few values missing or infinite."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, width))
    score = x @ rng.normal(size=width) / np.sqrt(width)
    y = np.digitize(score, np.quantile(score, np.linspace(0, 1, n_classes + 1)[1:-1]))
    x[rng.random(x.shape) < 0.01] = np.nan
    x[0, 0], x[1, 1] = np.inf, -np.inf
    feats = pd.DataFrame(x, columns=[f"emb_{i:03d}" for i in range(width)]).assign(client_id=np.arange(n))
    return feats, pd.DataFrame({"client_id": np.arange(n), "label": y})


@pytest.mark.parametrize("n_classes", [2, 3])
def test_evaluate_linear_probe_reads_a_dense_direction(n_classes):
    feats, targets = dense_signal(n_classes=n_classes)
    trees = evaluate(feats, targets, "label", lgbm_params=SMALL_LGBM, n_jobs=1)
    probe = evaluate(feats, targets, "label", n_jobs=1, model="linear")
    assert probe.model == "linear_probe" and probe.metric == trees.metric
    # the same clients in the same parts as LightGBM's rows
    assert (probe.n_train, probe.n_test, probe.n_features) == (trees.n_train, trees.n_test, 64)
    assert len(probe.test_scores) == 5 and np.isfinite(probe.test_scores).all()
    assert set(probe.params["C_per_fold"]) <= set(LINEAR_CS) and len(probe.params["C_per_fold"]) == 5
    # what each column holds alone is too little for the trees; the probe reads the whole direction
    assert probe.test_mean > trees.test_mean + 0.1, (probe.summary(), trees.summary())
    assert probe.test_mean > (0.9 if n_classes == 2 else 0.75)


def test_evaluate_stacked_reads_aggregates_by_trees_and_the_embedding_by_a_probe():
    """The label of :func:`_two_signals`: the stacked row beats LightGBM on both tables."""
    hand, emb, targets = _two_signals()
    kw = {"lgbm_params": SMALL_LGBM, "n_jobs": 1, "test_size": 0.2}
    both = evaluate([hand, emb], targets, "label", **kw)
    stacked = evaluate([hand, emb], targets, "label", model="stacked", **kw)
    assert stacked.model == "stacked" and (stacked.n_train, stacked.n_test) == (both.n_train, both.n_test)
    assert len(stacked.params["probe"]["C_per_fold"]) == 5 and stacked.params["num_leaves"] == 8
    assert stacked.test_mean > both.test_mean + 0.05 and stacked.cv_mean > both.cv_mean + 0.05, \
        (stacked.summary(), both.summary())


def test_evaluate_stacked_probe_scores_its_training_clients_out_of_fold():
    """A noise embedding as wide as the fold is small: in-sample probe scores would fit the
    training labels and the trees would trust them; out of fold they carry nothing."""
    rng = np.random.default_rng(4)
    n = 240
    hand = pd.DataFrame({"client_id": np.arange(n), "agg": rng.normal(size=n)})
    targets = pd.DataFrame({"client_id": np.arange(n), "label": (hand["agg"] + rng.normal(0, 0.7, n) > 0).astype(int)})
    noise = pd.DataFrame(rng.normal(size=(n, 300)), columns=[f"e{i}" for i in range(300)]).assign(client_id=np.arange(n))
    alone = evaluate(hand, targets, "label", lgbm_params=SMALL_LGBM, n_jobs=1)
    stacked = evaluate([hand, noise], targets, "label", lgbm_params=SMALL_LGBM, n_jobs=1, model="stacked")
    assert stacked.test_mean > alone.test_mean - 0.05, (stacked.summary(), alone.summary())


def _two_signals(seed: int = 2, n: int = 800, width: int = 128):
    """A label made of a threshold on one aggregate (what trees read) and a dense direction of
    an embedding (what a probe reads)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, width))
    agg = rng.normal(size=n)
    score = 2 * x @ rng.normal(size=width) / np.sqrt(width) + 2.0 * (np.abs(agg) > 1.0)
    targets = pd.DataFrame({"client_id": np.arange(n), "label": (score > np.median(score)).astype(int)})
    emb = pd.DataFrame(x, columns=[f"emb_{i:03d}" for i in range(width)]).assign(client_id=np.arange(n))
    hand = pd.DataFrame({"client_id": np.arange(n), "agg": agg, "noise": rng.normal(size=n)})
    return hand, emb, targets


def test_evaluate_blended_is_the_mean_of_lightgbm_on_the_aggregates_and_the_probe_on_the_embedding():
    hand, emb, targets = _two_signals()
    kw = {"lgbm_params": SMALL_LGBM, "n_jobs": 1, "test_size": 0.2}
    blended = evaluate([hand, emb], targets, "label", model="blended", **kw)
    trees, probe = evaluate(hand, targets, "label", **kw), evaluate(emb, targets, "label", model="linear", **kw)
    parts = blended.params["components"]
    assert blended.model == "blended" and (blended.n_train, blended.n_test) == (trees.n_train, trees.n_test)
    # each component scored alone is the row its model gives on its own table, fold by fold
    assert parts["lightgbm"]["test_scores"] == pytest.approx(trees.test_scores)
    assert parts["linear_probe"]["cv_scores"] == pytest.approx(probe.cv_scores)
    assert blended.params["probe"]["C_per_fold"] == probe.params["C_per_fold"]
    # the label needs both signals: the average beats either model alone
    assert blended.test_mean > max(trees.test_mean, probe.test_mean) + 0.03, \
        (blended.summary(), trees.summary(), probe.summary())


def test_evaluate_blended_on_one_table_reads_it_by_both_models():
    """The control of a blended "both" row: the same two read-outs averaged on one table."""
    feats, targets = dense_signal(n=300, width=16, seed=3, n_classes=3)
    kw = {"lgbm_params": SMALL_LGBM, "n_jobs": 1}
    blended = evaluate(feats, targets, "label", model="blended", **kw)
    parts = blended.params["components"]
    assert parts["lightgbm"]["cv_scores"] == pytest.approx(evaluate(feats, targets, "label", **kw).cv_scores)
    assert parts["linear_probe"]["test_scores"] == pytest.approx(
        evaluate(feats, targets, "label", model="linear", **kw).test_scores)
    assert blended.n_features == 16 and blended.metric == "accuracy"


def test_evaluate_blended_weight_zero_and_one_are_its_components_and_validation_picks_the_strong_one():
    hand, emb, targets = _two_signals(n=600, width=32)
    kw = {"lgbm_params": SMALL_LGBM, "n_jobs": 1, "test_size": 0.2}
    trees_only = evaluate([hand, emb], targets, "label", model="blended", blend_weight=0.0, **kw)
    probe_only = evaluate([hand, emb], targets, "label", model="blended", blend_weight=1.0, **kw)
    assert trees_only.test_scores == pytest.approx(trees_only.params["components"]["lightgbm"]["test_scores"])
    assert probe_only.cv_scores == pytest.approx(probe_only.params["components"]["linear_probe"]["cv_scores"])
    # a trees table of pure noise beside the embedding: the equal mean is dragged down, the picked
    # weight leans on the probe and keeps (nearly) its score
    rng = np.random.default_rng(9)
    noise = pd.DataFrame({"client_id": hand["client_id"], "n1": rng.normal(size=len(hand)), "n2": rng.normal(size=len(hand))})
    equal = evaluate([noise, emb], targets, "label", model="blended", **kw)
    picked = evaluate([noise, emb], targets, "label", model="blended", blend_weight=None, **kw)
    probe = np.mean(picked.params["components"]["linear_probe"]["test_scores"])
    assert picked.params["blend_weight"] == "validation" and len(picked.params["weight_per_fold"]) == 5
    assert all(w in BLEND_WEIGHTS and w >= 0.6 for w in picked.params["weight_per_fold"]), picked.params["weight_per_fold"]
    assert picked.test_mean > equal.test_mean and picked.test_mean > probe - 0.01, (picked.summary(), equal.summary(), probe)
    assert "weight_per_fold" not in equal.params and equal.params["blend_weight"] == 0.5


def test_evaluate_blend_weight_is_refused_out_of_range_and_off_the_blend():
    feats, targets = dense_signal(n=60, width=4)
    with pytest.raises(EvaluationError, match=r"blend_weight must be in \[0, 1\] or None.*got 1.5"):
        evaluate([feats, feats], targets, "label", model="blended", blend_weight=1.5)
    with pytest.raises(EvaluationError, match="blend_weight applies to model='blended' only, not to model='linear'"):
        evaluate(feats, targets, "label", model="linear", blend_weight=None)


def test_evaluate_linear_probe_arguments():
    feats, targets = dense_signal(n=60, width=4)
    with pytest.raises(EvaluationError, match=r"model must be one of \('lightgbm', 'linear', 'stacked', 'blended'\), got 'svm'"):
        evaluate(feats, targets, "label", model="svm")
    for model in ("linear", "stacked", "blended"):
        with pytest.raises(EvaluationError, match=f"model='lightgbm' only, not to model='{model}'"):
            evaluate([feats, feats[["client_id"]]], targets, "label", model=model, early_stopping_rounds=10)
    with pytest.raises(EvaluationError, match=r"model='stacked' needs two or more feature tables"):
        evaluate(feats, targets, "label", model="stacked")
    for model in ("stacked", "blended"):
        with pytest.raises(EvaluationError, match=rf"model='{model}': the last feature table .* has no column besides 'client_id'"):
            evaluate([feats, feats[["client_id"]]], targets, "label", model=model)


def test_evaluate_errors():
    feats, targets = separable(n=60)
    with pytest.raises(EvaluationError, match=r"'age'.*\['client_id', 'label'\]"):
        evaluate(feats, targets, "age")
    one_class = targets.assign(label=1)
    with pytest.raises(EvaluationError, match="single class"):
        evaluate(feats, one_class, "label")
    few = targets.assign(label=np.r_[np.ones(55), np.zeros(5)])
    with pytest.raises(EvaluationError, match=r"class 0.0 has 5 labelled clients.*at least 6"):
        evaluate(feats, few, "label", n_folds=5)
    with pytest.raises(EvaluationError, match="no id column 'user'"):
        evaluate(feats, targets, "label", id_col="user")
    with pytest.raises(EvaluationError, match="'signal' is in feature tables 0 and 1"):
        evaluate([feats, feats[["client_id", "signal"]]], targets, "label")
    with pytest.raises(EvaluationError, match="label leak"):
        evaluate(feats.assign(label=1), targets, "label")
    with pytest.raises(EvaluationError, match="'noise'.*not numeric"):
        evaluate(feats.assign(noise="x"), targets, "label")
    with pytest.raises(EvaluationError, match="duplicated ids"):
        evaluate(pd.concat([feats, feats.iloc[:1]]), targets, "label")
    with pytest.raises(EvaluationError, match="task 'binary'.*3 classes"):
        evaluate(*separable(n=60, n_classes=3), "label", task="binary")


def test_load_feature_table(tmp_path):
    table = pd.DataFrame({"client_id": [3, 1], "emb_000": [0.5, -0.5], "emb_001": [1.0, 2.0]})
    table.to_parquet(tmp_path / "emb.parquet")
    table.to_csv(tmp_path / "emb.csv", index=False)
    pd.testing.assert_frame_equal(load_feature_table(tmp_path / "emb.parquet"), table)
    pd.testing.assert_frame_equal(load_feature_table(tmp_path / "emb.csv"), table)
    table.rename(columns={"client_id": "id"}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(EvaluationError, match=r"bad.parquet.*'client_id'.*\['id', 'emb_000'"):
        load_feature_table(tmp_path / "bad.parquet")
    with pytest.raises(FileNotFoundError):
        load_feature_table(tmp_path / "missing.parquet")


def test_evaluate_early_stopping_on_each_validation_fold():
    import lightgbm as lgb
    from sklearn.metrics import roc_auc_score

    from ptls_meles.downstream.protocol import join_features_and_targets, plan_cv

    feats, targets = separable(n=200, seed=5)
    feats["signal"] += np.random.default_rng(9).normal(0, 0.8, size=200)
    params = {**SMALL_LGBM, "n_estimators": 400}
    plain = evaluate(feats, targets, "label", n_folds=3, seed=4, lgbm_params=params, n_jobs=1)
    early = evaluate(feats, targets, "label", n_folds=3, seed=4, lgbm_params=params, n_jobs=1, early_stopping_rounds=10)
    assert plain.best_epochs == [] and "best" not in plain.summary()
    assert len(early.best_epochs) == 3 and all(1 <= b < 400 for b in early.best_epochs)
    assert early.params["early_stopping_rounds"] == 10 and f"best round per fold {early.best_epochs}" in early.summary()
    # by hand: each fold stops on its own validation part and is scored with its best round
    X, y_raw, report = join_features_and_targets(feats, targets, "label")
    plan = plan_cv(y_raw, report, "label", n_folds=3, seed=4)
    values = X.to_numpy(np.float32)
    for (fit, val), best, cv in zip(plan.folds, early.best_epochs, early.cv_scores):
        model = lgb.LGBMClassifier(**{k: v for k, v in early.params.items() if k != "early_stopping_rounds"})
        model.fit(values[fit], plan.y[fit], eval_set=[(values[val], plan.y[val])], callbacks=[lgb.early_stopping(10, verbose=False)])
        assert model.best_iteration_ == best
        assert cv == pytest.approx(roc_auc_score(plan.y[val], model.predict_proba(values[val])[:, 1]))
    with pytest.raises(EvaluationError, match="early_stopping_rounds"):
        evaluate(feats, targets, "label", early_stopping_rounds=0)


def _separable_evaluate_args(tmp_path) -> list[str]:
    """``ptls-meles evaluate`` arguments on a small separable table written to ``tmp_path``
    (two folds, one thread), for the CLI tests to add their options to."""
    feats, targets = separable(n=150, seed=3)
    feats.to_parquet(tmp_path / "f.parquet")
    targets.to_csv(tmp_path / "t.csv", index=False)
    return ["evaluate", "--features", str(tmp_path / "f.parquet"), "--targets", str(tmp_path / "t.csv"), "--target-col",
            "label", "--folds", "2", "--jobs", "1", "-q"]


def test_cli_evaluate_early_stopping_rounds(tmp_path):
    from ptls_meles.cli import main

    args = _separable_evaluate_args(tmp_path)
    main(args + ["--out", str(tmp_path / "plain.json")])
    main(args + ["--early-stopping-rounds", "5", "--out", str(tmp_path / "early.json")])
    plain, early = (json.loads((tmp_path / f"{name}.json").read_text())[0] for name in ("plain", "early"))
    assert plain["best_epochs"] == [] and plain["model"] == "lightgbm" and "early_stopping_rounds" not in plain["params"]
    assert len(early["best_epochs"]) == 2 and all(1 <= b < 1000 for b in early["best_epochs"])
    assert early["params"]["early_stopping_rounds"] == 5


def test_cli_evaluate_lgbm_budget_reaches_every_lightgbm_read_out(tmp_path):
    """``--lgbm fast`` fits LightGBM with the fast preset, alone and inside a blend; the
    default stays the paper's 1,000 trees."""
    from ptls_meles.cli import main
    from ptls_meles.downstream.evaluate import LGBM_PRESETS

    args = _separable_evaluate_args(tmp_path)
    main(args + ["--out", str(tmp_path / "paper.json")])
    main(args + ["--lgbm", "fast", "--out", str(tmp_path / "fast.json")])
    main(args + ["--lgbm", "fast", "--model", "blended", "--out", str(tmp_path / "blended.json")])
    paper, fast, blended = (json.loads((tmp_path / f"{name}.json").read_text())[0] for name in ("paper", "fast", "blended"))
    assert paper["params"]["n_estimators"] == 1000 and paper["params"]["colsample_bytree"] == 0.75
    for r in (fast, blended):
        assert {k: r["params"][k] for k in LGBM_PRESETS["fast"]} == LGBM_PRESETS["fast"]
    assert LGBM_PRESETS["fast"]["n_estimators"] < LGBM_PRESETS["paper"]["n_estimators"]


def test_cli_evaluate_keeps_the_targets_it_finished_when_a_later_one_fails(tmp_path):
    """The result file is written after each target: a run that stops on the third target of
    three (hours into real data) still leaves the first two to compare."""
    from ptls_meles.cli import main

    feats, targets = separable(n=150, seed=3)
    feats.to_parquet(tmp_path / "f.parquet")
    targets.assign(again=targets["label"], constant=1).to_csv(tmp_path / "t.csv", index=False)
    assert main(["evaluate", "--features", str(tmp_path / "f.parquet"), "--targets", str(tmp_path / "t.csv"),
                 "--target-col", "label", "again", "constant", "--folds", "2", "--jobs", "1", "-q",
                 "--out", str(tmp_path / "r.json")]) != 0
    kept = json.loads((tmp_path / "r.json").read_text())
    assert [r["target"] for r in kept] == ["label", "again"]
    assert kept[0]["test_scores"] == kept[1]["test_scores"]


def test_cli_evaluate_keeps_the_split_seeds_it_finished_when_cut(tmp_path, monkeypatch, caplog):
    """Cut on the third split seed, the file holds the two finished ones and names the third
    as left, which ``compare`` warns of when read alone and joins with a run of the third:
    the three-seed row, as if never cut."""
    import ptls_meles.downstream.evaluate as ev
    from ptls_meles.cli import main
    from ptls_meles.downstream.compare import load_result_files

    args = _separable_evaluate_args(tmp_path) + ["--seed"]
    main(args + ["42", "1", "2", "--out", str(tmp_path / "whole.json")])
    main(args + ["2", "--out", str(tmp_path / "third.json")])
    scored = ev.evaluate

    def cut_at_seed_2(*a, seed, **kw):
        if seed == 2:
            raise KeyboardInterrupt("cut")
        return scored(*a, seed=seed, **kw)

    monkeypatch.setattr(ev, "evaluate", cut_at_seed_2)
    with pytest.raises(KeyboardInterrupt):
        main(args + ["42", "1", "2", "--out", str(tmp_path / "cut.json")])
    cut = json.loads((tmp_path / "cut.json").read_text())
    assert [(r["target"], r["seeds"], r["seeds_left"]) for r in cut] == [("label", [42, 1], [2])]
    assert "seeds_left" not in json.loads((tmp_path / "whole.json").read_text())[0]
    with caplog.at_level("WARNING", logger="ptls_meles.downstream.compare"):
        alone = load_result_files(tmp_path / "cut.json")["label"]
    assert alone.seeds == [42, 1] and "split seeds [2] were not finished" in caplog.text and "cut.json" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ptls_meles.downstream.compare"):
        joined = load_result_files([tmp_path / "cut.json", tmp_path / "third.json"])["label"]
        whole = load_result_files(tmp_path / "whole.json")["label"]
    assert "not finished" not in caplog.text
    assert joined.seeds == whole.seeds and joined.test_mean == pytest.approx(whole.test_mean)


def test_cli_evaluate_linear_probe(tmp_path):
    from ptls_meles.cli import main

    feats, targets = dense_signal(n=200, width=16, seed=4)
    feats.to_parquet(tmp_path / "f.parquet")
    targets.to_csv(tmp_path / "t.csv", index=False)
    main(["evaluate", "--features", str(tmp_path / "f.parquet"), "--targets", str(tmp_path / "t.csv"), "--target-col",
          "label", "--folds", "3", "--jobs", "1", "-q", "--model", "linear", "--out", str(tmp_path / "r.json")])
    r = json.loads((tmp_path / "r.json").read_text())[0]
    assert r["model"] == "linear_probe" and len(r["params"]["C_per_fold"]) == 3 and r["test_mean"] > 0.8


def test_cli_evaluate_stacked(tmp_path):
    from ptls_meles.cli import main

    emb, targets = dense_signal(n=200, width=16, seed=5)
    emb.to_parquet(tmp_path / "e.parquet")
    pd.DataFrame({"client_id": emb["client_id"], "agg": np.random.default_rng(6).normal(size=200)}).to_parquet(tmp_path / "h.parquet")
    targets.to_csv(tmp_path / "t.csv", index=False)
    main(["evaluate", "--features", str(tmp_path / "h.parquet"), str(tmp_path / "e.parquet"), "--targets", str(tmp_path / "t.csv"),
          "--target-col", "label", "--folds", "3", "--jobs", "1", "-q", "--model", "stacked", "--out", str(tmp_path / "r.json")])
    r = json.loads((tmp_path / "r.json").read_text())[0]
    assert r["model"] == "stacked" and r["n_features"] == 17 and r["test_mean"] > 0.8


def test_cli_evaluate_blended_prints_each_components_scores(tmp_path, capsys):
    from ptls_meles.cli import main
    from ptls_meles.downstream.compare import load_results

    hand, emb, targets = _two_signals(n=300, width=16)
    hand.to_parquet(tmp_path / "h.parquet")
    emb.to_parquet(tmp_path / "e.parquet")
    targets.to_csv(tmp_path / "t.csv", index=False)
    main(["evaluate", "--features", str(tmp_path / "h.parquet"), str(tmp_path / "e.parquet"), "--targets", str(tmp_path / "t.csv"),
          "--target-col", "label", "--folds", "3", "--jobs", "1", "-q", "--model", "blended", "--seed", "3", "4",
          "--out", str(tmp_path / "r.json")])
    printed = capsys.readouterr().out
    r = json.loads((tmp_path / "r.json").read_text())[0]
    assert [s["model"] for s in r["splits"]] == ["blended", "blended"]
    for s in r["splits"]:
        trees = np.mean(s["params"]["components"]["lightgbm"]["test_scores"])
        probe = np.mean(s["params"]["components"]["linear_probe"]["test_scores"])
        assert f"split seed {s['seed']}: " in printed and f"lightgbm test {trees:.3f}" in printed
        assert f"linear_probe test {probe:.3f}" in printed
    main(["evaluate", "--features", str(tmp_path / "h.parquet"), str(tmp_path / "e.parquet"), "--targets", str(tmp_path / "t.csv"),
          "--target-col", "label", "--folds", "3", "--jobs", "1", "-q", "--model", "blended", "--blend-weight", "validation"])
    weights = re.search(r"probe's share per fold ([\d. ]+)", capsys.readouterr().out)
    assert weights and len(weights.group(1).split()) == 3
    with pytest.raises(SystemExit):
        main(["evaluate", "--features", str(tmp_path / "h.parquet"), "--targets", str(tmp_path / "t.csv"),
              "--target-col", "label", "--model", "blended", "--blend-weight", "half"])
    assert "expected a share in [0, 1] or 'validation'" in capsys.readouterr().err
    # compare reads a component in place of the blend: blend − its own trees, and probe − trees
    main(["compare", str(tmp_path / "r.json"), "--against", str(tmp_path / "r.json"), "--against-part", "lightgbm",
          "--out", str(tmp_path / "d.json")])
    main(["compare", str(tmp_path / "r.json"), "--part", "linear_probe", "--against", str(tmp_path / "r.json"),
          "--against-part", "lightgbm", "--out", str(tmp_path / "p.json")])
    (blend_gain,), (probe_gain,) = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("d", "p"))
    trees = [np.mean(s["params"]["components"]["lightgbm"]["test_scores"]) for s in r["splits"]]
    probes = [np.mean(s["params"]["components"]["linear_probe"]["test_scores"]) for s in r["splits"]]
    assert blend_gain["differences"] == pytest.approx([s["test_mean"] - t for s, t in zip(r["splits"], trees)])
    assert probe_gain["differences"] == pytest.approx(np.subtract(probes, trees))
    with pytest.raises(EvaluationError, match="has no component 'linear_probe'.*only evaluate --model blended"):
        load_results(_plain_result(tmp_path), "linear_probe")


def _plain_result(tmp_path):
    from ptls_meles.cli import main

    feats, targets = dense_signal(n=120, width=4, seed=1)
    feats.to_parquet(tmp_path / "plain.parquet")
    targets.to_csv(tmp_path / "plain.csv", index=False)
    main(["evaluate", "--features", str(tmp_path / "plain.parquet"), "--targets", str(tmp_path / "plain.csv"),
          "--target-col", "label", "--folds", "2", "--jobs", "1", "-q", "--out", str(tmp_path / "plain.json")])
    return tmp_path / "plain.json"


def test_cli_evaluate_offers_every_downstream_model():
    from ptls_meles.cli import build_parser
    from ptls_meles.downstream.evaluate import MODELS

    sub = next(a for a in build_parser()._actions if isinstance(a.choices, dict)).choices["evaluate"]
    assert tuple(next(a for a in sub._actions if a.dest == "model").choices) == MODELS


def test_evaluate_splits_is_evaluate_once_per_seed_and_the_mean_over_them():
    feats, targets = dense_signal(n=240, width=8, seed=7)
    splits = evaluate_splits(feats, targets, "label", seeds=[3, 1], n_folds=3, n_jobs=1, lgbm_params=SMALL_LGBM)
    alone = [evaluate(feats, targets, "label", seed=s, n_folds=3, n_jobs=1, lgbm_params=SMALL_LGBM) for s in (3, 1)]
    assert splits.seeds == [3, 1] and [r.test_scores for r in splits.results] == [r.test_scores for r in alone]
    # each seed draws its own test part
    assert alone[0].test_scores != alone[1].test_scores
    means = [r.test_mean for r in alone]
    assert splits.test_mean == pytest.approx(np.mean(means))
    assert splits.test_interval == pytest.approx(1.96 * np.std(means) / np.sqrt(2))
    assert splits.cv_mean == pytest.approx(np.mean([r.cv_mean for r in alone]))
    d = splits.to_dict()
    assert d["seeds"] == [3, 1] and [s["seed"] for s in d["splits"]] == [3, 1] and d["test_mean"] == splits.test_mean
    assert "over 2 splits" in splits.summary() and f"3: {means[0]:.3f}" in splits.summary()
    with pytest.raises(EvaluationError, match="distinct"):
        evaluate_splits(feats, targets, "label", seeds=[3, 3])
    with pytest.raises(EvaluationError, match="seeds="):
        evaluate_splits(feats, targets, "label", seeds=[3], seed=1)


def test_cli_evaluate_several_seeds_writes_the_mean_over_splits(tmp_path, capsys):
    from ptls_meles.cli import main

    args = _separable_evaluate_args(tmp_path)
    main(args + ["--seed", "5", "6", "--out", str(tmp_path / "two.json")])
    main(args + ["--seed", "6", "--out", str(tmp_path / "one.json")])
    (two,), (one,) = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("two", "one"))
    assert two["seeds"] == [5, 6] and two["splits"][1]["test_scores"] == one["test_scores"]
    assert two["test_mean"] == pytest.approx(np.mean([s["test_mean"] for s in two["splits"]]))
    out = capsys.readouterr().out
    assert "over 2 splits" in out
    assert out.index("  split seed 5: label: auroc test") < out.index("  split seed 6: label") < out.index("over 2 splits")


def test_evaluate_splits_by_client_id_not_by_row_order():
    feats, targets = dense_signal(n=200, width=4, seed=8)
    shuffled = feats.sample(frac=1.0, random_state=1)
    a = evaluate(feats, targets, "label", n_folds=3, n_jobs=1, lgbm_params=SMALL_LGBM)
    b = evaluate(shuffled, targets.sample(frac=1.0, random_state=2), "label", n_folds=3, n_jobs=1, lgbm_params=SMALL_LGBM)
    assert a.test_scores == b.test_scores and a.cv_scores == b.cv_scores
    assert a.join.clients_digest == b.join.clients_digest and len(a.join.clients_digest) == 16
    fewer = evaluate(feats[feats.client_id != 3], targets, "label", n_folds=3, n_jobs=1, lgbm_params=SMALL_LGBM)
    assert fewer.join.clients_digest != a.join.clients_digest


def _scored(n=240, seed=9, seeds=(42,)):
    """Two rows on the same clients: the signal column alone, and the signal beside noise."""
    feats, targets = dense_signal(n=n, width=4, seed=seed)
    noisy = feats.assign(**{f"noise_{i}": np.random.default_rng(i).normal(size=n) for i in range(4)})
    kw = dict(n_folds=3, n_jobs=1, lgbm_params=SMALL_LGBM)
    if len(seeds) == 1:
        return evaluate(feats, targets, "label", seed=seeds[0], **kw), evaluate(noisy, targets, "label", seed=seeds[0], **kw)
    return (evaluate_splits(feats, targets, "label", seeds=list(seeds), **kw),
            evaluate_splits(noisy, targets, "label", seeds=list(seeds), **kw))


def test_paired_difference_subtracts_fold_by_fold_on_one_split():
    from ptls_meles.downstream.compare import paired_difference

    a, b = _scored()
    d = paired_difference(a, b)
    assert d.unit == "fold" and d.seeds == [42]
    np.testing.assert_allclose(d.differences, np.subtract(a.test_scores, b.test_scores))
    np.testing.assert_allclose(d.cv_differences, np.subtract(a.cv_scores, b.cv_scores))
    assert d.mean == pytest.approx(a.test_mean - b.test_mean)
    assert d.interval == pytest.approx(1.96 * np.std(d.differences) / np.sqrt(3))
    assert d.verdict == ("above" if d.mean - d.interval > 0 else "below" if d.mean + d.interval < 0 else "level")
    assert paired_difference(a, a).differences == [0.0] * 3 and paired_difference(a, a).verdict == "level"
    assert f"{a.test_mean:.3f} − {b.test_mean:.3f}" in d.summary()


def test_paired_difference_over_splits_and_its_refusals():
    from ptls_meles.downstream.compare import paired_difference

    a, b = _scored(seeds=(5, 6))
    d = paired_difference(a, b)
    assert d.unit == "split" and d.seeds == [5, 6]
    np.testing.assert_allclose(d.differences, [ra.test_mean - rb.test_mean for ra, rb in zip(a.results, b.results)])
    single, _ = _scored(seeds=(7,))
    with pytest.raises(EvaluationError, match="no split with seed 7"):
        paired_difference(single, b)
    feats, targets = dense_signal(n=240, width=4, seed=9)
    other_clients = evaluate(feats[feats.client_id != 0], targets, "label", seed=5, n_folds=3, n_jobs=1, lgbm_params=SMALL_LGBM)
    with pytest.raises(EvaluationError, match="split differently|different clients"):
        paired_difference(other_clients, b.results[0])
    swapped = feats.assign(client_id=feats.client_id.where(feats.client_id != 0, 10_000))
    same_count = evaluate(swapped, pd.concat([targets, targets[targets.client_id == 0].assign(client_id=10_000)]), "label",
                          seed=5, n_folds=3, n_jobs=1, lgbm_params=SMALL_LGBM)
    with pytest.raises(EvaluationError, match="different clients"):
        paired_difference(same_count, b.results[0])


def test_cli_compare_reads_two_evaluate_files(tmp_path, capsys):
    from ptls_meles.cli import main
    from ptls_meles.downstream.compare import load_result_files, load_results

    feats, targets = separable(n=150, seed=3)
    feats.to_parquet(tmp_path / "both.parquet")
    feats[["client_id", "noise"]].to_parquet(tmp_path / "noise.parquet")
    targets.assign(other=targets.label).to_csv(tmp_path / "t.csv", index=False)
    args = ["--targets", str(tmp_path / "t.csv"), "--target-col", "label", "other", "--folds", "2", "--jobs", "1", "-q",
            "--seed", "5", "6"]
    main(["evaluate", "--features", str(tmp_path / "both.parquet"), *args, "--out", str(tmp_path / "both.json")])
    main(["evaluate", "--features", str(tmp_path / "noise.parquet"), *args, "--out", str(tmp_path / "noise.json")])
    main(["compare", str(tmp_path / "both.json"), "--against", str(tmp_path / "noise.json"), "--out", str(tmp_path / "d.json")])
    out = capsys.readouterr().out
    assert "label: auroc" in out and "paired over 2 splits" in out and "(above;" in out
    rows = json.loads((tmp_path / "d.json").read_text())
    both, noise = load_results(tmp_path / "both.json"), load_results(tmp_path / "noise.json")
    assert [r["target"] for r in rows] == ["label", "other"]
    assert rows[0]["mean"] == pytest.approx(both["label"].test_mean - noise["label"].test_mean)
    assert both["label"].results[1].test_scores == json.loads((tmp_path / "both.json").read_text())[0]["splits"][1]["test_scores"]
    (tmp_path / "bad.json").write_text('[{"target": "label"}]')
    with pytest.raises(EvaluationError, match="not an `evaluate --out` result"):
        load_results(tmp_path / "bad.json")

    # one row scored in two runs (seed 5, then seed 6) compares as the two-split row
    for seed in ("5", "6"):
        main(["evaluate", "--features", str(tmp_path / "both.parquet"), *args[:-3], "--seed", seed,
              "--out", str(tmp_path / f"both_{seed}.json")])
    main(["compare", str(tmp_path / "both_6.json"), str(tmp_path / "both_5.json"), "--against", str(tmp_path / "noise.json"),
          "--out", str(tmp_path / "joined.json")])
    joined = json.loads((tmp_path / "joined.json").read_text())
    assert [r["seeds"] for r in joined] == [[6, 5], [6, 5]]
    assert sorted(joined[0]["differences"]) == pytest.approx(sorted(rows[0]["differences"]))
    with pytest.raises(EvaluationError, match="split seed 5 is in both"):
        load_result_files([tmp_path / "both.json", tmp_path / "both_5.json"])
    main(["evaluate", "--features", str(tmp_path / "both.parquet"), *args[:-3], "--seed", "7", "--model", "linear",
          "--out", str(tmp_path / "probe_7.json")])
    with pytest.raises(EvaluationError, match="different models"):
        load_result_files([tmp_path / "both.json", tmp_path / "probe_7.json"])


def test_evaluate_keeps_the_probes_blas_to_n_jobs_threads(monkeypatch):
    from threadpoolctl import threadpool_info, threadpool_limits

    import ptls_meles.downstream.evaluate as ev

    seen, original = [], ev._linear_probe

    def recording(*args, **kwargs):
        seen.extend(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")
        return original(*args, **kwargs)

    monkeypatch.setattr(ev, "_linear_probe", recording)
    feats, targets = dense_signal(n=120, width=4, seed=2)
    with threadpool_limits(limits=2):  # a BLAS pool wider than n_jobs outside (tests run at one thread)
        outside = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
        evaluate(feats, targets, "label", n_folds=2, n_jobs=1, model="linear")
    assert outside and set(outside) == {2}
    assert seen and set(seen) == {1}
