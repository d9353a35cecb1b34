"""The paper benchmark end to end on a tiny synthetic store, its cache, and the labelled-fraction protocol."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from ptls_meles.bench import paper
from ptls_meles.bench.report import FRACTION_PLOT, PROJECTION_PLOT, SIZE_PLOT, markdown_table
from ptls_meles.downstream.evaluate import evaluate
from ptls_meles.downstream.protocol import JoinReport, labelled_subsample, plan_cv

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TARGETS = ["bins", "gender"]
TABLE_ROWS = [paper.ROW_HAND, paper.ROW_EMB, paper.ROW_BOTH, paper.ROW_SUPERVISED, paper.ROW_FINETUNED]


def _argv(out) -> list[str]:
    return ["--dataset", "synthetic", "--clients", "150", "--mean-events", "60", "--out", str(out),
            "--hidden-size", "16", "--epochs", "1", "--finetune-epochs", "1", "--folds", "2", "--lgbm-trees", "20",
            "--ablations", "split,size,fraction", "--sizes", "16,32", "--fractions", "0.5,1", "--threads", "1",
            "--set", "num_workers=0", "--set", "batch_size=32", "-q"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper")
    results = paper.main(_argv(out))
    return out, results


def _tables(markdown: str) -> dict[str, list[list[str]]]:
    """Markdown tables keyed by their header line's first cell (``model``, ``split``, ``size``, ``labelled``)."""
    tables, current = {}, None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if current is None:
            current = tables.setdefault(cells[0], [])
            current.append(cells)
        elif not set(line) <= set("|-"):
            current.append(cells)
    return tables


def _scores(cell_text: str) -> tuple[float, float]:
    m = re.fullmatch(r"(\d\.\d{3}) ± (\d\.\d{3})", cell_text)
    assert m, cell_text
    return float(m.group(1)), float(m.group(2))


def _all_cells(results: dict):
    for row in results["table"].values():
        yield from row.values()
    for group in results["ablations"].values():
        for row in group.values():
            yield from row["targets"].values()
    for by_features in results["fraction"].values():
        for cells in by_features.values():
            yield from cells.values()


def test_report_tables_have_expected_rows_and_columns(bench):
    out, _ = bench
    tables = _tables((out / "report.md").read_text())
    comparison = tables["model"]
    # the first "model" table is the comparison: header + one row per model, one column per target
    assert comparison[0] == ["model"] + TARGETS
    assert [r[0] for r in comparison[1:6]] == TABLE_ROWS
    for row in comparison[1:6]:
        for text in row[1:]:
            mean, half = _scores(text)
            assert 0 <= mean <= 1 and half >= 0
    assert [r[0] for r in tables["split"][1:]] == ["slices", "samples", "disjoint"]
    assert tables["split"][0][:3] == ["split"] + TARGETS
    assert [r[0] for r in tables["size"][1:]] == ["16", "32"]
    labelled = tables["labelled"]
    assert [(r[0], r[1]) for r in labelled[1:]] == [("50%", "hand-crafted"), ("50%", "MeLES embeddings"),
                                                    ("100%", "hand-crafted"), ("100%", "MeLES embeddings")]
    text = (out / "report.md").read_text()
    assert "ptls-meles bench paper --dataset synthetic" in text and "torch threads 1" in text
    assert "at most 1 epochs, until 5 epochs pass without a better validation-fold score" in text
    assert f"{paper.ROW_SUPERVISED}: bins [1, 1], gender [1, 1]" in text


