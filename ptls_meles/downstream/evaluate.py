"""Downstream proof of a feature table: LightGBM (or a linear probe) with the MeLES paper's
protocol (:mod:`ptls_meles.downstream.protocol`: stratified test part, stratified K folds,
AUROC or accuracy, 95% intervals over the folds).
"""
from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from typing import Callable

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from ..io_utils import read_table
from .protocol import (EvalResult, EvaluationError, SplitsResult, Task, interval_half_width,  # noqa: F401
                       join_features_and_targets, plan_cv)

logger = logging.getLogger(__name__)

#: The MeLES paper's LightGBM settings; ``random_state`` and ``n_jobs`` are added per call.
PAPER_LGBM_PARAMS: dict = {
    "n_estimators": 1000,
    "learning_rate": 0.02,
    "num_leaves": 50,
    "subsample": 0.75,
    "subsample_freq": 1,
    "colsample_bytree": 0.75,  # = feature_fraction
    "verbose": -1,
}
#: LightGBM budgets by name (``evaluate --lgbm``, ``bench quality --lgbm``): the paper's 1,000 trees,
#: or a fifth of them at a higher rate on half the columns per tree, about seven times cheaper, for
#: wide tables (an embedding of thousands of columns) and many-class targets where the paper's takes
#: most of an hour a test part on one thread.
LGBM_PRESETS: dict[str, dict] = {
    "paper": PAPER_LGBM_PARAMS,
    "fast": {**PAPER_LGBM_PARAMS, "n_estimators": 200, "learning_rate": 0.07, "num_leaves": 31, "colsample_bytree": 0.5},
}

