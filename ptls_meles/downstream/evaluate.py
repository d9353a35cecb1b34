"""Downstream proof of a feature table: LightGBM (or a linear probe) with the MeLES paper's
protocol (:mod:`ptls_meles.downstream.protocol`: stratified test part, stratified K folds,
AUROC or accuracy, 95% intervals over the folds).
"""
from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import pandas as pd

from ..io_utils import read_table
from .protocol import EvalResult, EvaluationError, Task, interval_half_width, join_features_and_targets, plan_cv  # noqa: F401

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

#: The downstream models :func:`evaluate` fits on a feature table.
MODELS = ("lightgbm", "linear")
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
    """
    if model not in MODELS:
        raise EvaluationError(f"model must be one of {MODELS}, got {model!r}")
    if early_stopping_rounds is not None and early_stopping_rounds < 1:
        raise EvaluationError(f"early_stopping_rounds must be >= 1 or None, got {early_stopping_rounds}")
    X, y_raw, report = join_features_and_targets(features, targets, target_col, id_col)
    plan = plan_cv(y_raw, report, target_col, task, n_folds, test_size, seed, labelled_fraction)
    if model == "linear":
        if early_stopping_rounds is not None:
            raise EvaluationError("early_stopping_rounds applies to LightGBM only, not to model='linear'")
        return _evaluate_linear(X, plan, seed, n_jobs)
    import lightgbm as lgb

    params = {**PAPER_LGBM_PARAMS, "random_state": seed, "n_jobs": n_jobs, **(lgbm_params or {})}
    _warn_small_folds(min(len(fit_rows) for fit_rows, _ in plan.folds), params, target_col)
    # plain arrays: LightGBM rejects some characters that category values bring into column names
    values = X.to_numpy(dtype=np.float32, na_value=np.nan)
    y = plan.y

    cv_scores, test_scores, best_rounds = [], [], []
    for fold, (fit_rows, val_rows) in enumerate(plan.folds):
        model = lgb.LGBMClassifier(**params)
        if early_stopping_rounds is None:
            model.fit(values[fit_rows], y[fit_rows])
        else:
            model.fit(values[fit_rows], y[fit_rows], eval_set=[(values[val_rows], y[val_rows])],
                      callbacks=[lgb.early_stopping(early_stopping_rounds, verbose=False)])
            best_rounds.append(int(model.best_iteration_))
        cv_scores.append(plan.score(val_rows, model.predict_proba(values[val_rows])))
        if len(plan.test_idx):
            test_scores.append(plan.score(plan.test_idx, model.predict_proba(values[plan.test_idx])))
        logger.info("%s fold %d/%d: cv %.4f%s", target_col, fold + 1, n_folds, cv_scores[-1],
                    f", test {test_scores[-1]:.4f}" if test_scores else "")
    if early_stopping_rounds is not None:
        params = {**params, "early_stopping_rounds": early_stopping_rounds}
    return plan.result(cv_scores, test_scores, X.shape[1], "lightgbm", params, best_rounds)


def _evaluate_linear(X: pd.DataFrame, plan, seed: int, n_jobs: int) -> EvalResult:
    """The linear probe on ``plan``'s folds (see :func:`evaluate`)."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    values = np.array(X.to_numpy(dtype=np.float64, na_value=np.nan))  # a writable copy
    values[~np.isfinite(values)] = np.nan  # ±inf imputed like a missing value
    y = plan.y
    scoring = "roc_auc" if plan.task == "binary" else "accuracy"
    cv_scores, test_scores, chosen = [], [], []
    for fold, (fit_rows, val_rows) in enumerate(plan.folds):
        inner = StratifiedKFold(LINEAR_INNER_FOLDS, shuffle=True, random_state=seed)
        probe = make_pipeline(
            SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(),
            LogisticRegressionCV(Cs=list(LINEAR_CS), cv=inner, scoring=scoring, max_iter=2000, n_jobs=n_jobs),
        )
        with warnings.catch_warnings():  # scikit-learn 1.8+ announces renamed attributes; C_ reads the same
            warnings.simplefilter("ignore", FutureWarning)
            probe.fit(values[fit_rows], y[fit_rows])
        chosen.append(float(np.atleast_1d(probe[-1].C_)[0]))
        cv_scores.append(plan.score(val_rows, probe.predict_proba(values[val_rows])))
        if len(plan.test_idx):
            test_scores.append(plan.score(plan.test_idx, probe.predict_proba(values[plan.test_idx])))
        logger.info("%s fold %d/%d (linear, C=%g): cv %.4f", plan.target, fold + 1, len(plan.folds), chosen[-1],
                    cv_scores[-1])
    params = {"Cs": list(LINEAR_CS), "inner_folds": LINEAR_INNER_FOLDS, "C_per_fold": chosen, "scoring": scoring}
    return plan.result(cv_scores, test_scores, X.shape[1], "linear_probe", params)


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
