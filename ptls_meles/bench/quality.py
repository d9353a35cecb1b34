"""The downstream bench: MeLES configurations trained for one budget and scored against
hand-crafted features, the supervised encoder and fine-tuning, on the same folds.

    ptls-meles bench quality -- --dataset physionet --raw ../shared/datasets/physionet2012 \
        --out runs/quality_physionet --budget-min 30 --configs paper,default [--define NAME:K=V;K=V] \
        [--vary encoder=gru/lstm/transformer] [--neural] [--fractions 0.05,0.1,0.5]

Each configuration trains for ``--budget-min`` minutes of wall-clock time (or
``--epochs``, whichever comes first), then its embeddings are scored by LightGBM alone
and beside the hand-crafted features, with :func:`evaluate`'s protocol, on every target.
``--vary KEY=A/B/C`` adds one configuration per value (the paper's ablations).
``--neural`` adds the neural baselines: a supervised encoder (the defaults with ``--set``,
trained once per data) and each configuration's model fine-tuned; both train each fold
until its validation score has not improved for ``--finetune-patience`` epochs, at most
``--finetune-epochs`` (``--finetune-freeze N``: fine-tuning trains only the new head for
its first N epochs). ``--fractions`` scores hand-crafted features and each
configuration's embeddings with only that share of the training clients labelled.
``--hand-shares`` adds two yardsticks: the hand-crafted features plus each client's
share of every category value (the plain features count only the top 50 values), and
those shares alone (where the mix of values is the signal, hundreds of other aggregates
can dilute it for LightGBM).

Rows are cached in ``OUT/rows/NAME-KEY.json`` (keyed by the configuration, data and
budget) and trained models in ``OUT/runs/``: a rerun computes only what is missing.
``--report docs/results/quality_physionet`` writes the Markdown table, the same rows as
JSON, and PNGs of score against training minutes (and against the labelled share).
Every configuration run is reported, including those that lose.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import time
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from ..config import MeLESConfig, parse_settings
from ..downstream.evaluate import LGBM_PRESETS, LINEAR_CS, evaluate
from ..downstream.features import handcrafted_features, share_features
from ..io_utils import write_json
from ..store import SequenceStore

log = logging.getLogger(__name__)

#: the configurations compared; each is a set of overrides of MeLESConfig's defaults
CONFIGS: dict[str, dict] = {
    "paper": {"preset": "paper"},
    "paper+gap": {"preset": "paper", "time_features": "gap"},
    "default": {},
    "value": {"preset": "paper", "numeric_encoding": "scalar,by_category", "time_features": "gap,elapsed,absolute"},
    "value+pool": {"preset": "paper", "numeric_encoding": "scalar,by_category",
                   "time_features": "gap,elapsed,absolute", "pooling": "last,mean,max"},
    "value+pool+infonce": {"preset": "paper", "numeric_encoding": "scalar,by_category",
                           "time_features": "gap,elapsed,absolute", "pooling": "last,mean,max", "loss": "infonce"},
    "value+pool+next": {"preset": "paper", "numeric_encoding": "scalar,by_category",
                        "time_features": "gap,elapsed,absolute", "pooling": "last,mean,max", "aux_objective": "next_event"},
    "value+pool+stats0.2": {"preset": "paper", "numeric_encoding": "scalar,by_category",
                            "time_features": "gap,elapsed,absolute", "pooling": "last,mean,max",
                            "aux_objective": "view_stats", "aux_weight": 0.2},
    "value+pool+periodic": {"preset": "paper", "numeric_encoding": "scalar,by_category,periodic",
                            "time_features": "gap,elapsed,absolute", "pooling": "last,mean,max"},
}
#: LightGBM budgets: the paper's, and a lighter one for quick screening (same for every row)
DEFAULT_TARGETS = {  # per dataset recipe; a store's defaults are the first list whose columns it has
    "physionet": ["in_hospital_death", "gender", "age_group"],
    "synthetic": ["bins", "gender"],
    "age": ["bins"],
    "gender": ["gender"],
}
#: settings that change only how a trained model embeds: rows differing only in these reuse one training run
INFERENCE_ONLY = ("embed_chunk", "max_events", "embed_batch_size")
HAND, SUPERVISED = "hand-crafted", "supervised encoder"
#: --hand-shares: the hand-crafted features plus every category value's share of events (a stronger yardstick
#: where the mix of many values matters). The "both" rows keep the plain hand-crafted features, so earlier rows
#: stay comparable; each trained row also gets a "shares + embeddings" line: what the embedding adds to the
#: stronger yardstick.
HAND_SHARES = "hand-crafted + shares of every value"
SHARES = "shares of every value"
#: the yardsticks --hand-shares adds, in report order: name -> (the stem of their cached row file, their table)
YARDSTICKS = {HAND_SHARES: ("_handcrafted-shares", "hand_shares"), SHARES: ("_shares", "shares")}
BOTH_SHARES = "hand-crafted + shares + embeddings"
#: --linear-probe: every feature table (hand-crafted ones too) also scored by a linear probe
#: (:func:`~ptls_meles.downstream.evaluate.evaluate` with ``model="linear"``), in ``scores_linear``;
#: with --hand-shares each trained row also gets ``scores_stacked``: LightGBM on hand-crafted + shares
#: plus the embeddings' out-of-fold probe probabilities (``model="stacked"``), and ``scores_blended``:
#: LightGBM on hand-crafted + shares blended with the embeddings' probe, the probe's share picked on each
#: validation fold (``model="blended"``, ``blend_weight=None``), so a weak embedding is weighed down, not
#: averaged in at half
LINEAR = "linear probe"
STACKED = "hand-crafted + shares, stacked with the embeddings' probe"
BLENDED = "hand-crafted + shares, blended with the embeddings' probe"
#: every per-target score table a row may hold
SCORE_KEYS = ("scores", "scores_both", "scores_both_shares", "scores_linear", "scores_stacked", "scores_blended",
              "scores_finetuned")
#: the read-outs of one table that the summary chooses between: (row key, label). The choice is made per
#: target on the CV mean, never on the test part, so a table is credited with its better read-out fairly.
#: Not the blend: its validation fold also picks the probe's share, so its CV mean is optimistic
READOUTS = {
    "alone": (("scores", "LightGBM"), ("scores_linear", LINEAR)),
    "with hand-crafted + shares": (("scores_both_shares", "LightGBM"), ("scores_stacked", "stacked")),
}


def parse_define(text: str) -> tuple[str, dict]:
    """``NAME:key=value;key=value`` -> (name, overrides), values as in ``--set``."""
    name, _, body = text.partition(":")
    if not name or not body:
        raise ValueError(f"--define {text!r}: expected NAME:KEY=VALUE;KEY=VALUE, e.g. wide:hidden_size=512;pooling=last,mean")
    return name, parse_settings(body.split(";"))


def parse_vary(text: str) -> dict[str, dict]:
    """``KEY=A/B/C`` -> one configuration per value, named ``KEY=A`` etc."""
    key, _, values = text.partition("=")
    if not key or not values:
        raise ValueError(f"--vary {text!r}: expected KEY=VALUE/VALUE/..., e.g. encoder=gru/lstm/transformer")
    return {f"{key}={v}": parse_settings([f"{key}={v}"]) for v in values.split("/")}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ptls-meles bench quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True,
                    help="a recipe (synthetic, physionet, age, gender) or a store directory with targets.parquet")
    ap.add_argument("--raw", help="the recipe's raw files, e.g. ../shared/datasets/physionet2012")
    ap.add_argument("--clients", type=int, default=3000, help="synthetic: number of clients to generate")
    ap.add_argument("--out", required=True, help="work directory: store, trained models, cached rows")
    ap.add_argument("--configs", default="paper,default", help=f"comma-separated names among {', '.join(CONFIGS)}")
    ap.add_argument("--define", action="append", default=[], help="an extra configuration NAME:KEY=VALUE;KEY=VALUE")
    ap.add_argument("--vary", action="append", default=[], help="one configuration per value: KEY=A/B/C")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE applied to every configuration (e.g. hidden_size=128)")
    ap.add_argument("--budget-min", type=float, default=30.0, help="wall-clock training minutes per configuration")
    ap.add_argument("--epochs", type=int, default=100, help="epoch cap per configuration")
    ap.add_argument("--targets", help="comma-separated target columns (default: the dataset's)")
    ap.add_argument("--lgbm", choices=sorted(LGBM_PRESETS), default="paper", help="LightGBM budget, the same for every row")
    ap.add_argument("--early-stopping-rounds", type=int,
                    help="LightGBM stops on each fold's validation part after this many rounds without gain (every row alike)")
    ap.add_argument("--neural", nargs="?", const="both", choices=("both", "supervised", "finetuned"),
                    help="add the supervised-encoder row and/or each configuration fine-tuned (two processes can share the work)")
    ap.add_argument("--finetune-epochs", type=int, default=50, help="--neural: epoch cap of each fold")
    ap.add_argument("--finetune-patience", type=int, default=5, help="--neural: epochs without a better validation score")
    ap.add_argument("--finetune-freeze", type=int, default=0,
                    help="--neural: fine-tuning trains only the new head for this many epochs, then the encoder too")
    ap.add_argument("--hand-shares", action="store_true",
                    help="also score the hand-crafted features plus each client's share of every category value, "
                         "alone and beside each configuration's embeddings")
    ap.add_argument("--linear-probe", action="store_true",
                    help="also score every feature table (hand-crafted, embeddings) with a linear probe: standardised "
                         "logistic regression, its strength picked by an inner CV")
    ap.add_argument("--fractions", default="", help="labelled shares to score, e.g. 0.05,0.1,0.25,0.5")
    ap.add_argument("--threads", type=int, default=1, help="torch threads and LightGBM jobs")
    ap.add_argument("--report", help="path prefix for NAME.md / NAME.json / NAME.png, e.g. docs/results/quality_physionet")
    ap.add_argument("--include-rows", action="append", default=[], metavar="REPORT.json",
                    help="--report-only: also the rows of an earlier report whose names the cache lacks")
    only = ap.add_mutually_exclusive_group()  # each stops before the other's work
    only.add_argument("--report-only", action="store_true",
                      help="train nothing: report every cached row in OUT/rows that scored all the targets")
    only.add_argument("--train-only", action="store_true",
                      help="train the configurations and stop, scoring nothing (e.g. on a GPU machine); the same "
                           "command without it scores them once OUT/runs is back (the cache key is the data's "
                           "fingerprint, not its path, so OUT may move)")
    return ap


def _store_dir(a, work: Path) -> tuple[Path, str]:
    from ..datasets.recipes import RECIPES

    if a.dataset not in RECIPES:
        return Path(a.dataset), Path(a.dataset).name
    out = work / "data"
    if not (out / "targets.parquet").exists():
        if a.dataset == "synthetic":
            RECIPES["synthetic"](out, n_clients=a.clients, show_progress=False)
        elif not a.raw:
            raise ValueError(f"--dataset {a.dataset} needs --raw PATH (the dataset's raw files)")
        else:
            RECIPES[a.dataset](a.raw, out, show_progress=False)
    return out, a.dataset


def _target_list(a, targets: pd.DataFrame, dataset: str) -> list[str]:
    columns = [c for c in targets.columns if c != "client_id"]
    if a.targets:
        chosen = a.targets.split(",")
    else:
        lists = [DEFAULT_TARGETS[dataset]] if dataset in DEFAULT_TARGETS else list(DEFAULT_TARGETS.values())
        chosen = next((lst for lst in lists if all(c in columns for c in lst)), None) or [
            c for c in columns if 2 <= targets[c].nunique() <= 20]
    missing = [c for c in chosen if c not in columns]
    if missing or not chosen:
        raise ValueError(f"--targets: no column(s) {missing or 'that look like labels'} in targets.parquet; "
                         f"columns: {columns}")
    return chosen


def _configs(a) -> dict[str, dict]:
    common = parse_settings(a.set)
    names = [n for n in a.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)} (or --define NAME:K=V)")
    configs = {n: {**CONFIGS[n], **common} for n in names}
    for text in a.define:
        name, overrides = parse_define(text)
        configs[name] = {**overrides, **common}
    for text in a.vary:
        configs.update({name: {**common, **overrides} for name, overrides in parse_vary(text).items()})
    return configs


def _fractions(text: str) -> list[float]:
    try:
        fractions = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"--fractions: expected comma-separated numbers, e.g. 0.05,0.1,0.5, got {text!r}") from e
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise ValueError(f"--fractions: {bad} not in (0, 1]")
    return fractions


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def store_fingerprint(store: SequenceStore, targets: pd.DataFrame) -> str:
    """What the data is, not where it lies: the encoding (vocabularies, scalings), every
    client's id and length, every event value and the targets. Cached rows and runs then
    follow the store when OUT moves (e.g. trained on a GPU machine, scored here), and a store
    prepared again with other values never reuses them."""
    parts = [json.dumps(store.encoding.to_dict(), sort_keys=True, default=str),
             pd.util.hash_pandas_object(pd.Series(store.client_ids), index=False).values.tobytes(),
             store.lengths.tobytes(),
             *(name + str(store.columns[name].dtype) for name in sorted(store.columns)),
             *(np.ascontiguousarray(store.columns[name]).tobytes() for name in sorted(store.columns)),
             pd.util.hash_pandas_object(targets.sort_index(axis=1), index=False).values.tobytes()]
    h = hashlib.sha1()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
    return h.hexdigest()[:16]


def _scores(result) -> dict:
    shares = {"blend_weights": result.params["weight_per_fold"]} if "weight_per_fold" in result.params else {}
    return {"test": result.test_mean, "test_interval": result.test_interval, "cv": result.cv_mean,
            "cv_interval": result.cv_interval, "metric": result.metric, "best_epochs": result.best_epochs, **shares}


#: settings added after cached runs existed, with the value that leaves training as it was:
#: at that value they stay out of the cache keys, so adding a setting does not orphan every run
ADDED_SETTINGS_OFF: dict = {"long_view": 0}


def resolved_settings(overrides: dict, training_only: bool = False) -> dict:
    """Every setting a row runs with, the library's defaults filled in. Cache keys are made of
    these, not of the overrides alone: a cached run keyed by ``{}`` would otherwise hand back a
    model trained with last month's defaults after the defaults change."""
    settings = MeLESConfig.from_dict(overrides).to_dict()
    return {k: v for k, v in settings.items() if not (training_only and k in INFERENCE_ONLY)
            and not (k in ADDED_SETTINGS_OFF and v == ADDED_SETTINGS_OFF[k])}


