"""Downstream proof of a feature table: LightGBM with the MeLES paper's protocol.

Protocol (as in the reference implementation): a stratified random test part
(``test_size``), stratified K-fold cross-validation on the rest; every fold's model
scores its validation fold and the same fixed test part. Reported per part: the mean
of the K fold scores, the scores themselves, and the 95% interval half-width
``1.96 · std(scores, ddof=0) / √K``. Metrics: AUROC for binary targets, accuracy
for multiclass ones.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

Z_95 = 1.96
INTERVAL_DDOF = 0

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


class EvaluationError(ValueError):
    """Bad input for downstream evaluation: missing column, too few labels, one class."""


@dataclass
class JoinReport:
    """What joining features to labels kept and left out (nothing is dropped uncounted)."""

    rows_per_table: list[int]
    n_joined_features: int  # clients present in every feature table
    n_dropped_in_join: int  # clients present in some feature table but not all
    n_targets: int  # rows of the target table
    n_unlabelled: int  # target rows with a missing label (excluded)
    n_labelled_missing_features: int  # labelled clients absent from the joined features
    n_features_without_target: int  # joined feature clients with no target row
    n_used: int  # labelled clients with features: what the evaluation runs on


@dataclass
class EvalResult:
    """Scores of one downstream evaluation plus everything needed to trace it."""

    target: str
    task: str
    metric: str
    n_folds: int
    cv_scores: list[float]
    test_scores: list[float]
    n_train: int
    n_test: int
    n_features: int
    classes: list  # original label of class i (the label mapping is label -> position)
    join: JoinReport
    lgbm_params: dict = field(default_factory=dict)
    seed: int = 42
    interval_ddof: int = INTERVAL_DDOF

    @property
    def label_mapping(self) -> dict:
        return {label: i for i, label in enumerate(self.classes)}

    @property
    def cv_mean(self) -> float:
        return float(np.mean(self.cv_scores))

    @property
    def cv_interval(self) -> float:
        return interval_half_width(self.cv_scores, self.interval_ddof)

    @property
    def test_mean(self) -> float | None:
        return float(np.mean(self.test_scores)) if self.test_scores else None

    @property
    def test_interval(self) -> float | None:
        return interval_half_width(self.test_scores, self.interval_ddof) if self.test_scores else None

    def summary(self) -> str:
        cv = f"cv {self.cv_mean:.3f} ± {self.cv_interval:.3f}"
        parts = f"{self.n_folds} folds, {self.n_train} train / {self.n_test} test clients"
        if self.test_scores:
            return f"{self.target}: {self.metric} test {self.test_mean:.3f} ± {self.test_interval:.3f} ({cv}), {parts}"
        return f"{self.target}: {self.metric} {cv}, {parts}"

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (scores, means, intervals, join counts, params)."""
        d = asdict(self)
        d["classes"] = [_plain(c) for c in self.classes]
        d.update(
            cv_mean=self.cv_mean,
            cv_interval=self.cv_interval,
            test_mean=self.test_mean,
            test_interval=self.test_interval,
        )
        return _plain(d)


