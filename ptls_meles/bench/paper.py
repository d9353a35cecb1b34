"""The MeLES paper's downstream proof as one runnable, resumable experiment.

    ptls-meles bench paper --store DIR | --dataset synthetic|physionet|age|gender [--raw PATH]
                           --out DIR [--targets COL[:task] ...] [--what table|ablations|all]
                           [--ablations split,loss,miner,encoder,size,fraction] [budget options]

1. Comparison table (rows × targets): LightGBM on hand-crafted features, on MeLES
   embeddings, on both; a supervised encoder; MeLES fine-tuned. One MeLES run feeds the
   embedding rows and the fine-tuned row. Every row uses the same labelled clients,
   seed, test part and folds (:mod:`~ptls_meles.downstream.protocol`). The neural rows train
   until their validation fold stops improving (``--finetune-patience``, at most
   ``--finetune-epochs``); ``--early-stopping-rounds`` stops LightGBM on the same folds.
2. Ablations: each row retrains MeLES at the same budget with one setting changed and
   scores LightGBM on its embeddings alone; runs with identical settings are trained once
   (the default row of every ablation is the main run). Plus quality vs the share of
   labelled clients (embeddings vs hand-crafted): ``evaluate(labelled_fraction=...)``, whose
   test part is the same for every fraction.
3. ``--out`` receives ``report.md``, PNG plots and ``results.json``. Every finished cell
   is saved to ``results.json`` at once; a rerun with the same settings skips those
   cells and reuses trained models (``OUT/work/runs/``), so long runs can be resumed.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..config import MeLESConfig, parse_settings
from ..downstream.evaluate import PAPER_LGBM_PARAMS, EvalResult, evaluate
from ..downstream.protocol import TASKS, to_plain
from ..io_utils import write_json
from ..store import SequenceStore
from . import report as report_mod

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
ABLATIONS = ("split", "loss", "miner", "encoder", "size", "fraction")
ABLATION_VALUES = {
    "split": ("split", ("slices", "samples", "disjoint")),
    "loss": ("loss", ("contrastive", "triplet", "margin", "binomial_deviance", "histogram")),
    "miner": ("miner", ("hard", "random", "distance_weighted")),
    "encoder": ("encoder", ("gru", "lstm", "transformer")),
}
DEFAULT_TARGETS = {  # per dataset recipe; a store's defaults are the first list whose columns it has
    "physionet": ["in_hospital_death", "gender", "age_group"],
    "synthetic": ["bins", "gender"],
    "age": ["bins"],
    "gender": ["gender"],
}
ROW_HAND, ROW_EMB, ROW_BOTH = "LightGBM: hand-crafted", "LightGBM: MeLES embeddings", "LightGBM: hand-crafted + MeLES"
ROW_SUPERVISED, ROW_FINETUNED = "supervised encoder", "MeLES fine-tuned"
FRACTION_FEATURES = {"hand-crafted": ROW_HAND, "MeLES embeddings": ROW_EMB}


class PaperBenchError(ValueError):
    """Bad benchmark arguments: unknown target column or task, bad fraction, missing store."""


@dataclass(frozen=True)
class Target:
    name: str
    task: str = "auto"


# --------------------------------------------------------------------------- arguments
def parse_targets(specs: list[str] | None, targets: pd.DataFrame, dataset: str | None) -> list[Target]:
    """``COL[:task]`` specs → targets; without specs, the dataset's defaults (or every
    column with 2–20 distinct labels)."""
    columns = [c for c in targets.columns if c != "client_id"]
    if not specs:
        lists = [DEFAULT_TARGETS[dataset]] if dataset in DEFAULT_TARGETS else list(DEFAULT_TARGETS.values())
        specs = next((lst for lst in lists if all(c in columns for c in lst)), None)
        if specs is None:
            specs = [c for c in columns if 2 <= targets[c].nunique() <= 20]
        if not specs:
            raise PaperBenchError(f"no target columns given and none look like labels; columns: {columns}")
    out = []
    for spec in specs:
        name, _, task = spec.partition(":")
        task = task or "auto"
        if name not in columns:
            raise PaperBenchError(f"--targets {spec!r}: no column {name!r} in targets.parquet; columns: {columns}")
        if task not in TASKS:
            raise PaperBenchError(f"--targets {spec!r}: task {task!r} is not one of {TASKS} (e.g. in_hospital_death:binary)")
        out.append(Target(name, task))
    return out


def _float_list(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise PaperBenchError(f"{what}: expected comma-separated numbers, e.g. 0.05,0.1,1, got {text!r}") from e


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ptls-meles bench paper", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    data = ap.add_argument_group("data")
    data.add_argument("--store", help="a prepared store directory with targets.parquet")
    data.add_argument("--dataset", choices=["synthetic", "physionet", "age", "gender"],
                      help="build the store with this recipe into WORK/data (with --raw; synthetic is generated)")
    data.add_argument("--raw", help="the dataset's raw files (for --dataset physionet|age|gender)")
    data.add_argument("--clients", type=int, default=3000, help="synthetic: number of clients to generate")
    data.add_argument("--mean-events", type=float, default=300, help="synthetic: median events per client")
    data.add_argument("--data-seed", type=int, default=0, help="synthetic: generator seed")
    data.add_argument("--targets", nargs="+", metavar="COL[:task]", help="label columns (task auto|binary|multiclass)")
    data.add_argument("--max-clients", type=int, help="use a seeded random subset of this many clients")
    ap.add_argument("--out", required=True, help="report directory (report.md, PNGs, results.json)")
    ap.add_argument("--work", help="models, embeddings and built data (default OUT/work)")
    ap.add_argument("--what", choices=["table", "ablations", "all"], default="all")
    ap.add_argument("--ablations", default=",".join(ABLATIONS), help=f"subset of {','.join(ABLATIONS)}")
    ap.add_argument("--sizes", default="32,64,128,256", help="hidden sizes of the size ablation")
    ap.add_argument("--fractions", default="0.05,0.1,0.25,0.5,1.0", help="labelled shares of the fraction ablation")
    budget = ap.add_argument_group("budget")
    budget.add_argument("--epochs", type=int, default=10, help="self-supervised epochs per MeLES run")
    budget.add_argument("--finetune-epochs", type=int, default=50, help="epoch cap of the supervised / fine-tuned rows")
    budget.add_argument("--finetune-patience", type=int, default=5,
                        help="the neural rows stop after this many epochs without a better validation-fold score")
    budget.add_argument("--early-stopping-rounds", type=int,
                        help="LightGBM rows: stop on each fold's validation part after this many rounds without improvement "
                             "(every feature table alike; default off)")
    budget.add_argument("--hidden-size", type=int, default=256)
    budget.add_argument("--folds", type=int, default=5)
    budget.add_argument("--test-size", type=float, default=0.1)
    budget.add_argument("--lgbm-trees", type=int, default=PAPER_LGBM_PARAMS["n_estimators"])
    budget.add_argument("--seed", type=int, default=42)
    budget.add_argument("--threads", type=int, help="torch threads and LightGBM jobs (default: torch's current setting)")
    budget.add_argument("--set", action="append", metavar="KEY=VALUE", help="MeLESConfig override for every run, e.g. batch_size=128")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return ap


# --------------------------------------------------------------------------- data
def _build_store(a, work: Path) -> tuple[Path, str | None]:
    if a.store:
        if a.dataset:
            raise PaperBenchError("give either --store or --dataset, not both")
        return Path(a.store), None
    if not a.dataset:
        raise PaperBenchError("give --store DIR (with targets.parquet) or --dataset synthetic|physionet|age|gender")
    from ..datasets.recipes import RECIPES, TARGETS_FILE

    build = {"dataset": a.dataset, "raw": str(Path(a.raw).resolve()) if a.raw else None}
    if a.dataset == "synthetic":
        build.update(clients=a.clients, mean_events=a.mean_events, seed=a.data_seed)
    elif not a.raw:
        raise PaperBenchError(f"--dataset {a.dataset} needs --raw PATH (the dataset's raw files)")
    out = work / "data"
    marker = out / "build.json"
    if marker.exists() and json.loads(marker.read_text()) == build and (out / TARGETS_FILE).exists():
        print(f"[data] reusing {out}")
        return out, a.dataset
    if a.dataset == "synthetic":
        _, rep = RECIPES["synthetic"](out, n_clients=a.clients, seed=a.data_seed, mean_events=a.mean_events, show_progress=not a.quiet)
    else:
        _, rep = RECIPES[a.dataset](a.raw, out, show_progress=not a.quiet)
    marker.write_text(json.dumps(build))
    print(f"[data] {rep.summary()}")
    return out, a.dataset


def load_data(store_dir: Path, max_clients: int | None, seed: int) -> tuple[SequenceStore, pd.DataFrame]:
    """The store (optionally a seeded subset of clients) and its targets, restricted to those clients."""
    from ..datasets.recipes import load_targets

    store = SequenceStore.load(store_dir)
    if max_clients is not None and max_clients < store.n_clients:
        if max_clients < 2:
            raise PaperBenchError(f"--max-clients must be >= 2, got {max_clients}")
        keep = np.sort(np.random.default_rng([seed, 101]).choice(store.n_clients, max_clients, replace=False))
        store = store.take(keep)
    targets = load_targets(store_dir)
    targets = targets[targets["client_id"].isin(store.client_ids)].reset_index(drop=True)
    return store, targets


# --------------------------------------------------------------------------- MeLES runs
def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


class Runs:
    """MeLES runs keyed by (config, data): each distinct run is trained once, saved under
    ``work/runs/<id>/`` (model, embeddings, CSV logs) and reloaded on later calls or reruns."""

    def __init__(self, store: SequenceStore, data_key: dict, work: Path, results: dict, save: Callable[[], None],
                 show_progress: bool) -> None:
        self.store, self.data_key, self.work, self.results, self.save = store, data_key, work, results, save
        self.show_progress = show_progress
        self._models: dict = {}
        self._embeddings: dict[str, pd.DataFrame] = {}

    def run_id(self, config: MeLESConfig) -> str:
        return "meles-" + _digest({"config": config.to_dict(), "data": self.data_key})

    def _dir(self, config: MeLESConfig) -> Path:
        return self.work / "runs" / self.run_id(config)

    def _done(self, config: MeLESConfig) -> bool:
        """A finished run on disk (its ``run.json`` is written last); its record is restored into
        the results, so changing only evaluation settings (trees, folds) never retrains."""
        d = self._dir(config)
        if not all((d / f).exists() for f in ("run.json", "model/model.pt", "embeddings.parquet")):
            return False
        self.results["runs"].setdefault(self.run_id(config), json.loads((d / "run.json").read_text()))
        return True

    def model(self, config: MeLESConfig):
        """The trained :class:`~ptls_meles.api.MeLES` of this config (trains it if needed)."""
        from ..api import MeLES

        rid = self.run_id(config)
        if rid in self._models:
            return self._models[rid]
        d = self._dir(config)
        if self._done(config):
            model = MeLES.load(d / "model")
        else:
            shutil.rmtree(d, ignore_errors=True)  # a partial run of ours: start it clean
            changes = {k: v for k, v in config.to_dict().items() if v != getattr(MeLESConfig(), k)}
            print(f"[meles] training {rid} ({changes})", flush=True)
            t0 = time.perf_counter()
            model = MeLES(**config.to_dict()).fit(self.store, out_dir=d, show_progress=self.show_progress)
            seconds = time.perf_counter() - t0
            model.save(d / "model")
            emb = model.transform(self.store)
            emb.to_parquet(d / "embeddings.parquet", index=False)
            self._embeddings[rid] = emb
            recall = _val_recall(d / "logs" / "metrics.csv")
            self.results["runs"][rid] = {"changes": changes, "train_seconds": seconds, **recall}
            (d / "run.json").write_text(json.dumps(self.results["runs"][rid]))
            self.save()
            print(f"[meles] {rid}: {recall['epochs']} epochs in {seconds:.0f} s, val recall@(k-1) "
                  f"final {_fmt(recall['val_recall'])} best {_fmt(recall['best_val_recall'])}", flush=True)
        self._models[rid] = model
        return model

    def embeddings(self, config: MeLESConfig) -> pd.DataFrame:
        rid = self.run_id(config)
        if rid not in self._embeddings:
            if not self._done(config):
                self.model(config)
            if rid not in self._embeddings:
                self._embeddings[rid] = pd.read_parquet(self._dir(config) / "embeddings.parquet")
        return self._embeddings[rid]


def _val_recall(metrics_csv: Path) -> dict:
    """Final and best validation recall@(k−1) and the epochs run, from a run's CSV log."""
    if not metrics_csv.exists():
        return {"val_recall": None, "best_val_recall": None, "epochs": None}
    m = pd.read_csv(metrics_csv)
    recall = m["val_recall"].dropna() if "val_recall" in m else pd.Series(dtype=float)
    epochs = int(m["epoch"].max()) + 1 if "epoch" in m and m["epoch"].notna().any() else None
    if recall.empty:
        return {"val_recall": None, "best_val_recall": None, "epochs": epochs}
    return {"val_recall": float(recall.iloc[-1]), "best_val_recall": float(recall.max()), "epochs": epochs}


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