#: parts of the data key that concern only how rows are scored, never what is trained
READOUT_KEYS = ("lgbm", "early_stopping_rounds")


def _run_dir(name: str, overrides: dict, work: Path, a, data_key: dict) -> Path:
    """One directory per training (inference-only variants share it; other budgets never mix in).
    The LightGBM read-out is not part of it, so ``--lgbm paper`` scores the models ``--lgbm fast``
    trained; a run cached when the read-out was still in the key is found under its old key."""
    training = resolved_settings(overrides, training_only=True)
    stem = name.split("@")[0]

    def keyed(data: dict) -> Path:
        return work / "runs" / f"{stem}-{_digest({'data': data, 'config': training, 'budget': a.budget_min, 'epochs': a.epochs})}"

    trained_on = {k: v for k, v in data_key.items() if k not in READOUT_KEYS}
    run = keyed(trained_on)
    if not run.exists():
        legacy = [keyed({**data_key, "lgbm": budget}) for budget in sorted(LGBM_PRESETS)]
        run = next((p for p in legacy if (p / "train_minutes.txt").exists()), run)
    return run


def _trained_model(overrides: dict, store: SequenceStore, run_dir: Path, a):
    """The configuration's model: reloaded from its finished run, else trained now."""
    from ..train import fit, load_model

    config = MeLESConfig.from_dict({**overrides, "max_minutes": a.budget_min, "max_epochs": a.epochs, "patience": None})
    minutes_file = run_dir / "train_minutes.txt"  # written when training finished: a cut run is not reused
    if minutes_file.exists():
        module = load_model(run_dir / "checkpoints" / "best.ckpt")
        module.config = replace(module.config, **{k: getattr(config, k) for k in INFERENCE_ONLY})
        return module
    t0 = time.perf_counter()
    module = fit(store, config, out_dir=run_dir, show_progress=False)
    minutes_file.write_text(str((time.perf_counter() - t0) / 60))
    return module


