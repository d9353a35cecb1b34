"""The one downstream protocol every row of a comparison table is scored with.

LightGBM on feature tables (:func:`~ptls_meles.downstream.evaluate.evaluate`) and the
neural baselines (:func:`~ptls_meles.downstream.finetune.supervised_eval`) both call it:

* the labelled clients: features (or store positions) inner-joined to the labels, in id
  order, every client left out counted in a :class:`JoinReport`;
* labels mapped to ``0..C-1`` in sorted order, the task resolved (binary: 2 classes);
* a stratified random test part (``test_size``) and stratified K folds on the rest, with
  the same seed, so every row sees the same clients;
* scores: AUROC for binary targets, accuracy for multiclass ones; per part the mean of
  the K fold scores and the 95% interval half-width ``1.96 · std(scores, ddof=0) / √K``;
* one :class:`EvalResult` per (row, target).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

Z_95 = 1.96
INTERVAL_DDOF = 0
TASKS = ("auto", "binary", "multiclass")
Task = Literal["auto", "binary", "multiclass"]


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
    clients_digest: str = ""  # hash of the used clients' ids: two results with equal digests split alike


@dataclass
class EvalResult:
    """Scores of one downstream evaluation plus everything needed to trace it.

    ``model`` names what was scored (``"lightgbm"``, ``"supervised_encoder"``,
    ``"meles_finetuned"``) and ``params`` its settings. ``best_epochs``: per fold, the
    1-based epoch (neural baselines) or boosting round (LightGBM with early stopping)
    whose model was scored; empty when every fold ran to its cap without early stopping.
    """

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
    model: str = "lightgbm"
    params: dict = field(default_factory=dict)
    best_epochs: list[int] = field(default_factory=list)
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
        if self.best_epochs:
            unit = "round" if self.model == "lightgbm" else "epoch"
            parts += f", best {unit} per fold {self.best_epochs}"
        if self.test_scores:
            return f"{self.target}: {self.metric} test {self.test_mean:.3f} ± {self.test_interval:.3f} ({cv}), {parts}"
        return f"{self.target}: {self.metric} {cv}, {parts}"

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (scores, means, intervals, join counts, params)."""
        d = asdict(self)
        d.update(cv_mean=self.cv_mean, cv_interval=self.cv_interval, test_mean=self.test_mean,
                 test_interval=self.test_interval)
        return to_plain(d)


def interval_half_width(scores, ddof: int = INTERVAL_DDOF) -> float:
    """95% interval half-width of a mean of fold scores: 1.96 · std / √K."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) <= ddof:
        return float("nan")
    return float(Z_95 * scores.std(ddof=ddof) / math.sqrt(len(scores)))


@dataclass
class SplitsResult:
    """One (row, target) scored on several test parts: the protocol once per split seed.

    A 10% test part of a few thousand clients moves AUROC by more than the folds' interval
    shows (that interval holds the test part fixed). The mean over split seeds of each
    split's test mean (and CV mean) reads the table, not one draw of clients; its interval
    is :func:`interval_half_width` over the splits' means (with few splits, a rough one).
    """

    results: list[EvalResult]

    def __post_init__(self):
        if not self.results:
            raise EvaluationError("SplitsResult needs at least one EvalResult")
        targets = {(r.target, r.model) for r in self.results}
        seeds = [r.seed for r in self.results]
        if len(targets) > 1 or len(set(seeds)) < len(seeds):
            raise EvaluationError(f"SplitsResult takes one target and model on distinct seeds, got {sorted(targets)} "
                                  f"on seeds {seeds}")

    @property
    def target(self) -> str:
        return self.results[0].target

    @property
    def metric(self) -> str:
        return self.results[0].metric

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.results]

    @property
    def test_means(self) -> list[float]:
        return [r.test_mean for r in self.results if r.test_mean is not None]

    @property
    def cv_mean(self) -> float:
        return float(np.mean([r.cv_mean for r in self.results]))

    @property
    def cv_interval(self) -> float:
        return interval_half_width([r.cv_mean for r in self.results])

    @property
    def test_mean(self) -> float | None:
        return float(np.mean(self.test_means)) if self.test_means else None

    @property
    def test_interval(self) -> float | None:
        return interval_half_width(self.test_means) if self.test_means else None

    def summary(self) -> str:
        cv = f"cv {self.cv_mean:.3f} ± {self.cv_interval:.3f}"
        each = ", ".join(f"{r.seed}: {r.test_mean if r.test_mean is not None else r.cv_mean:.3f}" for r in self.results)
        head = f"{self.target}: {self.metric} over {len(self.results)} splits"
        if self.test_means:
            return f"{head} test {self.test_mean:.3f} ± {self.test_interval:.3f} ({cv}); test per split seed {{{each}}}"
        return f"{head} {cv}; cv per split seed {{{each}}}"

    def to_dict(self) -> dict:
        """JSON-ready: the means over splits and every split's own :meth:`EvalResult.to_dict`."""
        return to_plain({"target": self.target, "metric": self.metric, "seeds": self.seeds, "test_mean": self.test_mean,
                         "test_interval": self.test_interval, "cv_mean": self.cv_mean, "cv_interval": self.cv_interval,
                         "splits": [r.to_dict() for r in self.results]})


