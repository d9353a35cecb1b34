"""Quality bench: named MeLES configurations trained for the same budget, scored downstream.

    ptls-meles bench quality -- --dataset physionet --raw ../shared/datasets/physionet2012 \
        --out runs/quality_physionet --budget-min 30 --configs paper,default [--define NAME:K=V;K=V]

Each configuration trains for ``--budget-min`` minutes of wall-clock time (or
``--epochs``, whichever comes first), then its embeddings are scored by LightGBM alone
and beside the hand-crafted features, with :func:`evaluate`'s protocol, on every target.
Rows are cached in ``OUT/rows/NAME.json`` (keyed by the configuration, data and budget):
a rerun skips finished rows. ``--report docs/results/quality_physionet`` writes the
Markdown table, the same rows as JSON, and a PNG of score against training minutes.
Every configuration run is reported, including those that lose.

``--neural`` adds the neural baselines on the same folds: a supervised encoder (the
defaults with ``--set``, trained once per data) and each configuration's MeLES model
fine-tuned; both train until their validation fold has not improved for
``--finetune-patience`` epochs, at most ``--finetune-epochs``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import time
from pathlib import Path

import pandas as pd
import torch

from ..config import MeLESConfig, parse_settings
from ..downstream.evaluate import PAPER_LGBM_PARAMS, evaluate
from ..downstream.features import handcrafted_features
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
LGBM = {
    "paper": PAPER_LGBM_PARAMS,
    "fast": {**PAPER_LGBM_PARAMS, "n_estimators": 200, "learning_rate": 0.07, "num_leaves": 31,
             "colsample_bytree": 0.5},
}
DEFAULT_TARGETS = {
    "physionet": ["in_hospital_death", "gender", "age_group"],
    "synthetic": ["bins", "gender"],
}


def parse_define(text: str) -> tuple[str, dict]:
    """``NAME:key=value;key=value`` -> (name, overrides), values as in ``--set``."""
    name, _, body = text.partition(":")
    if not name or not body:
        raise ValueError(f"--define {text!r}: expected NAME:KEY=VALUE;KEY=VALUE, e.g. wide:hidden_size=512;pooling=last,mean")
    return name, parse_settings(body.split(";"))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ptls-meles bench quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True,
                    help="physionet | synthetic | a store directory with targets.parquet")
    ap.add_argument("--raw", help="raw data for the physionet recipe, e.g. ../shared/datasets/physionet2012")
    ap.add_argument("--clients", type=int, default=3000, help="synthetic: number of clients to generate")
    ap.add_argument("--out", required=True, help="work directory: store, trained models, cached rows")
    ap.add_argument("--configs", default="paper,default", help=f"comma-separated names among {', '.join(CONFIGS)}")
    ap.add_argument("--define", action="append", default=[], help="an extra configuration NAME:KEY=VALUE;KEY=VALUE")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE applied to every configuration (e.g. hidden_size=128)")
    ap.add_argument("--budget-min", type=float, default=30.0, help="wall-clock training minutes per configuration")
    ap.add_argument("--epochs", type=int, default=100, help="epoch cap per configuration")
    ap.add_argument("--targets", help="comma-separated target columns (default: the dataset's)")
    ap.add_argument("--lgbm", choices=sorted(LGBM), default="paper", help="LightGBM budget, the same for every row")
    ap.add_argument("--threads", type=int, default=1, help="torch threads and LightGBM jobs")
    ap.add_argument("--neural", action="store_true", help="add the supervised-encoder row and each configuration fine-tuned")
    ap.add_argument("--finetune-epochs", type=int, default=50, help="--neural: epoch cap of each fold")
    ap.add_argument("--finetune-patience", type=int, default=5, help="--neural: epochs without a better validation score")
    ap.add_argument("--report", help="path prefix for NAME.md / NAME.json / NAME.png, e.g. docs/results/quality_physionet")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: report every cached row in OUT/rows that scored all the targets")
    return ap


def _store_dir(a, work: Path) -> tuple[Path, str]:
    if a.dataset not in ("physionet", "synthetic"):
        return Path(a.dataset), Path(a.dataset).name
    from ..datasets.recipes import RECIPES

    out = work / "data"
    if not (out / "targets.parquet").exists():
        if a.dataset == "physionet":
            if not a.raw:
                raise ValueError("--dataset physionet needs --raw PATH (e.g. ../shared/datasets/physionet2012)")
            RECIPES["physionet"](a.raw, out, show_progress=False)
        else:
            RECIPES["synthetic"](out, n_clients=a.clients, show_progress=False)
    return out, a.dataset


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _score(features, targets, target_list, lgbm: dict, threads: int) -> dict:
    out = {}
    for t in target_list:
        r = evaluate(features, targets, t, lgbm_params=lgbm, n_jobs=threads)
        out[t] = {"test": r.test_mean, "test_interval": r.test_interval, "cv": r.cv_mean, "cv_interval": r.cv_interval,
                  "metric": r.metric}
    return out


def _score_neural(store, targets, target_list, config: MeLESConfig, pretrained, a) -> dict:
    """Supervised (``pretrained=None``) or fine-tuned scores with the same folds as :func:`_score`."""
    from ..downstream.finetune import supervised_eval

    out = {}
    for t in target_list:
        r = supervised_eval(store, targets, t, config, pretrained=pretrained, max_epochs=a.finetune_epochs,
                            patience=a.finetune_patience, show_progress=False)
        out[t] = {"test": r.test_mean, "test_interval": r.test_interval, "cv": r.cv_mean, "cv_interval": r.cv_interval,
                  "metric": r.metric, "best_epochs": r.best_epochs, "fold_seconds": r.params["fold_seconds"]}
    return out


#: settings that change only how a trained model embeds: rows differing only in these reuse one training run
INFERENCE_ONLY = ("embed_chunk", "max_events", "embed_batch_size")


def _run_dir(name: str, overrides: dict, work: Path, a, data_key: dict) -> Path:
    """One directory per training (inference-only variants share it; other budgets never mix in)."""
    training = {k: v for k, v in overrides.items() if k not in INFERENCE_ONLY}
    key = _digest({"data": data_key, "config": training, "budget": a.budget_min, "epochs": a.epochs})
    return work / "runs" / f"{name.split('@')[0]}-{key}"


def _trained_model(name: str, overrides: dict, store: SequenceStore, run_dir: Path, a):
    """The configuration's model: reloaded from its finished run, else trained now."""
    from ..train import fit, load_model

    config = MeLESConfig.from_dict({**overrides, "max_minutes": a.budget_min, "max_epochs": a.epochs,
                                    "patience": None})
    minutes_file = run_dir / "train_minutes.txt"  # written when training finished: a cut run is not reused
    if minutes_file.exists():
        module = load_model(run_dir / "checkpoints" / "best.ckpt")
        return _with_inference(module, config)
    t0 = time.perf_counter()
    module = fit(store, config, out_dir=run_dir, show_progress=False)
    minutes_file.write_text(str((time.perf_counter() - t0) / 60))
    return module