def _run_record(run_dir: Path) -> dict:
    """Training minutes, epochs, best epoch and best validation recall of a finished run."""
    metrics = pd.read_csv(next((run_dir / "logs").rglob("metrics.csv")))
    val = metrics.dropna(subset=["val_recall"]) if "val_recall" in metrics else metrics.iloc[:0]
    return {
        "train_minutes": float((run_dir / "train_minutes.txt").read_text()),
        "epochs": int(val["epoch"].max()) + 1 if len(val) else None,
        "best_epoch": int(val.loc[val["val_recall"].idxmax(), "epoch"]) + 1 if len(val) else None,
        "val_recall": float(val["val_recall"].max()) if len(val) else None,
    }


class QualityBench:
    """Fills each row's missing score sets, saving the row file after each one."""

    def __init__(self, a, store: SequenceStore, targets: pd.DataFrame, target_list: list[str], data_key: dict,
                 work: Path) -> None:
        self.a, self.store, self.targets, self.target_list, self.data_key, self.work = a, store, targets, target_list, data_key, work
        self.lgbm = LGBM_PRESETS[a.lgbm]
        self.neural_key = {"finetune_epochs": a.finetune_epochs, "finetune_patience": a.finetune_patience}
        # the fine-tuned rows' key; freezing concerns only a pretrained encoder, and rows made
        # without it keep their key
        self.finetune_key = {**self.neural_key, **({"finetune_freeze": a.finetune_freeze} if a.finetune_freeze else {})}
        self.hand = handcrafted_features(store)
        self.fractions = _fractions(a.fractions)

    @cached_property
    def hand_shares(self) -> pd.DataFrame:
        """The hand-crafted features with every value's share (built once, on first use)."""
        return handcrafted_features(self.store, shares=True)

    @cached_property
    def shares(self) -> pd.DataFrame:
        """Only the shares of every value: the columns ``hand_shares`` adds to the plain features."""
        return share_features(self.store)

    def lgbm_scores(self, tables: list[pd.DataFrame], fraction: float = 1.0) -> dict:
        return {t: _scores(evaluate(tables, self.targets, t, lgbm_params=self.lgbm, n_jobs=self.a.threads,
                                    labelled_fraction=fraction, early_stopping_rounds=self.a.early_stopping_rounds))
                for t in self.target_list}

    def probe_scores(self, tables: list[pd.DataFrame], model: str) -> dict:
        weight = {"blend_weight": None} if model == "blended" else {}  # blended: the share picked on each validation fold
        return {t: _scores(evaluate(tables, self.targets, t, lgbm_params=self.lgbm, n_jobs=self.a.threads, model=model,
                                    **weight))
                for t in self.target_list}

    def fill_linear(self, file: Path, row: dict, tables: Callable[[], list[pd.DataFrame]],
                    stacked: Callable[[], list[pd.DataFrame]] | None = None) -> None:
        """``scores_linear`` (and ``scores_stacked`` and ``scores_blended`` where ``stacked`` gives their
        tables) under --linear-probe."""
        if not self.a.linear_probe:
            return
        if row.get("linear_Cs") != list(LINEAR_CS):  # scored with another grid: score again
            row.pop("scores_linear", None)
            row.pop("scores_stacked", None)
            row.pop("scores_blended", None)
            row["linear_Cs"] = list(LINEAR_CS)
        self.fill(file, row, "scores_linear", lambda: self.probe_scores(tables(), "linear"))
        if stacked is not None:
            self.fill(file, row, "scores_stacked", lambda: self.probe_scores(stacked(), "stacked"))
            self.fill(file, row, "scores_blended", lambda: self.probe_scores(stacked(), "blended"))

    def neural_scores(self, config: MeLESConfig, pretrained) -> dict:
        """Supervised (``pretrained=None``) or fine-tuned scores on :func:`evaluate`'s folds."""
        from ..downstream.finetune import supervised_eval

        freeze = self.a.finetune_freeze if pretrained is not None else 0
        return {t: _scores(supervised_eval(self.store, self.targets, t, config, pretrained=pretrained,
                                           max_epochs=self.a.finetune_epochs, patience=self.a.finetune_patience,
                                           freeze_epochs=freeze, show_progress=False))
                for t in self.target_list}

    @staticmethod
    def fill(file: Path, row: dict, key: str, compute: Callable[[], object]) -> None:
        """``row[key] = compute()`` unless present, then save the row at once."""
        if key not in row:
            t0 = time.perf_counter()
            row[key] = compute()
            row.setdefault("minutes", {})[key] = (time.perf_counter() - t0) / 60
            write_json(file, row, default=float)

    def fill_fractions(self, file: Path, row: dict, tables: Callable[[], list[pd.DataFrame]]) -> None:
        for f in self.fractions:
            if str(f) not in row.setdefault("fractions", {}):
                row["fractions"][str(f)] = self.lgbm_scores(tables(), f)
                write_json(file, row, default=float)

    def hand_row(self, rows_dir: Path) -> dict:
        file = rows_dir / f"_handcrafted-{_digest(self.data_key)}.json"
        row = json.loads(file.read_text()) if file.exists() else {"name": HAND, "n_features": self.hand.shape[1] - 1}
        self.fill(file, row, "scores", lambda: self.lgbm_scores([self.hand]))
        self.fill_linear(file, row, lambda: [self.hand])
        self.fill_fractions(file, row, lambda: [self.hand])
        return row

    def yardstick_row(self, rows_dir: Path, name: str) -> dict:
        """One of :data:`YARDSTICKS`: its aggregates scored alone, by LightGBM (and the probe)."""
        stem, attribute = YARDSTICKS[name]
        file = rows_dir / f"{stem}-{_digest(self.data_key)}.json"
        row = json.loads(file.read_text()) if file.exists() else {"name": name}

        def table() -> pd.DataFrame:  # built on first use: a cached row needs no features
            return getattr(self, attribute)

        def scores() -> dict:
            row["n_features"] = table().shape[1] - 1
            return self.lgbm_scores([table()])

        self.fill(file, row, "scores", scores)
        self.fill_linear(file, row, lambda: [table()])
        return row

    def supervised_row(self, rows_dir: Path, common: dict) -> dict:
        key = _digest({"data": self.data_key, "config": resolved_settings(common), **self.neural_key})
        file = rows_dir / f"_supervised-{key}.json"
        row = json.loads(file.read_text()) if file.exists() else {"name": SUPERVISED, "overrides": common, **self.neural_key}
        self.fill(file, row, "scores", lambda: self.neural_scores(MeLESConfig.from_dict(common), None))
        return row

    def config_row(self, rows_dir: Path, name: str, overrides: dict) -> dict:
        from ..embed import embed_frame

        a = self.a
        key = _digest({"data": self.data_key, "config": resolved_settings(overrides), "budget": a.budget_min,
                       "epochs": a.epochs})
        file = rows_dir / f"{name}-{key}.json"
        run_dir = _run_dir(name, overrides, self.work, a, self.data_key)
        row = json.loads(file.read_text()) if file.exists() else {}
        cache: dict = {}

        def module():
            if "module" not in cache:
                cache["module"] = _trained_model(overrides, self.store, run_dir, a)
            return cache["module"]

        def emb():
            if "emb" not in cache:
                m = module()
                cache["emb"] = embed_frame(m.embedder, self.store, **m.inference_settings, show_progress=False)
            return cache["emb"]

        if "scores" not in row:
            module()
            row.update(config=module().config.to_dict(), **_run_record(run_dir), name=name, overrides=overrides,
                       budget_min=a.budget_min, epoch_cap=a.epochs)
        self.fill(file, row, "scores", lambda: self.lgbm_scores([emb()]))
        self.fill(file, row, "scores_both", lambda: self.lgbm_scores([self.hand, emb()]))
        if a.hand_shares:
            self.fill(file, row, "scores_both_shares", lambda: self.lgbm_scores([self.hand_shares, emb()]))
        self.fill_linear(file, row, lambda: [emb()], (lambda: [self.hand_shares, emb()]) if a.hand_shares else None)
        if a.neural in ("both", "finetuned") and row.get("finetune") != self.finetune_key:
            row.pop("scores_finetuned", None)
            row["finetune"] = self.finetune_key
            self.fill(file, row, "scores_finetuned", lambda: self.neural_scores(module().config, module()))
        self.fill_fractions(file, row, lambda: [emb()])
        return row