#: The downstream models :func:`evaluate` fits on a feature table.
MODELS = ("lightgbm", "linear", "stacked", "blended")
#: The linear probe's inverse regularisation strengths; each fold picks one by an inner CV.
LINEAR_CS: tuple[float, ...] = (1e-4, 3e-4, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
LINEAR_INNER_FOLDS = 3


def evaluate(
    features: pd.DataFrame | list[pd.DataFrame],
    targets: pd.DataFrame,
    target_col: str,
    task: Task = "auto",
    n_folds: int = 5,
    test_size: float = 0.1,
    seed: int = 42,
    lgbm_params: dict | None = None,
    id_col: str = "client_id",
    n_jobs: int = 2,
    labelled_fraction: float = 1.0,
    early_stopping_rounds: int | None = None,
    model: str = "lightgbm",
    blend_weight: float | None = 0.5,
) -> EvalResult:
    """Score feature table(s) on a target with LightGBM (stratified test part + K-fold CV).

    ``features``: one table or several, inner-joined on ``id_col``; every column but
    ``id_col`` is a feature and must be numeric or bool. ``lgbm_params`` override
    :data:`PAPER_LGBM_PARAMS` key by key. Labels may be any values; they are mapped to
    ``0..C-1`` in sorted order (``EvalResult.classes``). ``test_size=0`` skips the test part.
    ``labelled_fraction < 1`` keeps only that share of the training part labelled
    (:func:`~ptls_meles.downstream.protocol.labelled_subsample`); the test part stays the same.
    ``early_stopping_rounds``: stop adding trees when the fold's validation loss has not
    improved for that many rounds and score the best round (reported in ``best_epochs``);
    the validation fold then also picks the round, so cv scores are slightly optimistic,
    test scores are not. Off by default, so earlier figures reproduce; apply it to every
    feature table of a comparison alike.

    ``model="linear"``: a linear probe instead, the usual read-out of self-supervised
    embeddings: missing values imputed by the fold's medians, standardised columns, and
    logistic regression whose strength each fold picks from :data:`LINEAR_CS` by a
    stratified inner CV on its training clients (the chosen values are in ``params``).
    Dense embeddings spread what they know over every column, which trees read one split
    at a time; a linear read-out sees the whole direction at once.

    ``model="stacked"`` (two or more tables): LightGBM on every table but the last, plus the
    last table's linear-probe class probabilities — out of fold for the fold's training
    clients (an inner CV at the strength the probe chose), from the probe fitted on all of
    them for the others. Each table is read the way it is read best: aggregates by trees, a
    dense embedding by one direction per class, so a "both" row does not drown a few
    aggregates among hundreds of embedding columns.

    ``model="blended"``: the mean of two models' class probabilities, LightGBM on every table
    but the last and the linear probe on the last (given one table, both read it: the
    control that tells a gain of the embedding from a gain of averaging two read-outs). Two
    models of near-equal strength that err apart gain from an average, which a stacked
    column, split on a few thresholds by trees, may not pass on. Each component's scores per
    fold are kept in ``params["components"]``, so one run also gives both rows alone.
    ``blend_weight``: the probe's share of the blend (0.5: the plain mean); ``None``: each fold
    picks it from :data:`BLEND_WEIGHTS` by its validation score (``params["weight_per_fold"]``),
    so a weak component is not forced in at half weight; the validation fold then also picks
    the weight, so cv scores are slightly optimistic, test scores are not (as with early stopping).
    """
    if model not in MODELS:
        raise EvaluationError(f"model must be one of {MODELS}, got {model!r}")
    if early_stopping_rounds is not None and early_stopping_rounds < 1:
        raise EvaluationError(f"early_stopping_rounds must be >= 1 or None, got {early_stopping_rounds}")
    if early_stopping_rounds is not None and model != "lightgbm":
        raise EvaluationError(f"early_stopping_rounds applies to model='lightgbm' only, not to model={model!r}")
    if blend_weight is not None and not 0.0 <= blend_weight <= 1.0:
        raise EvaluationError(f"blend_weight must be in [0, 1] or None (picked on each validation fold), got {blend_weight}")
    if blend_weight != 0.5 and model != "blended":
        raise EvaluationError(f"blend_weight applies to model='blended' only, not to model={model!r}")
    tables = [features] if isinstance(features, pd.DataFrame) else list(features)
    if model == "stacked" and len(tables) < 2:
        raise EvaluationError("model='stacked' needs two or more feature tables: LightGBM reads all but the last, "
                              "a linear probe the last (e.g. [handcrafted, embeddings])")
    X, y_raw, report = join_features_and_targets(tables, targets, target_col, id_col)
    plan = plan_cv(y_raw, report, target_col, task, n_folds, test_size, seed, labelled_fraction)
    lgbm = {**PAPER_LGBM_PARAMS, "random_state": seed, "n_jobs": n_jobs, **(lgbm_params or {})}
    if model == "linear":
        folds, name = _LinearFolds(_probe_values(X), plan, seed, n_jobs), "linear_probe"
    elif model in ("stacked", "blended"):
        probed = [c for c in tables[-1].columns if c != id_col]
        if not probed:
            raise EvaluationError(f"model={model!r}: the last feature table (the one the probe reads) has no column "
                                  f"besides {id_col!r}; pass e.g. [handcrafted, embeddings]")
        trees = X if len(tables) == 1 else X.drop(columns=probed)
        if model == "stacked":
            folds, name = _StackedFolds(trees, _probe_values(X[probed]), plan, lgbm, seed, n_jobs), "stacked"
        else:
            folds, name = _BlendedFolds(trees, _probe_values(X[probed]), plan, lgbm, seed, n_jobs, blend_weight), "blended"
    else:
        folds, name = _LightGBMFolds(X, plan, lgbm, early_stopping_rounds), "lightgbm"
    if model != "linear":
        _warn_small_folds(min(len(fit_rows) for fit_rows, _ in plan.folds), lgbm, target_col)

    cv_scores, test_scores = [], []
    # n_jobs bounds every pool, not only LightGBM's: the probe's BLAS would take every core
    # and slow an evaluation run beside this one (the contract is one process, n_jobs threads)
    with threadpool_limits(limits=n_jobs):
        for fold, (fit_rows, val_rows) in enumerate(plan.folds):
            predict = folds.fit(fit_rows, val_rows)
            cv_scores.append(plan.score(val_rows, predict(val_rows)))
            if len(plan.test_idx):
                test_scores.append(plan.score(plan.test_idx, predict(plan.test_idx)))
            logger.info("%s fold %d/%d (%s): cv %.4f%s", target_col, fold + 1, n_folds, name, cv_scores[-1],
                        f", test {test_scores[-1]:.4f}" if test_scores else "")
    return plan.result(cv_scores, test_scores, X.shape[1], name, folds.params, folds.best_rounds)


def evaluate_splits(features: pd.DataFrame | list[pd.DataFrame], targets: pd.DataFrame, target_col: str,
                    seeds: list[int], on_split: Callable[[EvalResult], None] | None = None, **kwargs) -> SplitsResult:
    """:func:`evaluate` once per seed in ``seeds`` (each its own test part, folds and
    LightGBM seed) and the mean over them: a comparison judged on several test parts, not
    on one draw of clients. ``on_split`` is called with each split's result as it ends (a
    long read-out shows its progress). ``kwargs`` go to :func:`evaluate` (not ``seed``)."""
    if "seed" in kwargs:
        raise EvaluationError("evaluate_splits takes the seeds as seeds=[...], not seed=")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) < len(seeds):
        raise EvaluationError(f"seeds must be one or more distinct integers, got {seeds}")
    results = []
    for s in seeds:
        results.append(evaluate(features, targets, target_col, seed=s, **kwargs))
        if on_split is not None:
            on_split(results[-1])
    result = SplitsResult(results)
    logger.info("%s", result.summary())
    return result