def check_protocol(n_folds: int, test_size: float, task: str, error: type[ValueError] = EvaluationError) -> None:
    """The argument checks every evaluation row shares (LightGBM and the neural baselines)."""
    if n_folds < 2:
        raise error(f"n_folds must be >= 2, got {n_folds}")
    if not 0 <= test_size < 1:
        raise error(f"test_size must be in [0, 1), got {test_size}")
    if task not in TASKS:
        raise error(f"task must be 'auto', 'binary' or 'multiclass', got {task!r}")


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


# --------------------------------------------------------------------------- the plan
@dataclass
class CVPlan:
    """One target's labels, task and parts; every array indexes the joined labelled clients.

    ``folds[k] = (fit_rows, val_rows)``: fold ``k`` trains on ``fit_rows``, is scored on
    ``val_rows`` and on the fixed ``test_idx``.
    """

    target: str
    task: str
    classes: list
    y: np.ndarray
    train_idx: np.ndarray
    test_idx: np.ndarray
    folds: list[tuple[np.ndarray, np.ndarray]]
    join: JoinReport
    seed: int

    @property
    def metric(self) -> str:
        return "auroc" if self.task == "binary" else "accuracy"

    def score(self, rows: np.ndarray, proba: np.ndarray) -> float:
        """The target's metric on ``rows`` from class probabilities ``[len(rows), C]``."""
        from sklearn.metrics import accuracy_score, roc_auc_score

        if self.task == "binary":
            return float(roc_auc_score(self.y[rows], proba[:, 1]))
        return float(accuracy_score(self.y[rows], np.asarray(proba).argmax(axis=1)))

    def result(self, cv_scores: list[float], test_scores: list[float], n_features: int, model: str, params: dict,
               best_epochs: list[int] | None = None) -> EvalResult:
        result = EvalResult(
            target=self.target, task=self.task, metric=self.metric, n_folds=len(self.folds), cv_scores=list(cv_scores),
            test_scores=list(test_scores), n_train=len(self.train_idx), n_test=len(self.test_idx), n_features=n_features,
            classes=list(self.classes), join=self.join, model=model, params=params, best_epochs=list(best_epochs or []),
            seed=self.seed,
        )
        logger.info("%s: %s", model, result.summary())
        return result


