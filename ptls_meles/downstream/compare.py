"""Paired differences between two evaluations of the same clients: is row A above row B?

Two rows scored by :func:`~ptls_meles.downstream.evaluate.evaluate` with the same seed
on the same labelled clients share the test part and every fold's training clients, so
their scores are paired: fold ``k`` of one and fold ``k`` of the other differ only in the
features. The difference of paired scores varies far less than either score (the test
part's draw moves both alike), so its interval answers "does the embedding add anything
beside the hand-crafted table?" where two overlapping intervals cannot.

* One split: the K per-fold test differences, interval ``1.96 · std / √K`` (it holds
  the test part fixed, like every single-split interval).
* Several splits (``evaluate --seed A B C``): one difference of test means per split,
  interval over the splits.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, fields

import numpy as np

from .protocol import EvalResult, EvaluationError, JoinReport, SplitsResult, interval_half_width, to_plain

logger = logging.getLogger(__name__)


@dataclass
class PairedDifference:
    """``result − baseline`` on one target, paired by fold (one split) or by split seed."""

    target: str
    metric: str
    seeds: list[int]
    unit: str  # "fold" (one split) or "split"
    differences: list[float]  # test-score differences, one per fold or split
    cv_differences: list[float]
    result_mean: float
    baseline_mean: float

    @property
    def mean(self) -> float:
        return float(np.mean(self.differences))

    @property
    def interval(self) -> float:
        return interval_half_width(self.differences)

    @property
    def cv_mean(self) -> float:
        return float(np.mean(self.cv_differences))

    @property
    def cv_interval(self) -> float:
        return interval_half_width(self.cv_differences)

    @property
    def verdict(self) -> str:
        """Whether the 95% interval of the difference excludes zero."""
        if self.mean - self.interval > 0:
            return "above"
        if self.mean + self.interval < 0:
            return "below"
        return "level"

    def summary(self) -> str:
        each = ", ".join(f"{d:+.3f}" for d in self.differences)
        return (f"{self.target}: {self.metric} {self.result_mean:.3f} − {self.baseline_mean:.3f} = {self.mean:+.3f} ± "
                f"{self.interval:.3f} ({self.verdict}; paired over {len(self.differences)} {self.unit}s: {each}); "
                f"cv {self.cv_mean:+.3f} ± {self.cv_interval:.3f}")

    def to_dict(self) -> dict:
        return to_plain({f.name: getattr(self, f.name) for f in fields(self)}
                        | {"mean": self.mean, "interval": self.interval, "cv_mean": self.cv_mean,
                           "cv_interval": self.cv_interval, "verdict": self.verdict})


def paired_difference(result: EvalResult | SplitsResult, baseline: EvalResult | SplitsResult) -> PairedDifference:
    """``result − baseline``, refusing pairs that did not split the same clients alike."""
    runs, bases = _splits(result), _splits(baseline)
    if runs[0].target != bases[0].target:
        raise EvaluationError(f"cannot pair target {runs[0].target!r} with target {bases[0].target!r}")
    by_seed = {r.seed: r for r in bases}
    missing = [r.seed for r in runs if r.seed not in by_seed]
    if missing:
        raise EvaluationError(f"target {runs[0].target!r}: the baseline has no split with seed {missing[0]} "
                              f"(it has seeds {sorted(by_seed)}); evaluate both with the same --seed")
    pairs = [(r, by_seed[r.seed]) for r in runs]
    for r, b in pairs:
        _check_same_split(r, b)
    if not all(r.test_scores for r, _ in pairs):
        raise EvaluationError(f"target {runs[0].target!r}: no test part to compare (test_size=0)")
    if len(pairs) == 1:
        r, b = pairs[0]
        diffs = list(np.subtract(r.test_scores, b.test_scores))
        cv_diffs = list(np.subtract(r.cv_scores, b.cv_scores))
        unit = "fold"
    else:
        diffs = [r.test_mean - b.test_mean for r, b in pairs]
        cv_diffs = [r.cv_mean - b.cv_mean for r, b in pairs]
        unit = "split"
    return PairedDifference(
        target=runs[0].target, metric=runs[0].metric, seeds=[r.seed for r in runs], unit=unit,
        differences=[float(d) for d in diffs], cv_differences=[float(d) for d in cv_diffs],
        result_mean=float(np.mean([r.test_mean for r, _ in pairs])), baseline_mean=float(np.mean([b.test_mean for _, b in pairs])),
    )


def _splits(result: EvalResult | SplitsResult) -> list[EvalResult]:
    return list(result.results) if isinstance(result, SplitsResult) else [result]


def _check_same_split(r: EvalResult, b: EvalResult) -> None:
    what = f"target {r.target!r}, seed {r.seed}"
    if (r.n_folds, r.n_train, r.n_test) != (b.n_folds, b.n_train, b.n_test):
        raise EvaluationError(f"{what}: the two results split differently ({r.n_folds} folds, {r.n_train} train / {r.n_test} "
                              f"test against {b.n_folds}, {b.n_train} / {b.n_test}); pairing needs the same protocol")
    if r.join.clients_digest and b.join.clients_digest and r.join.clients_digest != b.join.clients_digest:
        raise EvaluationError(f"{what}: the two results scored different clients (digests {r.join.clients_digest} and "
                              f"{b.join.clients_digest}); join both feature tables to the same clients")


# --------------------------------------------------------------------------- reading results
def load_results(path: str | os.PathLike, part: str | None = None) -> dict[str, EvalResult | SplitsResult]:
    """The results of an ``evaluate --out`` JSON file by target; ``part`` (``"lightgbm"`` or
    ``"linear_probe"``) reads one component of a ``--model blended`` result instead of the
    blend, so one blended run gives its two rows alone to compare as well."""
    return {target: result for target, (result, _) in _read_rows(path, part).items()}


def _read_rows(path: str | os.PathLike, part: str | None) -> dict[str, tuple[EvalResult | SplitsResult, list[int]]]:
    """Each target's result and the split seeds its run had not finished when the file was last
    written (``seeds_left``, kept by ``evaluate --out`` while it runs or after it was cut)."""
    try:
        with open(path) as f:
            items = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise EvaluationError(f"{path}: cannot read evaluation results: {e}") from e
    items = items if isinstance(items, list) else [items]
    out: dict[str, tuple[EvalResult | SplitsResult, list[int]]] = {}
    for i, item in enumerate(items):
        try:
            splits = item["splits"] if "splits" in item else [item]
            results = [eval_result_from_dict(s if part is None else _component(s, part, path)) for s in splits]
        except (KeyError, TypeError) as e:
            raise EvaluationError(f"{path}: item {i} is not an `evaluate --out` result (missing {e}); "
                                  f"e.g. ptls-meles evaluate ... --out results.json writes one") from e
        result = SplitsResult(results) if "splits" in item else results[0]
        out[result.target] = (result, list(item.get("seeds_left", [])))
    return out


def load_result_files(paths: str | os.PathLike | list, part: str | None = None) -> dict[str, EvalResult | SplitsResult]:
    """:func:`load_results` of one or several files, their splits joined by target: the seeds of
    one row scored in two runs (``evaluate --seed 42 1`` then ``--seed 2 3 4``) compare as one
    five-split row. A seed found twice for a target, or one target scored by two models, is refused;
    seeds a file's run had not finished and no other file gives are named in a warning, since the
    row then reads fewer test parts than its run asked for."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    by_target: dict[str, list[tuple[EvalResult, str]]] = {}
    left: dict[str, dict[int, str]] = {}
    for path in paths:
        for target, (result, seeds_left) in _read_rows(path, part).items():
            by_target.setdefault(target, []).extend((r, str(path)) for r in _splits(result))
            left.setdefault(target, {}).update({s: str(path) for s in seeds_left})
    out: dict[str, EvalResult | SplitsResult] = {}
    for target, found in by_target.items():
        seen: dict[int, str] = {}
        for r, path in found:
            if r.seed in seen:
                raise EvaluationError(f"target {target!r}: split seed {r.seed} is in both {seen[r.seed]} and {path}; "
                                      f"give each seed once, e.g. evaluate the second run with other --seed values")
            seen[r.seed] = path
        models = sorted({r.model for r, _ in found})
        if len(models) > 1:
            raise EvaluationError(f"target {target!r}: the files score it with different models {models} "
                                  f"({', '.join(sorted(set(seen.values())))}); join only splits of one row")
        unfinished = sorted(s for s in left[target] if s not in seen)
        if unfinished:
            logger.warning("target %r: split seeds %s were not finished in %s; the row reads the %d finished (%s); "
                           "add a file that scored the rest, e.g. evaluate --seed %s", target, unfinished,
                           ", ".join(sorted({left[target][s] for s in unfinished})), len(seen),
                           " ".join(map(str, seen)), " ".join(map(str, unfinished)))
        results = [r for r, _ in found]
        out[target] = results[0] if len(results) == 1 else SplitsResult(results)
    return out


def _component(d: dict, part: str, path: str | os.PathLike) -> dict:
    """A blended result's dict with one component's scores in place of the blend's."""
    components = d.get("params", {}).get("components", {})
    if part not in components:
        raise EvaluationError(f"{path}: target {d.get('target')!r} has no component {part!r} (it has "
                              f"{sorted(components) or 'none: only evaluate --model blended keeps components'})")
    scores = components[part]
    return {**d, "model": part, "cv_scores": scores["cv_scores"], "test_scores": scores["test_scores"]}


def eval_result_from_dict(d: dict) -> EvalResult:
    """The inverse of :meth:`EvalResult.to_dict` (derived keys such as ``test_mean`` dropped)."""
    names = {f.name for f in fields(EvalResult)}
    kwargs = {k: v for k, v in d.items() if k in names}
    kwargs["join"] = JoinReport(**d["join"])
    return EvalResult(**kwargs)