Predict = Callable[[np.ndarray], np.ndarray]  # rows of the joined clients -> class probabilities


class _LightGBMFolds:
    """Per fold: LightGBM on every column (early stopping on the validation fold, if asked)."""

    def __init__(self, X: pd.DataFrame, plan, params: dict, early_stopping_rounds: int | None) -> None:
        # plain arrays: LightGBM rejects some characters that category values bring into column names
        self.values, self.y, self.early = X.to_numpy(dtype=np.float32, na_value=np.nan), plan.y, early_stopping_rounds
        self.params = params if early_stopping_rounds is None else {**params, "early_stopping_rounds": early_stopping_rounds}
        self.fit_params = params
        self.best_rounds: list[int] = []

    def fit(self, fit_rows: np.ndarray, val_rows: np.ndarray) -> Predict:
        import lightgbm as lgb

        model = lgb.LGBMClassifier(**self.fit_params)
        if self.early is None:
            model.fit(self.values[fit_rows], self.y[fit_rows])
        else:
            model.fit(self.values[fit_rows], self.y[fit_rows], eval_set=[(self.values[val_rows], self.y[val_rows])],
                      callbacks=[lgb.early_stopping(self.early, verbose=False)])
            self.best_rounds.append(int(model.best_iteration_))
        return lambda rows: model.predict_proba(self.values[rows])


def _probe_values(X: pd.DataFrame) -> np.ndarray:
    values = np.array(X.to_numpy(dtype=np.float64, na_value=np.nan))  # a writable copy
    values[~np.isfinite(values)] = np.nan  # ±inf imputed like a missing value
    return values


def _linear_probe(C: float | None, task: str, seed: int, n_jobs: int):
    """Median imputation, standardisation, logistic regression: at strength ``C``, or (None)
    at the strength of :data:`LINEAR_CS` a stratified inner CV scores best."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if C is None:
        inner = StratifiedKFold(LINEAR_INNER_FOLDS, shuffle=True, random_state=seed)
        scoring = "roc_auc" if task == "binary" else "accuracy"
        head = LogisticRegressionCV(Cs=list(LINEAR_CS), cv=inner, scoring=scoring, max_iter=2000, n_jobs=n_jobs)
    else:
        head = LogisticRegression(C=C, max_iter=2000)
    return make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(), head)


@contextmanager
def _without_sklearn_renaming_notices():
    """scikit-learn 1.8+ announces renamed logistic-regression attributes and defaults on every
    fit; what the probe reads (``C_``, probabilities) is the same under both names."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


class _LinearFolds:
    """Per fold: the linear probe, its strength picked on the fold's training clients."""

    def __init__(self, values: np.ndarray, plan, seed: int, n_jobs: int) -> None:
        self.values, self.plan, self.seed, self.n_jobs = values, plan, seed, n_jobs
        self.best_rounds: list[int] = []  # no rounds: nothing stops early
        self.params = {"Cs": list(LINEAR_CS), "inner_folds": LINEAR_INNER_FOLDS, "C_per_fold": []}

    def fit_probe(self, rows: np.ndarray):
        with _without_sklearn_renaming_notices():
            probe = _linear_probe(None, self.plan.task, self.seed, self.n_jobs).fit(self.values[rows], self.plan.y[rows])
        self.params["C_per_fold"].append(float(np.atleast_1d(probe[-1].C_)[0]))
        return probe

    def fit(self, fit_rows: np.ndarray, val_rows: np.ndarray) -> Predict:
        probe = self.fit_probe(fit_rows)
        return lambda rows: probe.predict_proba(self.values[rows])


class _StackedFolds:
    """Per fold: LightGBM on the aggregates plus the embedding's linear-probe probabilities."""

    def __init__(self, trees: pd.DataFrame, probed: np.ndarray, plan, lgbm: dict, seed: int, n_jobs: int) -> None:
        self.best_rounds: list[int] = []
        self.trees = trees.to_numpy(dtype=np.float32, na_value=np.nan)
        self.probe = _LinearFolds(probed, plan, seed, n_jobs)
        self.plan, self.lgbm, self.seed = plan, lgbm, seed
        self.params = {**lgbm, "probe": self.probe.params}

    def fit(self, fit_rows: np.ndarray, val_rows: np.ndarray) -> Predict:
        import lightgbm as lgb
        from sklearn.model_selection import StratifiedKFold, cross_val_predict

        y, values = self.plan.y, self.probe.values
        probe = self.probe.fit_probe(fit_rows)
        proba = probe.predict_proba(values)
        inner = StratifiedKFold(LINEAR_INNER_FOLDS, shuffle=True, random_state=self.seed)
        with _without_sklearn_renaming_notices():
            proba[fit_rows] = cross_val_predict(_linear_probe(self.probe.params["C_per_fold"][-1], self.plan.task, self.seed, 1),
                                                values[fit_rows], y[fit_rows], cv=inner, method="predict_proba")
        stacked = np.hstack([self.trees, (proba[:, 1:] if proba.shape[1] == 2 else proba).astype(np.float32)])
        model = lgb.LGBMClassifier(**self.lgbm).fit(stacked[fit_rows], y[fit_rows])
        return lambda rows: model.predict_proba(stacked[rows])