# --------------------------------------------------------------------------- the benchmark
def _cell(result: EvalResult, seconds: float) -> dict:
    d = result.to_dict()
    keep = ("target", "task", "metric", "n_folds", "cv_scores", "test_scores", "n_train", "n_test", "n_features",
            "cv_mean", "cv_interval", "test_mean", "test_interval", "classes", "model", "best_epochs")
    return {**{k: d[k] for k in keep}, "seconds": seconds}


class PaperBench:
    """Runs the sections asked for, caching every finished cell in ``results.json``."""

    def __init__(self, a, argv: list[str]) -> None:
        self.a = a
        self.out = Path(a.out)
        self.work = Path(a.work) if a.work else self.out / "work"
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.threads = self._set_threads(a.threads)
        store_dir, dataset = _build_store(a, self.work)
        self.store, self.targets = load_data(store_dir, a.max_clients, a.seed)
        self.target_list = parse_targets(a.targets, self.targets, dataset)
        self.config = MeLESConfig.from_dict({"max_epochs": a.epochs, "hidden_size": a.hidden_size, "seed": a.seed,
                                             **parse_settings(a.set)})
        data_key = {"store": str(store_dir.resolve()), "n_clients": self.store.n_clients, "n_events": self.store.n_events,
                    "max_clients": a.max_clients, "first_ids": [str(x) for x in self.store.client_ids[:5]]}
        self.settings = {
            "data": data_key, "targets": [vars(t) for t in self.target_list], "seed": a.seed, "folds": a.folds,
            "test_size": a.test_size, "lgbm_trees": a.lgbm_trees, "epochs": a.epochs, "finetune_epochs": a.finetune_epochs,
            "finetune_patience": a.finetune_patience, "early_stopping_rounds": a.early_stopping_rounds,
            "config": {k: v for k, v in self.config.to_dict().items() if v != getattr(MeLESConfig(), k)},
        }
        self.results = self._load_results()
        self.results["meta"] = self._meta(argv)
        self.results.setdefault("invocations", []).append({"date": self.results["meta"]["date"], "command": self.results["meta"]["command"]})
        self.results["timings"] = {}
        self.results["errors"] = {}
        self.runs = Runs(self.store, data_key, self.work, self.results, self.save, not a.quiet)
        self._hand: pd.DataFrame | None = None

    # ---------------------------------------------------------------- plumbing
    @staticmethod
    def _set_threads(n: int | None) -> int:
        import torch

        if n:
            torch.set_num_threads(n)
        return torch.get_num_threads()

    def _load_results(self) -> dict:
        fresh = {"settings": self.settings, "table": {}, "ablations": {}, "fraction": {}, "runs": {}}
        path = self.out / RESULTS_FILE
        if not path.exists():
            return fresh
        old = json.loads(path.read_text())
        if json.loads(json.dumps(self.settings)) != old.get("settings"):
            print(f"[cache] settings differ from {path}: starting afresh (old results are overwritten)")
            return fresh
        for key in ("table", "ablations", "fraction", "runs"):
            old.setdefault(key, {})
        return old

    def save(self) -> None:
        write_json(self.out / RESULTS_FILE, to_plain(self.results), default=str)

    def _meta(self, argv: list[str]) -> dict:
        import lightgbm
        import sklearn
        import torch

        return {
            "command": "ptls-meles bench paper " + shlex.join(argv),
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "machine": {
                "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(), "torch_threads": self.threads, "lgbm_jobs": self.threads,
                "versions": {"python": platform.python_version(), "torch": torch.__version__,
                             "lightgbm": lightgbm.__version__, "sklearn": sklearn.__version__},
            },
        }

    @property
    def lgbm_params(self) -> dict:
        return {"n_estimators": self.a.lgbm_trees}

    def hand(self) -> pd.DataFrame:
        if self._hand is None:
            from ..downstream.features import handcrafted_features

            self._hand = handcrafted_features(self.store)
        return self._hand

    def _lgbm(self, tables: list[pd.DataFrame], t: Target, labelled_fraction: float = 1.0) -> EvalResult:
        return evaluate(tables, self.targets, t.name, task=t.task, n_folds=self.a.folds, test_size=self.a.test_size,
                        seed=self.a.seed, lgbm_params=self.lgbm_params, n_jobs=self.threads,
                        labelled_fraction=labelled_fraction, early_stopping_rounds=self.a.early_stopping_rounds)

    def _cell_once(self, section: str, slot: dict, t: Target, label: str, compute: Callable[[], EvalResult]) -> dict | None:
        """Compute one (row, target) cell unless cached; save at once; print one line."""
        if t.name in slot:
            print(f"[{section}] {label:<44} {t.name:<18} {report_mod.score_text(slot[t.name])} (cached)", flush=True)
            return slot[t.name]
        t0 = time.perf_counter()
        try:
            result = compute()
        except Exception as exc:  # a failed row must not lose the others of a long run
            key = f"{section} / {label} / {t.name}"
            self.results["errors"][key] = f"{type(exc).__name__}: {exc}"
            print(f"[{section}] {label:<44} {t.name:<18} FAILED: {type(exc).__name__}: {exc}", flush=True)
            log.exception("row %s failed", key)
            self.save()
            return None
        slot[t.name] = _cell(result, time.perf_counter() - t0)
        self.save()
        c = slot[t.name]
        print(f"[{section}] {label:<44} {t.name:<18} {c['metric']} test {report_mod.score_text(c)} "
              f"cv {report_mod.score_text(c, 'cv')} ({c['seconds']:.0f} s)", flush=True)
        return c

    # ---------------------------------------------------------------- sections
    def comparison_table(self) -> None:
        from ..downstream.finetune import supervised_eval

        table = self.results["table"]
        a = self.a

        def neural(pretrained_fn):
            def run(t: Target) -> EvalResult:
                return supervised_eval(self.store, self.targets, t.name, self.config, pretrained=pretrained_fn(), task=t.task,
                                       n_folds=a.folds, test_size=a.test_size, seed=a.seed, max_epochs=a.finetune_epochs,
                                       patience=a.finetune_patience, show_progress=not a.quiet)
            return run

        rows = {
            ROW_HAND: lambda t: self._lgbm([self.hand()], t),
            ROW_EMB: lambda t: self._lgbm([self.runs.embeddings(self.config)], t),
            ROW_BOTH: lambda t: self._lgbm([self.hand(), self.runs.embeddings(self.config)], t),
            ROW_SUPERVISED: neural(lambda: None),
            ROW_FINETUNED: neural(lambda: self.runs.model(self.config).module_),
        }
        for row, fn in rows.items():
            slot = table.setdefault(row, {})
            for t in self.target_list:
                self._cell_once("table", slot, t, row, lambda t=t, fn=fn: fn(t))

    def ablation(self, group: str, values: list) -> None:
        rows = self.results["ablations"].setdefault(group, {})
        field = "hidden_size" if group == "size" else ABLATION_VALUES[group][0]
        for value in values:
            config = MeLESConfig.from_dict({**self.config.to_dict(), field: value})
            row = rows.setdefault(str(value), {"targets": {}})
            row["run"] = self.runs.run_id(config)
            main_cells = self.results["table"].get(ROW_EMB, {}) if row["run"] == self.runs.run_id(self.config) else {}
            for t in self.target_list:
                if t.name in main_cells and t.name not in row["targets"]:
                    row["targets"][t.name] = main_cells[t.name]  # the main run: same embeddings, same protocol
                self._cell_once(f"ablation {group}", row["targets"], t, f"{field}={value}",
                                lambda t=t, config=config: self._lgbm([self.runs.embeddings(config)], t))

    def fraction(self, fractions: list[float]) -> None:
        by_fraction = self.results["fraction"]
        tables = {"hand-crafted": lambda: [self.hand()], "MeLES embeddings": lambda: [self.runs.embeddings(self.config)]}
        for fraction in fractions:
            slot_f = by_fraction.setdefault(str(fraction), {})
            for features, tables_fn in tables.items():
                slot = slot_f.setdefault(features, {})
                same_as_table = self.results["table"].get(FRACTION_FEATURES[features], {})
                for t in self.target_list:
                    if fraction == 1 and t.name in same_as_table and t.name not in slot:
                        slot[t.name] = same_as_table[t.name]  # identical protocol: evaluate() is fraction 1
                    self._cell_once("fraction", slot, t, f"{fraction:.0%} labelled, {features}",
                                    lambda t=t, fn=tables_fn, fraction=fraction: self._lgbm(fn(), t, fraction))

    def projection(self) -> None:
        t = self.target_list[0]
        labels = self.targets.set_index("client_id")[t.name]
        report_mod.plot_projection(self.runs.embeddings(self.config), labels, self.out / report_mod.PROJECTION_PLOT,
                                   title=f"MeLES embeddings (PCA), coloured by {t.name}", seed=self.a.seed)

    def run(self) -> dict:
        a = self.a
        ablations = [x.strip() for x in a.ablations.split(",") if x.strip()]
        unknown = sorted(set(ablations) - set(ABLATIONS))
        if unknown:
            raise PaperBenchError(f"--ablations: unknown {unknown}; choose from {','.join(ABLATIONS)}")
        sizes = [int(s) for s in _float_list(a.sizes, "--sizes")]
        fractions = _float_list(a.fractions, "--fractions")
        for f in fractions:
            if not 0 < f <= 1:
                raise PaperBenchError(f"--fractions: {f} is not in (0, 1]")
        t_start = time.perf_counter()
        sections: list[tuple[str, Callable[[], None]]] = []
        if a.what in ("table", "all"):
            sections += [("table", self.comparison_table), ("projection", self.projection)]
        if a.what in ("ablations", "all"):
            for group in ablations:
                if group == "fraction":
                    sections.append(("fraction", lambda: self.fraction(fractions)))
                elif group == "size":
                    sections.append(("size", lambda: self.ablation("size", sizes)))
                else:
                    sections.append((group, lambda g=group: self.ablation(g, list(ABLATION_VALUES[g][1]))))
        for name, fn in sections:
            t0 = time.perf_counter()
            fn()
            self.results["timings"][name] = time.perf_counter() - t0
            self.save()
        self.results["timings"]["total"] = time.perf_counter() - t_start
        self.results["invocations"][-1]["seconds"] = self.results["timings"]["total"]
        self.save()
        path = report_mod.write_report(self.results, self.out)
        print(f"paper benchmark finished in {self.results['timings']['total']:.0f} s; report: {path}", flush=True)
        return self.results


def main(argv: list[str] | None = None) -> dict:
    """Entry point of ``ptls-meles bench paper``; returns the results dict (also in ``OUT/results.json``)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    return PaperBench(a, argv).run()


if __name__ == "__main__":
    main()