def interval_half_width(scores, ddof: int = INTERVAL_DDOF) -> float:
    """95% interval half-width of a mean of fold scores: 1.96 · std / √K."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) <= ddof:
        return float("nan")
    return float(Z_95 * scores.std(ddof=ddof) / math.sqrt(len(scores)))



def labelled_subsample(y: np.ndarray, train_idx: np.ndarray, fraction: float, min_per_class: int, seed: int) -> np.ndarray:
    """The kept part of ``train_idx`` (its order preserved) when only ``fraction`` of it is labelled.

    Stratified: per class ``ceil(fraction · n_c)`` clients (at least ``min_per_class``),
    chosen by one seeded random rank per client, so a smaller fraction's clients are
    always a subset of a larger one's. ``fraction = 1`` returns ``train_idx`` unchanged.
    """
    if not 0 < fraction <= 1:
        raise EvaluationError(f"labelled fraction must be in (0, 1], got {fraction}")
    train_idx = np.asarray(train_idx)
    if fraction == 1:
        return train_idx
    rank = np.random.default_rng([seed, 5]).random(len(train_idx))
    labels = np.asarray(y)[train_idx]
    keep = np.zeros(len(train_idx), bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_keep = min(len(members), max(min_per_class, math.ceil(fraction * len(members))))
        keep[members[np.argsort(rank[members], kind="stable")[:n_keep]]] = True
    return train_idx[keep]


def check_protocol(n_folds: int, test_size: float, task: str, error: type[ValueError] = EvaluationError) -> None:
    """The checks every evaluation row shares (LightGBM and the neural baselines)."""
    if n_folds < 2:
        raise error(f"n_folds must be >= 2, got {n_folds}")
    if not 0 <= test_size < 1:
        raise error(f"test_size must be in [0, 1), got {test_size}")
    if task not in ("auto", "binary", "multiclass"):
        raise error(f"task must be 'auto', 'binary' or 'multiclass', got {task!r}")


def evaluate(
    features: pd.DataFrame | list[pd.DataFrame],
    targets: pd.DataFrame,
    target_col: str,
    task: Literal["auto", "binary", "multiclass"] = "auto",
    n_folds: int = 5,
    test_size: float = 0.1,
    seed: int = 42,
    lgbm_params: dict | None = None,
    id_col: str = "client_id",
    n_jobs: int = 2,
    labelled_fraction: float = 1.0,
) -> EvalResult:
    """Score feature table(s) on a target with LightGBM (stratified test part + K-fold CV).

    ``features``: one table or several, inner-joined on ``id_col``; every column but
    ``id_col`` is a feature and must be numeric or bool. ``lgbm_params`` override
    :data:`PAPER_LGBM_PARAMS` key by key. Labels may be any values; they are mapped to
    ``0..C-1`` in sorted order (``EvalResult.classes``). ``test_size=0`` skips the test part.
    ``labelled_fraction < 1`` keeps only that share of the training part labelled
    (:func:`labelled_subsample`); the test part stays exactly the same.
    """
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.model_selection import StratifiedKFold, train_test_split

    check_protocol(n_folds, test_size, task)

    X, y_raw, report = join_features_and_targets(features, targets, target_col, id_col)
    classes, y = _encode_labels(y_raw, target_col)
    task = _resolve_task(task, len(classes), target_col)
    _check_enough_labels(y, classes, n_folds, test_size, target_col)

    index = np.arange(len(y))
    if test_size > 0:
        train_idx, test_idx = train_test_split(index, test_size=test_size, stratify=y, random_state=seed)
    else:
        train_idx, test_idx = index, index[:0]
    train_idx = labelled_subsample(y, train_idx, labelled_fraction, n_folds, seed)
    per_class = np.bincount(y[train_idx], minlength=len(classes))
    if per_class.min() < n_folds:
        raise EvaluationError(
            f"target {target_col!r}: class {classes[int(per_class.argmin())]!r} has only {int(per_class.min())} "
            f"clients outside the test part, fewer than n_folds={n_folds}"
        )

    params = {**PAPER_LGBM_PARAMS, "random_state": seed, "n_jobs": n_jobs, **(lgbm_params or {})}
    _warn_small_folds(len(train_idx), n_folds, params, target_col)

    # plain arrays: LightGBM rejects some characters that category values bring into column names
    values = X.to_numpy(dtype=np.float32, na_value=np.nan)

    def score(model, rows: np.ndarray) -> float:
        if task == "binary":
            return float(roc_auc_score(y[rows], model.predict_proba(values[rows])[:, 1]))
        return float(accuracy_score(y[rows], model.predict(values[rows])))

    import lightgbm as lgb

    cv_scores, test_scores = [], []
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (fit_pos, val_pos) in enumerate(folds.split(train_idx, y[train_idx])):
        fit_rows, val_rows = train_idx[fit_pos], train_idx[val_pos]
        model = lgb.LGBMClassifier(**params)
        model.fit(values[fit_rows], y[fit_rows])
        cv_scores.append(score(model, val_rows))
        if len(test_idx):
            test_scores.append(score(model, test_idx))
        logger.info("%s fold %d/%d: cv %.4f%s", target_col, fold + 1, n_folds, cv_scores[-1],
                    f", test {test_scores[-1]:.4f}" if test_scores else "")

    result = EvalResult(
        target=target_col,
        task=task,
        metric="auroc" if task == "binary" else "accuracy",
        n_folds=n_folds,
        cv_scores=cv_scores,
        test_scores=test_scores,
        n_train=len(train_idx),
        n_test=len(test_idx),
        n_features=X.shape[1],
        classes=list(classes),
        join=report,
        lgbm_params=params,
        seed=seed,
    )
    logger.info(result.summary())
    return result


def join_features_and_targets(
    features: pd.DataFrame | list[pd.DataFrame],
    targets: pd.DataFrame,
    target_col: str,
    id_col: str = "client_id",
) -> tuple[pd.DataFrame, np.ndarray, JoinReport]:
    """Inner-join the feature tables and the labelled targets; count every client left out."""
    tables = [features] if isinstance(features, pd.DataFrame) else list(features)
    if not tables:
        raise EvaluationError("no feature tables given")
    if id_col not in targets.columns:
        raise EvaluationError(f"target table has no id column {id_col!r}; columns: {list(targets.columns)}")
    if target_col not in targets.columns:
        raise EvaluationError(
            f"target column {target_col!r} is not in the target table; columns: {list(targets.columns)}"
        )
    _check_unique_ids(targets, id_col, "target table")

    seen_columns: dict[str, int] = {}
    joined: pd.DataFrame | None = None
    all_ids: list[pd.Index] = []
    for i, table in enumerate(tables):
        if id_col not in table.columns:
            raise EvaluationError(f"feature table {i} has no id column {id_col!r}; columns: {list(table.columns)[:10]}")
        _check_unique_ids(table, id_col, f"feature table {i}")
        for col in table.columns:
            if col == id_col:
                continue
            if col == target_col:
                raise EvaluationError(f"feature table {i} holds the target column {target_col!r}; drop it (label leak)")
            if col in seen_columns:
                raise EvaluationError(f"feature column {col!r} is in feature tables {seen_columns[col]} and {i}; rename one")
            seen_columns[col] = i
            if not (pd.api.types.is_numeric_dtype(table[col]) or pd.api.types.is_bool_dtype(table[col])):
                example = table[col].dropna().iloc[0] if table[col].notna().any() else None
                raise EvaluationError(
                    f"feature column {col!r} (table {i}) is not numeric: dtype {table[col].dtype}, e.g. {example!r}"
                )
        all_ids.append(pd.Index(table[id_col]))
        joined = table if joined is None else _merge(joined, table, id_col, f"feature table {i}")

    union = all_ids[0]
    for ids in all_ids[1:]:
        union = union.union(ids)
    n_dropped_in_join = len(union) - len(joined)

    labels = targets[[id_col, target_col]]
    unlabelled = labels[target_col].isna()
    labels = labels[~unlabelled]
    merged = _merge(joined, labels, id_col, "target table")
    report = JoinReport(
        rows_per_table=[len(t) for t in tables],
        n_joined_features=len(joined),
        n_dropped_in_join=int(n_dropped_in_join),
        n_targets=len(targets),
        n_unlabelled=int(unlabelled.sum()),
        n_labelled_missing_features=len(labels) - len(merged),
        n_features_without_target=len(joined) - len(merged) - int(joined[id_col].isin(targets.loc[unlabelled, id_col]).sum()),
        n_used=len(merged),
    )
    _log_join(report, tables, target_col)
    if report.n_used == 0:
        raise EvaluationError(
            f"no labelled client of target {target_col!r} has features: check that {id_col!r} values match "
            f"(features e.g. {_plain(joined[id_col].iloc[0]) if len(joined) else None!r}, "
            f"targets e.g. {_plain(labels[id_col].iloc[0]) if len(labels) else None!r})"
        )
    X = merged.drop(columns=[id_col, target_col])
    return X, merged[target_col].to_numpy(), report


def load_feature_table(path: str | os.PathLike, id_col: str = "client_id") -> pd.DataFrame:
    """Read a Parquet or CSV feature/embedding table (``client_id, emb_000, ...``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no feature table at {path}")
    name = path.name.lower()
    if path.is_dir() or name.endswith((".parquet", ".pq")):
        table = pd.read_parquet(path)
    elif name.endswith((".csv", ".csv.gz", ".tsv")):
        table = pd.read_csv(path, sep="\t" if name.endswith(".tsv") else ",")
    else:
        raise EvaluationError(f"feature table {path}: unknown format (expected .parquet, .pq, .csv, .csv.gz or .tsv)")
    if id_col not in table.columns:
        raise EvaluationError(
            f"feature table {path} has no client id column {id_col!r}; columns: {list(table.columns)[:10]}"
        )
    return table


# --------------------------------------------------------------------------- helpers
def _check_unique_ids(table: pd.DataFrame, id_col: str, what: str) -> None:
    null = table[id_col].isna()
    if null.any():
        raise EvaluationError(f"{what}: column {id_col!r} has {int(null.sum())} null ids, e.g. at row {int(null.to_numpy().argmax())}")
    dup = table[id_col].duplicated()
    if dup.any():
        raise EvaluationError(
            f"{what}: column {id_col!r} has {int(dup.sum())} duplicated ids, e.g. {_plain(table.loc[dup, id_col].iloc[0])!r}"
        )


def _merge(left: pd.DataFrame, right: pd.DataFrame, id_col: str, what: str) -> pd.DataFrame:
    try:
        return left.merge(right, on=id_col, how="inner")
    except ValueError as e:  # e.g. int ids in one table, string ids in the other
        raise EvaluationError(
            f"cannot join {what} on {id_col!r}: {e} (id dtypes {left[id_col].dtype} and {right[id_col].dtype})"
        ) from e


def _encode_labels(y_raw: np.ndarray, target_col: str) -> tuple[list, np.ndarray]:
    classes, y = np.unique(y_raw, return_inverse=True)
    if len(classes) < 2:
        raise EvaluationError(
            f"target {target_col!r} has a single class {_plain(classes[0])!r} among its labelled clients; nothing to predict"
        )
    return [_plain(c) for c in classes], y.astype(np.int64)


def _resolve_task(task: str, n_classes: int, target_col: str) -> str:
    if task == "auto":
        return "binary" if n_classes == 2 else "multiclass"
    if task == "binary" and n_classes != 2:
        raise EvaluationError(f"task 'binary' but target {target_col!r} has {n_classes} classes")
    return task


def _warn_small_folds(n_train: int, n_folds: int, params: dict, target_col: str) -> None:
    """LightGBM makes no split when a leaf would hold fewer than ``min_child_samples`` clients:
    on folds that small every model predicts one constant, and AUROC reads 0.500 ± 0.000."""
    min_child = int(params.get("min_child_samples", params.get("min_data_in_leaf", 20)))
    fit_size = n_train - -(-n_train // n_folds)  # the smallest training fold
    if fit_size < 2 * min_child:
        logger.warning(
            "target %r: the training folds hold only %d labelled clients, fewer than 2 × LightGBM's min_child_samples=%d, "
            "so the trees can barely split (or not at all) and the scores say little; label more clients, use fewer folds, "
            "or pass lgbm_params={'min_child_samples': ...}", target_col, fit_size, min_child,
        )


def _check_enough_labels(y: np.ndarray, classes: list, n_folds: int, test_size: float, target_col: str) -> None:
    counts = np.bincount(y, minlength=len(classes))
    need = n_folds + (1 if test_size > 0 else 0)
    if counts.min() < need:
        rarest = int(counts.argmin())
        raise EvaluationError(
            f"target {target_col!r}: class {classes[rarest]!r} has {int(counts[rarest])} labelled clients; "
            f"{n_folds} folds{' plus a test part' if test_size > 0 else ''} need at least {need} per class"
        )
    if test_size > 0 and math.ceil(test_size * len(y)) < len(classes):
        raise EvaluationError(
            f"target {target_col!r}: a test part of {test_size} × {len(y)} labelled clients cannot hold "
            f"all {len(classes)} classes; raise test_size or pass test_size=0"
        )


def _log_join(report: JoinReport, tables: list[pd.DataFrame], target_col: str) -> None:
    if report.n_dropped_in_join:
        logger.warning("%d clients are in some feature tables but not all (rows per table %s); left out",
                       report.n_dropped_in_join, report.rows_per_table)
    if report.n_unlabelled:
        logger.info("%d clients have no %r label; excluded", report.n_unlabelled, target_col)
    if report.n_labelled_missing_features:
        logger.warning("%d labelled clients have no features; left out", report.n_labelled_missing_features)
    if report.n_features_without_target:
        logger.info("%d clients with features are not in the target table", report.n_features_without_target)
    logger.info("evaluating %r on %d clients", target_col, report.n_used)


def _plain(value):
    """NumPy scalars and containers → plain Python, for JSON."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