def main(argv: list[str] | None = None) -> None:
    from ..datasets.recipes import load_targets

    a = build_parser().parse_args(argv)
    if not 0 <= a.finetune_freeze < a.finetune_epochs:  # refused before hours of training, not at the first fold
        raise ValueError(f"--finetune-freeze must be >= 0 and below --finetune-epochs ({a.finetune_epochs}), so the "
                         f"encoder trains at all; got {a.finetune_freeze} (example: --finetune-freeze 2)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("ptls_meles").setLevel(logging.INFO)  # the rows and each neural fold, also under the CLI
    torch.set_num_threads(a.threads)
    work = Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    store_dir, dataset = _store_dir(a, work)
    store = SequenceStore.load(store_dir)
    targets = load_targets(store_dir)
    target_list = _target_list(a, targets, dataset)
    configs = _configs(a)
    _fractions(a.fractions)
    data_key = {"store": store_fingerprint(store, targets), "n_clients": store.n_clients, "n_events": store.n_events,
                "targets": target_list, "lgbm": a.lgbm}
    if a.early_stopping_rounds:
        data_key["early_stopping_rounds"] = a.early_stopping_rounds
    rows_dir = work / "rows"
    rows_dir.mkdir(exist_ok=True)
    if a.report_only:
        if not a.report:
            raise ValueError("--report-only needs --report PREFIX")
        write_report(cached_rows(rows_dir, target_list, a.include_rows), target_list, Path(a.report), a, argv)
        return
    if a.train_only:
        for name, overrides in configs.items():
            run_dir = _run_dir(name, overrides, work, a, data_key)
            _trained_model(overrides, store, run_dir, a)
            log.info("%s trained: %s in %s", name, _run_record(run_dir), run_dir)
        return

    bench = QualityBench(a, store, targets, target_list, data_key, work)
    rows = [bench.hand_row(rows_dir)]
    log.info("hand-crafted: %s", _brief(rows[0]["scores"]))
    for name in YARDSTICKS if a.hand_shares else ():
        rows.append(bench.yardstick_row(rows_dir, name))
        log.info("%s: %s", name, _brief(rows[-1]["scores"]))
    if a.neural in ("both", "supervised"):
        rows.append(bench.supervised_row(rows_dir, parse_settings(a.set)))
        log.info("supervised encoder: %s", _brief(rows[-1]["scores"]))
    for name, overrides in configs.items():
        row = bench.config_row(rows_dir, name, overrides)
        rows.append(row)
        log.info("%s (%.1f min, %s epochs): emb %s | both %s%s%s%s%s%s", name, row["train_minutes"], row["epochs"],
                 _brief(row["scores"]), _brief(row["scores_both"]),
                 f" | emb, {LINEAR} {_brief(row['scores_linear'])}" if "scores_linear" in row else "",
                 f" | stacked {_brief(row['scores_stacked'])}" if "scores_stacked" in row else "",
                 f" | blended {_brief(row['scores_blended'])}" if "scores_blended" in row else "",
                 f" | shares + emb {_brief(row['scores_both_shares'])}" if "scores_both_shares" in row else "",
                 f" | fine-tuned {_brief(row['scores_finetuned'])}" if "scores_finetuned" in row else "")
    if a.report:
        write_report(rows, target_list, Path(a.report), a, argv)


def cached_rows(rows_dir: Path, target_list: list[str], earlier_reports: list[str] = ()) -> list[dict]:
    """Every cached row that scored all of ``target_list`` (hand-crafted first, then the
    share yardsticks, the supervised encoder next, then by training time), cut to those targets:
    what ``--report-only`` reports.
    ``earlier_reports`` (report JSON files) add their rows whose names the cache lacks, so a
    report survives a cleaned work directory without re-training its rows."""
    hand, yardsticks, supervised, trained = None, {}, [], []
    found = [json.loads(file.read_text()) for file in sorted(rows_dir.glob("*.json"))]
    names = {r["name"] for r in found}
    for report in earlier_reports:
        earlier = json.loads(Path(report).read_text())
        if not isinstance(earlier, list) or not all(isinstance(r, dict) and "name" in r and "scores" in r for r in earlier):
            raise ValueError(f"--include-rows {report}: not a report's rows (expected a JSON list of rows with "
                             f"'name' and 'scores', as REPORT.json beside REPORT.md)")
        found += [r for r in earlier if r["name"] not in names]
    for row in found:
        if not all(t in row.get("scores", {}) for t in target_list):
            continue
        for key in SCORE_KEYS:
            if key in row:
                row[key] = {t: row[key][t] for t in target_list}
        for f, scores in row.get("fractions", {}).items():
            row["fractions"][f] = {t: scores[t] for t in target_list if t in scores}
        if row["name"] == HAND:
            hand = hand or row
        elif row["name"] in YARDSTICKS:
            yardsticks.setdefault(row["name"], row)  # the first found, as for the plain row
        elif row["name"].startswith(SUPERVISED):  # also earlier ones kept under a dated name
            supervised.append(row)
        else:
            trained.append(row)
    if hand is None:
        raise ValueError(f"no cached hand-crafted row in {rows_dir} scores all of {target_list}")
    by_budget = sorted(trained, key=lambda r: (r.get("budget_min", 0), r["name"]))
    return [hand] + [yardsticks[n] for n in YARDSTICKS if n in yardsticks] + supervised + by_budget


def chosen_on_cv(row: dict, readouts: tuple[tuple[str, str], ...], target_list: list[str]) -> dict[str, tuple[str, dict]]:
    """Per target, the read-out of ``row`` (among ``readouts`` it has) with the higher CV mean, as
    (label, scores); the first listed wins a tie (both metrics, AUROC and accuracy, grow with quality).
    Empty when the row has fewer than two of them: there is nothing to choose."""
    present = [(key, label) for key, label in readouts if key in row]
    if len(present) < 2:
        return {}
    out = {}
    for t in target_list:
        key, label = max(present, key=lambda kl: row[kl[0]][t]["cv"])  # max keeps the first on a tie
        out[t] = (label, row[key][t])
    return out


def _chosen_section(rows: list[dict], target_list: list[str]) -> list[str]:
    """The summary table: each table under its read-out chosen on CV (rows with a linear probe)."""
    lines = []
    for r in rows:
        for what, readouts in READOUTS.items():  # hand-crafted rows hold only the read-outs of "alone"
            chosen = chosen_on_cv(r, readouts, target_list)
            if chosen:
                table = "aggregates" if r["name"] == HAND or r["name"] in YARDSTICKS else f"embeddings {what}"
                lines.append(f"| {r['name']} | {table} | " + " | ".join(
                    f"{s['test']:.3f} ± {s['test_interval']:.3f} ({label})" for label, s in
                    (chosen[t] for t in target_list)) + " |")
    if not lines:
        return []
    head = "| configuration | table | " + " | ".join(target_list) + " |"
    return ["", "Each table read the way its CV prefers: per target, LightGBM or the linear probe (for the "
            "embeddings beside hand-crafted + shares: LightGBM on both tables or the stacked probe), whichever has "
            "the higher CV mean; the cell is that read-out's test mean ± 95% interval. The test part never chooses.",
            "", head, "|" + "---|" * (head.count("|") - 1), *lines]


def _machine() -> str:
    from .speed import _machine as machine

    return machine(1).rsplit(", threads=", 1)[0]


def _brief(scores: dict) -> str:
    return " ".join(f"{t} {s['test']:.3f}±{s['test_interval']:.3f}" for t, s in scores.items())


def _fold_epochs(scores: dict) -> str:
    return "; ".join(f"{t}: {','.join(map(str, s['best_epochs']))}" for t, s in scores.items() if s.get("best_epochs"))


def write_report(rows: list[dict], target_list: list[str], prefix: Path, a, argv) -> None:
    """Markdown table (row × target: embeddings alone, beside hand-crafted, fine-tuned; the
    supervised encoder; the labelled-share table), the rows as JSON, and PNGs."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    hand = rows[0]["scores"]
    metric = {t: hand[t]["metric"] for t in target_list}
    head = "| configuration | features | " + " | ".join(f"{t} ({metric[t]})" for t in target_list) + \
        " | budget min | train min | epochs (best) | val recall |"
    lines = [
        f"# Quality bench: {Path(a.out).name}", "",
        "Command: `ptls-meles bench quality -- " + shlex.join(argv or []) + "`", "",
        f"Machine: {_machine()}; one torch thread per run, LightGBM budget `{a.lgbm}`. Each configuration "
        "trains for its wall-clock budget (or its epoch cap), then embeds every client. Cells: test mean ± 95% "
        "interval over 5 folds (CV mean in brackets); val recall: the best validation recall@(views−1). "
        "Supervised and fine-tuned rows train each fold until its validation score stops improving; their "
        "epochs column lists the kept epoch of each fold.", "",
        head, "|" + "---|" * (head.count("|") - 1),
    ]

    def cells(scores):
        return " | ".join(f"{scores[t]['test']:.3f} ± {scores[t]['test_interval']:.3f} (cv {scores[t]['cv']:.3f})"
                          for t in target_list)

    lines.append(f"| {HAND} | {rows[0]['n_features']} aggregates | {cells(hand)} | – | – | – | – |")
    if "scores_linear" in rows[0]:
        lines.append(f"| {HAND} | {LINEAR} | {cells(rows[0]['scores_linear'])} | – | – | – | – |")
    trained = [r for r in rows[1:] if "train_minutes" in r]
    for r in rows[1:]:
        if r["name"] in YARDSTICKS:
            lines.append(f"| {r['name']} | {r['n_features']} aggregates | {cells(r['scores'])} | – | – | – | – |")
            if "scores_linear" in r:
                lines.append(f"| {r['name']} | {LINEAR} | {cells(r['scores_linear'])} | – | – | – | – |")
            continue
        if r["name"].startswith(SUPERVISED):
            lines.append(f"| {r['name']} | sequences | {cells(r['scores'])} | – | – | {_fold_epochs(r['scores'])} | – |")
            continue
        best = f"{r['epochs']} ({r['best_epoch']})" if r.get("epochs") else "–"
        vr = f"{r['val_recall']:.3f}" if r.get("val_recall") is not None else "–"
        lines.append(f"| {r['name']} | embeddings | {cells(r['scores'])} | {r['budget_min']:g} | {r['train_minutes']:.1f} "
                     f"| {best} | {vr} |")
        if "scores_linear" in r:
            lines.append(f"| {r['name']} | embeddings, {LINEAR} | {cells(r['scores_linear'])} | | | | |")
        if "scores_both" in r:  # a row whose scoring stopped after the embeddings alone has none
            lines.append(f"| {r['name']} | hand-crafted + embeddings | {cells(r['scores_both'])} | | | | |")
        if "scores_both_shares" in r:
            lines.append(f"| {r['name']} | {BOTH_SHARES} | {cells(r['scores_both_shares'])} | | | | |")
        if "scores_stacked" in r:
            lines.append(f"| {r['name']} | {STACKED} | {cells(r['scores_stacked'])} | | | | |")
        if "scores_blended" in r:
            lines.append(f"| {r['name']} | {BLENDED} | {cells(r['scores_blended'])} | | | | |")
        if "scores_finetuned" in r:
            lines.append(f"| {r['name']} | fine-tuned | {cells(r['scores_finetuned'])} | | | "
                         f"{_fold_epochs(r['scores_finetuned'])} | |")
    with_fractions = [r for r in [rows[0], *trained] if r.get("fractions")]
    if with_fractions:
        lines += ["", "Labelled share of the training clients (test mean ± 95% interval; the test part is fixed):", ""]
        head = "| share | features | " + " | ".join(target_list) + " |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for f in sorted({f for r in with_fractions for f in r["fractions"]}, key=float):
            for r in with_fractions:
                if f in r["fractions"]:
                    s = r["fractions"][f]
                    lines.append(f"| {float(f):g} | {r['name']} | " + " | ".join(
                        f"{s[t]['test']:.3f} ± {s[t]['test_interval']:.3f}" for t in target_list) + " |")
    lines += _chosen_section(rows, target_list)
    lines += ["", "Configurations (overrides of `MeLESConfig` defaults):", ""]
    lines += [f"- `{r['name']}`: `{json.dumps(r['overrides'])}`" for r in trained]
    prefix.with_suffix(".md").write_text("\n".join(lines) + "\n")
    prefix.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=float))
    _plot(rows, target_list, prefix.with_suffix(".png"))
    if with_fractions:
        _plot_fractions(with_fractions, target_list, prefix.parent / f"{prefix.name}_fractions.png")


def _plot(rows: list[dict], target_list: list[str], path: Path) -> None:
    from .report import pyplot, save_figure, target_axes

    plt = pyplot()
    fig, axes = target_axes(plt, target_list)
    for ax, t in zip(axes, target_list):
        ax.axhline(rows[0]["scores"][t]["test"], color="k", ls="--", lw=1, label=HAND)
        for r in rows[1:]:
            if "train_minutes" not in r:
                ax.axhline(r["scores"][t]["test"], color="grey", ls=":", lw=1, label=r["name"])
                continue
            x = r["train_minutes"]
            ax.errorbar([x], [r["scores"][t]["test"]], yerr=[r["scores"][t]["test_interval"]], fmt="o", capsize=3,
                        label=r["name"])
            if "scores_both" in r:
                ax.plot([x], [r["scores_both"][t]["test"]], "x", color=ax.lines[-1].get_color())
        ax.set_title(f"{t} ({rows[0]['scores'][t]['metric']})")
        ax.set_xlabel("training minutes")
    axes[0].legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("test score (o: embeddings, x: + hand-crafted)")
    save_figure(fig, plt, path)


def _plot_fractions(rows: list[dict], target_list: list[str], path: Path) -> None:
    from .report import pyplot, save_figure, target_axes

    plt = pyplot()
    fig, axes = target_axes(plt, target_list)
    for ax, t in zip(axes, target_list):
        for r in rows:
            fs = sorted(r["fractions"], key=float)
            ax.errorbar([float(f) for f in fs], [r["fractions"][f][t]["test"] for f in fs],
                        yerr=[r["fractions"][f][t]["test_interval"] for f in fs], marker="o", capsize=3, label=r["name"])
        ax.set_xscale("log")
        ax.set_title(t)
        ax.set_xlabel("labelled share of the training clients")
    axes[0].legend(fontsize=7, loc="lower right")
    save_figure(fig, plt, path)