def _with_inference(module, config: MeLESConfig):
    """``module`` embedding with ``config``'s inference-only settings."""
    from dataclasses import replace

    module.cfg = replace(module.cfg, **{k: getattr(config, k) for k in INFERENCE_ONLY})
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


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(a.threads)
    work = Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    store_dir, dataset = _store_dir(a, work)
    store = SequenceStore.load(store_dir)
    targets = pd.read_parquet(store_dir / "targets.parquet")
    id_col = store.encoding.client_col
    targets = targets.rename(columns={id_col: "client_id"}) if id_col in targets and "client_id" not in targets else targets
    known = [lst for lst in DEFAULT_TARGETS.values() if all(c in targets.columns for c in lst)]
    target_list = a.targets.split(",") if a.targets else DEFAULT_TARGETS.get(dataset) or (known[0] if known else [
        c for c in targets.columns if c != "client_id" and 2 <= targets[c].nunique() <= 20])
    lgbm = LGBM[a.lgbm]
    common = parse_settings(a.set)
    configs = {n: {**CONFIGS[n], **common} for n in a.configs.split(",") if n}
    unknown = [n for n in a.configs.split(",") if n and n not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)} (or --define NAME:K=V)")
    for text in a.define:
        name, overrides = parse_define(text)
        configs[name] = {**overrides, **common}
    data_key = {"store": str(store_dir.resolve()), "n_clients": store.n_clients, "n_events": store.n_events,
                "targets": target_list, "lgbm": a.lgbm}
    rows_dir = work / "rows"
    rows_dir.mkdir(exist_ok=True)
    if a.report_only:
        if not a.report:
            raise ValueError("--report-only needs --report PREFIX")
        write_report(cached_rows(rows_dir, target_list), target_list, Path(a.report), a, argv)
        return

    hand_file = rows_dir / f"_handcrafted-{_digest(data_key)}.json"
    hand = handcrafted_features(store)
    if not hand_file.exists():
        t0 = time.perf_counter()
        row = {"name": "hand-crafted", "scores": _score(hand, targets, target_list, lgbm, a.threads),
               "n_features": hand.shape[1] - 1, "eval_minutes": (time.perf_counter() - t0) / 60}
        write_json(hand_file, row, default=float)
    rows = [json.loads(hand_file.read_text())]
    log.info("hand-crafted: %s", _brief(rows[0]["scores"]))

    if a.neural:
        config = MeLESConfig.from_dict(common)
        neural_key = {"finetune_epochs": a.finetune_epochs, "finetune_patience": a.finetune_patience}
        sup_file = rows_dir / f"_supervised-{_digest({'data': data_key, 'config': common, **neural_key})}.json"
        if not sup_file.exists():
            t0 = time.perf_counter()
            row = {"name": "supervised encoder", "overrides": common, **neural_key,
                   "scores": _score_neural(store, targets, target_list, config, None, a),
                   "eval_minutes": (time.perf_counter() - t0) / 60}
            write_json(sup_file, row, default=float)
        rows.append(json.loads(sup_file.read_text()))
        log.info("supervised encoder: %s", _brief(rows[-1]["scores"]))

    for name, overrides in configs.items():
        key = _digest({"data": data_key, "config": overrides, "budget": a.budget_min, "epochs": a.epochs})
        file = rows_dir / f"{name}-{key}.json"
        run_dir = _run_dir(name, overrides, work, a, data_key)
        module = None
        if not file.exists():
            from ..embed import embed_frame

            module = _trained_model(name, overrides, store, run_dir, a)
            emb = embed_frame(module.embedder, store, **module.inference_settings, show_progress=False)
            t0 = time.perf_counter()
            row = {"config": module.cfg.to_dict(), **_run_record(run_dir), "name": name, "overrides": overrides,
                   "scores": _score(emb, targets, target_list, lgbm, a.threads),
                   "scores_both": _score([hand, emb], targets, target_list, lgbm, a.threads),
                   "eval_minutes": (time.perf_counter() - t0) / 60, "budget_min": a.budget_min, "epoch_cap": a.epochs}
            write_json(file, row, default=float)
        row = json.loads(file.read_text())
        if a.neural and row.get("finetune") != neural_key:
            module = module or _trained_model(name, overrides, store, run_dir, a)
            row.update(finetune=neural_key, scores_finetuned=_score_neural(store, targets, target_list, module.cfg, module, a))
            write_json(file, row, default=float)
        rows.append(row)
        log.info("%s (%.1f min, %s epochs): emb %s | both %s%s", name, row["train_minutes"], row["epochs"],
                 _brief(row["scores"]), _brief(row["scores_both"]),
                 f" | fine-tuned {_brief(row['scores_finetuned'])}" if "scores_finetuned" in row else "")
    if a.report:
        write_report(rows, target_list, Path(a.report), a, argv)


