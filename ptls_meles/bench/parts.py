"""Which part of a trained embedding carries the score: each pooling part scored alone.

An embedding concatenates pooling parts (last / mean / max / attention states, and with
``category_pooling`` its per-category statistics). Scoring each part alone (then the global
states together and the category parts together) with
the quality bench's LightGBM protocol shows what the downstream model reads, and whether a
part mostly adds dimensions for LightGBM to wade through. It reads a model that
``bench quality`` trained, in the same work directory, so every score is made on the same
store, targets, folds and test part as that bench's rows.

    ptls-meles bench parts -- --out runs/q_phys --run "defaults + category pooling 32" \\
        --targets in_hospital_death,gender,age_group
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from ..nn.embedder import Embedder


#: category pooling's statistics as the parts are called in the reports
PART_NAMES = {"mean": "category means", "last": "category last states", "share": "category sums over the length",
              "max": "category maxima"}
#: the event bag's part, neither a global state nor a category statistic
EVENT_BAG = "event bag"


def embedding_parts(embedder: Embedder) -> dict[str, slice]:
    """Name -> the columns of each pooling part in an embedding, in order; they tile it."""
    parts: dict[str, slice] = {}
    start = 0
    pooling = getattr(embedder.seq_encoder, "pooling", None)
    names = getattr(pooling, "parts", None) or ("pooled",)
    width = embedder.seq_encoder.output_size // len(names)
    for name in names:
        parts[name] = slice(start, start + width)
        start += width
    if embedder.category_pooling is not None:
        for statistic, size in embedder.category_pooling.statistic_sizes.items():
            parts[PART_NAMES[statistic]] = slice(start, start + size)
            start += size
    if embedder.event_bag is not None:
        parts[EVENT_BAG] = slice(start, start + embedder.event_bag.output_size)
        start += embedder.event_bag.output_size
    if start != embedder.output_size:
        raise ValueError(f"the parts cover {start} of the embedding's {embedder.output_size} columns")
    return parts


def part_groups(parts: dict[str, slice]) -> dict[str, list[int]]:
    """The parts scored together: the global states (last / mean / max / attention) and every
    per-category statistic, each as one table, when the embedding has both kinds. Whether the
    category parts alone read as well as the whole embedding tells if the global states add
    anything for LightGBM or only columns to wade through."""
    category = [name for name in parts if name in PART_NAMES.values()]
    pooled = [name for name in parts if name not in category and name != EVENT_BAG]
    if not category or not pooled:
        return {}
    return {group: [i for name in names for i in range(parts[name].start, parts[name].stop)]
            for group, names in (("global states together", pooled), ("category parts together", category))}


def main(argv: list[str] | None = None) -> None:
    from ..datasets.recipes import load_targets
    from ..downstream.evaluate import evaluate
    from ..embed import embed_frame
    from ..store import SequenceStore
    from ..train import load_model
    from ..downstream.evaluate import LGBM_PRESETS

    ap = argparse.ArgumentParser(prog="ptls-meles bench parts", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="a `bench quality` work directory (data/ and runs/)")
    ap.add_argument("--run", required=True, help="the configuration's name in that bench (its run directory's prefix)")
    ap.add_argument("--targets", required=True, help="comma-separated target columns")
    ap.add_argument("--lgbm", choices=sorted(LGBM_PRESETS), default="fast", help="LightGBM budget, as in bench quality")
    ap.add_argument("--threads", type=int, default=1, help="torch threads and LightGBM jobs")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(a.threads)
    work = Path(a.out)
    runs = sorted(p for p in (work / "runs").glob("*") if p.name.rsplit("-", 1)[0] == a.run)
    if len(runs) != 1:
        found = sorted({p.name.rsplit("-", 1)[0] for p in (work / "runs").glob("*")})
        raise ValueError(f"--run {a.run!r}: {len(runs)} trained runs of that name in {work / 'runs'}; names: {found}")
    module = load_model(runs[0] / "checkpoints" / "best.ckpt")
    store, targets = SequenceStore.load(work / "data"), load_targets(work / "data")
    emb = embed_frame(module.embedder, store, show_progress=False, **module.inference_settings)
    columns = [c for c in emb.columns if c != "client_id"]
    slices = embedding_parts(module.embedder)
    parts = {**{k: columns[v] for k, v in slices.items()},
             **{k: [columns[i] for i in v] for k, v in part_groups(slices).items()}, "whole embedding": columns}
    print(f"{a.run}: {runs[0]}; LightGBM {a.lgbm}; test mean ± 95% interval over 5 folds")
    print("| part | columns | " + " | ".join(a.targets.split(",")) + " |")
    print("|---|---|" + "---|" * len(a.targets.split(",")))
    for name, cols in parts.items():
        scores = [evaluate(emb[["client_id"] + cols], targets, t, n_folds=5, seed=42, lgbm_params=LGBM_PRESETS[a.lgbm],
                           n_jobs=a.threads) for t in a.targets.split(",")]
        print(f"| {name} | {len(cols)} | " + " | ".join(f"{r.test_mean:.3f} ± {r.test_interval:.3f}" for r in scores) + " |",
              flush=True)