#: the probe's shares a blend picks from on each validation fold (``blend_weight=None``)
BLEND_WEIGHTS = tuple(i / 10 for i in range(11))


class _BlendedFolds:
    """Per fold: LightGBM's probabilities on the aggregates and the probe's on the embedding,
    averaged at a fixed or a validation-picked weight; each component's own cv and test scores
    are kept beside the blend's."""

    def __init__(self, trees: pd.DataFrame, probed: np.ndarray, plan, lgbm: dict, seed: int, n_jobs: int,
                 weight: float | None = 0.5) -> None:
        self.best_rounds: list[int] = []
        self.trees = _LightGBMFolds(trees, plan, lgbm, None)
        self.probe = _LinearFolds(probed, plan, seed, n_jobs)
        self.plan, self.weight = plan, weight
        self.components = {part: {"cv_scores": [], "test_scores": []} for part in ("lightgbm", "linear_probe")}
        self.params = {**lgbm, "probe": self.probe.params, "components": self.components,
                       "blend_weight": "validation" if weight is None else weight}
        if weight is None:
            self.params["weight_per_fold"] = []

    def _pick_weight(self, val_rows: np.ndarray, trees: np.ndarray, probe: np.ndarray) -> float:
        """The share scoring best on the validation fold; of equal scores, the one nearest 0.5."""
        scores = [self.plan.score(val_rows, (1 - w) * trees + w * probe) for w in BLEND_WEIGHTS]
        best = max(scores)
        weight = min((w for w, s in zip(BLEND_WEIGHTS, scores) if s == best), key=lambda w: abs(w - 0.5))
        self.params["weight_per_fold"].append(weight)
        return weight

    def fit(self, fit_rows: np.ndarray, val_rows: np.ndarray) -> Predict:
        parts = {"lightgbm": self.trees.fit(fit_rows, val_rows), "linear_probe": self.probe.fit(fit_rows, val_rows)}
        test_rows = self.plan.test_idx
        on_val = {part: predict(val_rows) for part, predict in parts.items()}
        for part, predict in parts.items():
            self.components[part]["cv_scores"].append(self.plan.score(val_rows, on_val[part]))
            if len(test_rows):
                self.components[part]["test_scores"].append(self.plan.score(test_rows, predict(test_rows)))
        w = self.weight if self.weight is not None else self._pick_weight(val_rows, *on_val.values())
        return lambda rows: (1 - w) * parts["lightgbm"](rows) + w * parts["linear_probe"](rows)


def components_summary(result: EvalResult) -> str:
    """``"; lightgbm test 0.851 (cv 0.853), linear_probe test …"`` for a blended result (and the
    probe's share each fold picked, if it picked one), else ``""``."""
    parts = result.params.get("components", {})
    weights = result.params.get("weight_per_fold")
    return "".join(f"; {part} test {np.mean(s['test_scores']) if s['test_scores'] else float('nan'):.3f} "
                   f"(cv {np.mean(s['cv_scores']):.3f})" for part, s in parts.items()) + \
        (f"; probe's share per fold {' '.join(f'{w:.1f}' for w in weights)}" if weights else "")


def load_feature_table(path: str | os.PathLike, id_col: str = "client_id") -> pd.DataFrame:
    """Read a Parquet or CSV feature/embedding table (``client_id, emb_000, ...``)."""
    table = read_table(path, "feature table")
    if id_col not in table.columns:
        raise EvaluationError(
            f"feature table {path} has no client id column {id_col!r}; columns: {list(table.columns)[:10]}"
        )
    return table


def _warn_small_folds(fit_size: int, params: dict, target_col: str) -> None:
    """LightGBM makes no split when a leaf would hold fewer than ``min_child_samples`` clients:
    on folds that small every model predicts one constant, and AUROC reads 0.500 ± 0.000."""
    min_child = int(params.get("min_child_samples", params.get("min_data_in_leaf", 20)))
    if fit_size < 2 * min_child:
        logger.warning(
            "target %r: the training folds hold only %d labelled clients, fewer than 2 × LightGBM's min_child_samples=%d, "
            "so the trees can barely split (or not at all) and the scores say little; label more clients, use fewer folds, "
            "or pass lgbm_params={'min_child_samples': ...}", target_col, fit_size, min_child,
        )
