"""The demo: synthetic banking data → MeLES → embedding table → LightGBM proof, in minutes on a laptop.

Its default size is set so the whole demo stays within about 5 minutes on 2 CPU cores
(README, "Two commands"); ``--clients`` and ``--epochs`` scale it up.
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd


# The demo's budgets: small trees and a short self-supervised run, so the whole demo
# stays within about 5 minutes on 2 cores. Benchmarks use the paper's 1000 trees × 0.02.
DEMO_LGBM = {"n_estimators": 60, "learning_rate": 0.1, "num_leaves": 7, "colsample_bytree": 0.3, "max_bin": 31}
DEMO_CLIENTS = 2000
DEMO_MEAN_EVENTS = 200
DEMO_EPOCHS = 8
# the default encoder (time gaps on: the synthetic store's event time is in seconds, so
# sessions minutes apart are visible), narrower for the time budget
DEMO_MODEL = {"hidden_size": 128}


def run_demo(
    out: Path, n_clients: int = DEMO_CLIENTS, max_epochs: int = DEMO_EPOCHS, show_progress: bool = True, seed: int = 0
) -> pd.DataFrame:
    from ..api import MeLES
    from ..datasets.recipes import load_targets, recipe_synthetic
    from ..downstream.evaluate import evaluate
    from ..downstream.features import handcrafted_features
    from .report import markdown_table

    t0 = time.perf_counter()
    out = Path(out)
    store, report = recipe_synthetic(out / "data", n_clients=n_clients, seed=seed, mean_events=DEMO_MEAN_EVENTS, show_progress=show_progress)
    print(f"[1/4] data: {report.summary()}")
    model = MeLES(max_epochs=max_epochs, seed=seed, **DEMO_MODEL)
    model.fit(store, out_dir=out / "run", show_progress=show_progress)
    model.save(out / "run" / "model")
    print(f"[2/4] fit: model saved to {out / 'run' / 'model'}")
    stats = model.write_embeddings(store, out / "embeddings.parquet", show_progress=show_progress)
    print(f"[3/4] embed: {stats['clients']:,} clients → {out / 'embeddings.parquet'}")
    emb = pd.read_parquet(out / "embeddings.parquet")
    hand = handcrafted_features(store)
    targets = load_targets(out / "data")
    rows = []
    for name, tables in [("hand-crafted", [hand]), ("MeLES embeddings", [emb]), ("hand-crafted + MeLES", [hand, emb])]:
        for target in ("bins", "gender"):
            r = evaluate(tables, targets, target, seed=42, lgbm_params=DEMO_LGBM)
            rows.append({"features": name, "target": target, "metric": r.metric, "test": r.test_mean, "±": r.test_interval, "cv": r.cv_mean})
    table = pd.DataFrame(rows)
    pivot = table.assign(score=[f"{t:.3f} ± {i:.3f}" for t, i in zip(table["test"], table["±"])]).pivot(index="features", columns="target", values="score")
    print(f"[4/4] evaluate (LightGBM {DEMO_LGBM}, 5-fold CV, test part 10%, test score mean ± 95% interval over folds):")
    print(markdown_table(["features", *pivot.columns], [[name, *row] for name, row in zip(pivot.index, pivot.values.tolist())]))
    table.to_csv(out / "results.csv", index=False)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; results in {out / 'results.csv'}")
    return table