def test_results_numbers_finite_in_unit_interval_and_consistent(bench):
    out, results = bench
    saved = json.loads((out / "results.json").read_text())
    assert saved["table"] == results["table"]
    cells = list(_all_cells(saved))
    assert len(cells) == 2 * (5 + 3 + 2 + 4)  # targets × (table rows + split + size + fraction rows)
    for c in cells:
        for v in c["test_scores"] + c["cv_scores"] + [c["test_mean"], c["cv_mean"]]:
            assert math.isfinite(v) and 0 <= v <= 1
        assert len(c["cv_scores"]) == len(c["test_scores"]) == 2
        assert c["test_mean"] == pytest.approx(np.mean(c["test_scores"]))
    # each cell names its model; the neural rows report the epoch each fold kept (cap 1 here)
    for t in TARGETS:
        assert results["table"][paper.ROW_HAND][t]["model"] == "lightgbm"
        assert results["table"][paper.ROW_HAND][t]["best_epochs"] == []  # LightGBM early stopping is off
        assert results["table"][paper.ROW_SUPERVISED][t]["model"] == "supervised_encoder"
        assert results["table"][paper.ROW_FINETUNED][t]["model"] == "meles_finetuned"
        assert results["table"][paper.ROW_FINETUNED][t]["best_epochs"] == [1, 1]
    assert results["settings"]["finetune_patience"] == 5 and results["settings"]["early_stopping_rounds"] is None
    # the same protocol everywhere: every table row tests on the same number of clients
    for t in TARGETS:
        assert len({results["table"][row][t]["n_test"] for row in TABLE_ROWS}) == 1
        assert results["fraction"]["0.5"]["hand-crafted"][t]["n_test"] == results["table"][paper.ROW_HAND][t]["n_test"]
        assert results["fraction"]["0.5"]["hand-crafted"][t]["n_train"] < results["table"][paper.ROW_HAND][t]["n_train"]
    # default rows of the ablations reuse the main run; other settings are runs of their own
    ab = results["ablations"]
    assert ab["split"]["slices"]["run"] == ab["size"]["16"]["run"]
    assert ab["split"]["slices"]["targets"] == {t: results["table"][paper.ROW_EMB][t] for t in TARGETS}
    assert len({ab["split"][v]["run"] for v in ("slices", "samples", "disjoint")} | {ab["size"]["32"]["run"]}) == 4
    assert len(results["runs"]) == 4
    for run in results["runs"].values():
        assert 0 <= run["val_recall"] <= 1 and run["best_val_recall"] >= run["val_recall"]
        assert run["train_seconds"] > 0 and run["epochs"] == 1
    assert results["errors"] == {}


def test_plots_are_valid_pngs(bench):
    import matplotlib.image as mpimg

    out, _ = bench
    for name in (SIZE_PLOT, FRACTION_PLOT, PROJECTION_PLOT):
        path = out / name
        assert path.read_bytes()[:8] == PNG_MAGIC
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert img.std() > 0.01  # something is drawn


def test_rerun_skips_cached_rows(bench, monkeypatch, capsys):
    out, first = bench

    def boom(*args, **kwargs):
        raise AssertionError("a cached row was recomputed")

    monkeypatch.setattr(paper, "evaluate", boom)
    monkeypatch.setattr("ptls_meles.downstream.finetune.supervised_eval", boom)
    monkeypatch.setattr("ptls_meles.api.MeLES.fit", boom)
    capsys.readouterr()
    again = paper.main(_argv(out))
    printed = capsys.readouterr().out
    assert again["errors"] == {}
    assert printed.count("(cached)") == 2 * (5 + 3 + 2 + 4)
    assert again["table"] == first["table"] and again["ablations"] == first["ablations"]
    assert len(json.loads((out / "results.json").read_text())["invocations"]) == 2
    # other evaluation settings: the cached cells are dropped, but the trained models are reused
    monkeypatch.setattr(paper, "evaluate", evaluate)
    argv = _argv(out)
    argv[argv.index("--lgbm-trees") + 1] = "10"
    argv[argv.index("--ablations") + 1] = "size"
    fresh = paper.main(argv + ["--what", "ablations"])
    assert "(cached)" not in capsys.readouterr().out
    assert fresh["table"] == {} and fresh["settings"]["lgbm_trees"] == 10
    assert set(fresh["runs"]) == {fresh["ablations"]["size"][v]["run"] for v in ("16", "32")}
    assert fresh["ablations"]["size"]["32"]["targets"]["bins"]["n_features"] == 32 * 3  # last, mean and max pooled


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


def test_parse_targets_defaults_tasks_and_errors():
    t = pd.DataFrame({"client_id": [1, 2, 3], "bins": [0, 1, 2], "gender": [0, 1, 0], "age": [20.5, 30.1, 40.2]})
    assert [x.name for x in paper.parse_targets(None, t, None)] == ["bins", "gender"]
    assert paper.parse_targets(["gender:binary"], t, None) == [paper.Target("gender", "binary")]
    with pytest.raises(paper.PaperBenchError, match="no column 'death'"):
        paper.parse_targets(["death"], t, None)
    with pytest.raises(paper.PaperBenchError, match="task 'regression'"):
        paper.parse_targets(["age:regression"], t, None)


def test_markdown_table_escapes_pipes():
    assert markdown_table(["a", "b"], [[1, "x|y"]]).splitlines() == ["| a | b |", "|---|---|", "| 1 | x\\|y |"]