def cached_rows(rows_dir: Path, target_list: list[str]) -> list[dict]:
    """Every cached row that scored all of ``target_list`` (hand-crafted first, the supervised
    encoder next, then by training time), cut to those targets: what ``--report-only`` reports."""
    hand, supervised, trained = None, [], []
    for file in sorted(rows_dir.glob("*.json")):
        row = json.loads(file.read_text())
        if not all(t in row["scores"] for t in target_list):
            continue
        for key in ("scores", "scores_both", "scores_finetuned"):
            if key in row:
                row[key] = {t: row[key][t] for t in target_list}
        if row["name"] == "hand-crafted":
            hand = hand or row
        elif row["name"] == "supervised encoder":
            supervised.append(row)
        else:
            trained.append(row)
    if hand is None:
        raise ValueError(f"no cached hand-crafted row in {rows_dir} scores all of {target_list}")
    return [hand] + supervised + sorted(trained, key=lambda r: (r.get("budget_min", 0), r["name"]))


def _machine() -> str:
    from .speed import _machine as machine

    return machine(1).rsplit(", threads=", 1)[0]


def _brief(scores: dict) -> str:
    return " ".join(f"{t} {s['test']:.3f}±{s['test_interval']:.3f}" for t, s in scores.items())


def write_report(rows: list[dict], target_list: list[str], prefix: Path, a, argv) -> None:
    """Markdown table (configuration × target, embeddings alone and beside hand-crafted),
    the rows as JSON, and a PNG of score against training minutes."""
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

    lines.append(f"| hand-crafted | {rows[0]['n_features']} aggregates | {cells(hand)} | – | – | – | – |")
    for r in rows[1:]:
        if "train_minutes" not in r:  # the supervised encoder
            lines.append(f"| supervised encoder | sequences | {cells(r['scores'])} | – | – | "
                         f"{_fold_epochs(r['scores'])} | – |")
            continue
        best = f"{r['epochs']} ({r['best_epoch']})" if r.get("epochs") else "–"
        vr = f"{r['val_recall']:.3f}" if r.get("val_recall") is not None else "–"
        lines.append(f"| {r['name']} | embeddings | {cells(r['scores'])} | {r['budget_min']:g} | {r['train_minutes']:.1f} "
                     f"| {best} | {vr} |")
        lines.append(f"| {r['name']} | hand-crafted + embeddings | {cells(r['scores_both'])} | | | | |")
        if "scores_finetuned" in r:
            lines.append(f"| {r['name']} | fine-tuned | {cells(r['scores_finetuned'])} | | | "
                         f"{_fold_epochs(r['scores_finetuned'])} | |")
    lines += ["", "Configurations (overrides of `MeLESConfig` defaults):", ""]
    lines += [f"- `{r['name']}`: `{json.dumps(r['overrides'])}`" for r in rows[1:] if "train_minutes" in r]
    prefix.with_suffix(".md").write_text("\n".join(lines) + "\n")
    prefix.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=float))
    _plot(rows, target_list, prefix.with_suffix(".png"))