def plan_cv(
    y_raw: np.ndarray,
    join: JoinReport,
    target_col: str,
    task: str = "auto",
    n_folds: int = 5,
    test_size: float = 0.1,
    seed: int = 42,
    labelled_fraction: float = 1.0,
) -> CVPlan:
    """Encode the labels, resolve the task, check there are enough labels per class, and
    draw the stratified test part and K folds (``labelled_fraction < 1``: only that share of
    the training part is labelled, see :func:`labelled_subsample`; the test part is unchanged).
    ``y_raw`` is in the order of the joined clients (:func:`join_features_and_targets`)."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    check_protocol(n_folds, test_size, task)
    classes, y = np.unique(y_raw, return_inverse=True)
    classes = [to_plain(c) for c in classes]
    if len(classes) < 2:
        raise EvaluationError(
            f"target {target_col!r} has a single class {classes[0]!r} among its labelled clients; nothing to predict"
        )
    y = y.astype(np.int64)
    if task == "auto":
        task = "binary" if len(classes) == 2 else "multiclass"
    elif task == "binary" and len(classes) != 2:
        raise EvaluationError(f"task 'binary' but target {target_col!r} has {len(classes)} classes")
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
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = [(train_idx[f], train_idx[v]) for f, v in splitter.split(train_idx, y[train_idx])]
    return CVPlan(target_col, task, classes, y, train_idx, test_idx, folds, join, seed)


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


# --------------------------------------------------------------------------- the join
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
    merged = _sorted_by_id(_merge(joined, labels, id_col, "target table"), id_col)
    report = JoinReport(
        rows_per_table=[len(t) for t in tables],
        n_joined_features=len(joined),
        n_dropped_in_join=int(n_dropped_in_join),
        n_targets=len(targets),
        n_unlabelled=int(unlabelled.sum()),
        n_labelled_missing_features=len(labels) - len(merged),
        n_features_without_target=len(joined) - len(merged) - int(joined[id_col].isin(targets.loc[unlabelled, id_col]).sum()),
        n_used=len(merged),
        clients_digest=clients_digest(merged[id_col]),
    )
    _log_join(report, target_col)
    if report.n_used == 0:
        raise EvaluationError(
            f"no labelled client of target {target_col!r} has features: check that {id_col!r} values match "
            f"(features e.g. {to_plain(joined[id_col].iloc[0]) if len(joined) else None!r}, "
            f"targets e.g. {to_plain(labels[id_col].iloc[0]) if len(labels) else None!r})"
        )
    X = merged.drop(columns=[id_col, target_col])
    return X, merged[target_col].to_numpy(), report


def _sorted_by_id(merged: pd.DataFrame, id_col: str) -> pd.DataFrame:
    """The joined clients in id order, so the test part and folds depend on which clients a
    table holds, not on the order of its rows (a shuffled copy of a table scores alike)."""
    try:
        return merged.sort_values(id_col, kind="stable", ignore_index=True)
    except TypeError as e:  # e.g. ints and strings in one object column
        raise EvaluationError(f"cannot order the ids of column {id_col!r}: {e} (dtype {merged[id_col].dtype}, "
                              f"e.g. {to_plain(merged[id_col].iloc[0])!r}); give every id one type") from e


def clients_digest(ids: pd.Series) -> str:
    """A short hash of a sequence of client ids (order included): equal digests, same clients."""
    import hashlib

    hashed = pd.util.hash_pandas_object(pd.Series(ids).reset_index(drop=True), index=False).to_numpy()
    return hashlib.sha1(hashed.tobytes()).hexdigest()[:16]


def _check_unique_ids(table: pd.DataFrame, id_col: str, what: str) -> None:
    null = table[id_col].isna()
    if null.any():
        raise EvaluationError(f"{what}: column {id_col!r} has {int(null.sum())} null ids, e.g. at row {int(null.to_numpy().argmax())}")
    dup = table[id_col].duplicated()
    if dup.any():
        raise EvaluationError(
            f"{what}: column {id_col!r} has {int(dup.sum())} duplicated ids, e.g. {to_plain(table.loc[dup, id_col].iloc[0])!r}"
        )


def _merge(left: pd.DataFrame, right: pd.DataFrame, id_col: str, what: str) -> pd.DataFrame:
    try:
        return left.merge(right, on=id_col, how="inner")
    except ValueError as e:  # e.g. int ids in one table, string ids in the other
        raise EvaluationError(
            f"cannot join {what} on {id_col!r}: {e} (id dtypes {left[id_col].dtype} and {right[id_col].dtype})"
        ) from e


def _log_join(report: JoinReport, target_col: str) -> None:
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


def to_plain(value):
    """NumPy scalars, arrays and containers → plain Python, for JSON (the package's one converter)."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