def _fold_epochs(scores: dict) -> str:
    return "; ".join(f"{t}: {','.join(map(str, s['best_epochs']))}" for t, s in scores.items() if s.get("best_epochs"))


def _plot(rows: list[dict], target_list: list[str], path: Path) -> None:
    from .report import pyplot, save_figure, target_axes

    plt = pyplot()
    fig, axes = target_axes(plt, target_list)
    for ax, t in zip(axes, target_list):
        ax.axhline(rows[0]["scores"][t]["test"], color="k", ls="--", lw=1, label="hand-crafted")
        for r in rows[1:]:
            if "train_minutes" not in r:
                ax.axhline(r["scores"][t]["test"], color="grey", ls=":", lw=1, label=r["name"])
                continue
            x = r["train_minutes"]
            ax.errorbar([x], [r["scores"][t]["test"]], yerr=[r["scores"][t]["test_interval"]], fmt="o", capsize=3,
                        label=r["name"])
            ax.plot([x], [r["scores_both"][t]["test"]], "x", color=ax.lines[-1].get_color())
        ax.set_title(f"{t} ({rows[0]['scores'][t]['metric']})")
        ax.set_xlabel("training minutes")
    axes[0].legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("test score (o: embeddings, x: + hand-crafted)")
    save_figure(fig, plt, path)
