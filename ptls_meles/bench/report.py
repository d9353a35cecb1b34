"""The paper benchmark's report: Markdown tables and PNG plots, all drawn from ``results.json``.

Kept apart from :mod:`ptls_meles.bench.paper` (which runs the experiments) so a report
can be redrawn from saved numbers alone, without retraining anything.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..io_utils import atomic_path

SIZE_PLOT = "quality_vs_embedding_size.png"
FRACTION_PLOT = "quality_vs_labelled_fraction.png"
PROJECTION_PLOT = "embedding_projection.png"
REPORT_FILE = "report.md"

ABLATION_TITLES = {
    "split": "Pair generation (split strategy)",
    "loss": "Loss",
    "miner": "Pair / triplet miner",
    "encoder": "Sequence encoder",
    "size": "Embedding size (hidden size)",
}


# --------------------------------------------------------------------------- formatting
def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured Markdown table (no dependency on ``tabulate``)."""
    def text(v) -> str:
        return "" if v is None else str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(text(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(text(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def score_text(cell: dict | None, part: str = "test") -> str:
    """``"0.812 ± 0.010"`` for a result cell's test (or cv) mean and 95% interval."""
    if not cell:
        return "—"
    if "error" in cell:
        return "error"
    mean, interval = cell.get(f"{part}_mean"), cell.get(f"{part}_interval")
    if mean is None or not math.isfinite(mean):
        return "—"
    return f"{mean:.3f} ± {interval:.3f}"


def _seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "—"
    if s < 10:
        return f"{s:.1f} s"
    return f"{s:.0f} s" if s < 600 else f"{s / 60:.1f} min"


def _recall(r: float | None) -> str:
    return "—" if r is None else f"{r:.3f}"


# --------------------------------------------------------------------------- tables
def comparison_rows(results: dict, targets: list[str]) -> list[list]:
    table = results.get("table", {})
    return [[row] + [score_text(table[row].get(t)) for t in targets] for row in table]


def detail_rows(results: dict, targets: list[str]) -> list[list]:
    out = []
    for row, cells in results.get("table", {}).items():
        for t in targets:
            c = cells.get(t)
            if c:
                out.append([row, t, c["metric"], score_text(c), score_text(c, "cv"), c["n_train"], c["n_test"],
                            c["n_features"], _seconds(c.get("seconds"))])
    return out


def ablation_rows(results: dict, group: str, targets: list[str]) -> list[list]:
    rows = []
    for value, row in results.get("ablations", {}).get(group, {}).items():
        run = results.get("runs", {}).get(row.get("run"), {})
        rows.append([value] + [score_text(row.get("targets", {}).get(t)) for t in targets]
                    + [_recall(run.get("val_recall")), _recall(run.get("best_val_recall")), _seconds(run.get("train_seconds"))])
    return rows


def fraction_rows(results: dict, targets: list[str]) -> list[list]:
    rows = []
    for fraction, by_features in sorted(results.get("fraction", {}).items(), key=lambda kv: float(kv[0])):
        for features, cells in by_features.items():
            n_train = next((c["n_train"] for c in cells.values() if c and "n_train" in c), None)
            rows.append([f"{float(fraction):.0%}", features] + [score_text(cells.get(t)) for t in targets] + [n_train])
    return rows


# --------------------------------------------------------------------------- plots
def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (benchmarks run without a display)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def target_axes(plt, targets: list[str]):
    """One panel per target, side by side."""
    fig, axes = plt.subplots(1, len(targets), figsize=(4.5 * len(targets), 3.6), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, plt, path: Path) -> Path:
    """Write ``fig`` as PNG at ``path`` (whole or not at all) and close it."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def plot_quality_vs_size(results: dict, targets: list[str], path: Path) -> Path | None:
    """Test score (± 95% interval) vs hidden size, one panel per target; hand-crafted as a dashed line."""
    rows = results.get("ablations", {}).get("size", {})
    points = sorted((int(v), row) for v, row in rows.items())
    if len(points) < 1:
        return None
    plt = pyplot()
    fig, axes = target_axes(plt, targets)
    hand = results.get("table", {}).get("LightGBM: hand-crafted", {})
    for ax, t in zip(axes, targets):
        cells = [(s, row.get("targets", {}).get(t)) for s, row in points]
        cells = [(s, c) for s, c in cells if c and "test_mean" in c]
        if cells:
            ax.errorbar([s for s, _ in cells], [c["test_mean"] for _, c in cells], yerr=[c["test_interval"] for _, c in cells],
                        marker="o", capsize=3, label="MeLES embeddings")
            ax.set_ylabel(f"test {cells[0][1]['metric']}")
        if hand.get(t):
            ax.axhline(hand[t]["test_mean"], color="grey", linestyle="--", label="hand-crafted")
        ax.set_xscale("log", base=2)
        ax.set_xticks([s for s, _ in points], [str(s) for s, _ in points])
        ax.minorticks_off()
        ax.set_xlabel("hidden size")
        ax.set_title(t)
        ax.legend(fontsize=8)
    return save_figure(fig, plt, path)


def plot_quality_vs_fraction(results: dict, targets: list[str], path: Path) -> Path | None:
    """Test score (± 95% interval) vs share of labelled training clients, per feature set and target."""
    by_fraction = results.get("fraction", {})
    if not by_fraction:
        return None
    plt = pyplot()
    fig, axes = target_axes(plt, targets)
    fractions = sorted(by_fraction, key=float)
    feature_sets = list(dict.fromkeys(f for fr in fractions for f in by_fraction[fr]))
    for ax, t in zip(axes, targets):
        metric = None
        for features in feature_sets:
            pts = [(float(fr), by_fraction[fr].get(features, {}).get(t)) for fr in fractions]
            pts = [(x, c) for x, c in pts if c and "test_mean" in c]
            if pts:
                metric = pts[0][1]["metric"]
                ax.errorbar([x for x, _ in pts], [c["test_mean"] for _, c in pts], yerr=[c["test_interval"] for _, c in pts],
                            marker="o", capsize=3, label=features)
        ax.set_xscale("log")
        ax.set_xticks([float(f) for f in fractions], [f"{float(f):.0%}" for f in fractions])
        ax.minorticks_off()
        ax.set_xlabel("labelled share of the training part")
        ax.set_ylabel(f"test {metric or 'score'}")
        ax.set_title(t)
        ax.legend(fontsize=8)
    return save_figure(fig, plt, path)


def plot_projection(embeddings: pd.DataFrame, labels: pd.Series, path: Path, title: str, seed: int = 42,
                    max_points: int = 5000) -> Path:
    """2-D PCA of the embedding table (``client_id, emb_*``) coloured by a label (``labels`` indexed by client id)."""
    from sklearn.decomposition import PCA

    plt = pyplot()
    frame = embeddings.merge(labels.rename("__label__").dropna(), left_on="client_id", right_index=True, how="inner")
    if len(frame) > max_points:
        frame = frame.sample(max_points, random_state=seed)
    x = frame[[c for c in frame.columns if c.startswith("emb_")]].to_numpy(np.float64)
    xy = PCA(n_components=2, random_state=seed).fit_transform(x) if len(frame) >= 2 else np.zeros((len(frame), 2))
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for value in sorted(frame["__label__"].unique()):
        m = (frame["__label__"] == value).to_numpy()
        ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.6, label=str(value))
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    ax.legend(title=labels.name, fontsize=8, markerscale=2)
    return save_figure(fig, plt, path)


# --------------------------------------------------------------------------- the report
def write_report(results: dict, out: str | Path) -> Path:
    """Write ``report.md`` and the size / fraction plots into ``out`` from a results dict."""
    out = Path(out)
    meta, settings = results.get("meta", {}), results.get("settings", {})
    targets = [t["name"] for t in settings.get("targets", [])]
    lines = ["# MeLES downstream proof", ""]
    lines += [f"Command: `{meta.get('command', '?')}`", ""]
    machine = meta.get("machine", {})
    lines += [
        f"- date: {meta.get('date', '?')}",
        f"- machine: {machine.get('platform', '?')}, {machine.get('cpu_count', '?')} CPUs, torch threads "
        f"{machine.get('torch_threads', '?')}, LightGBM jobs {machine.get('lgbm_jobs', '?')}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in machine.get('versions', {}).items())}",
        f"- data: {settings.get('data', {}).get('store', '?')} — {settings.get('data', {}).get('n_clients', '?')} clients, "
        f"{settings.get('data', {}).get('n_events', '?')} events",
        f"- protocol: test part {settings.get('test_size')}, {settings.get('folds')}-fold stratified CV, seed "
        f"{settings.get('seed')}, LightGBM {settings.get('lgbm_trees')} trees (paper parameters otherwise); cells are "
        "test mean ± 95% interval (1.96·std/√K over the K fold models)",
        f"- MeLES: {settings.get('epochs')} self-supervised epochs, config {settings.get('config', {})}; "
        f"fine-tuning / supervised: at most {settings.get('finetune_epochs')} epochs, until "
        f"{settings.get('finetune_patience')} epochs pass without a better validation-fold score",
    ]
    if settings.get("early_stopping_rounds"):
        lines.append(f"- LightGBM rows stop after {settings['early_stopping_rounds']} rounds without a better "
                     "validation-fold loss")
    kept = [f"{row}: " + ", ".join(f"{t} {c['best_epochs']}" for t, c in cells.items())
            for row, cells in results.get("table", {}).items() if any(c.get("best_epochs") for c in cells.values())]
    if kept:
        lines.append("- kept epoch (or LightGBM round) of each fold — " + "; ".join(kept))
    timings = results.get("timings", {})
    if timings:
        lines.append("- run times (this invocation): " + ", ".join(f"{k} {_seconds(v)}" for k, v in timings.items()))
    history = results.get("invocations", [])
    if len(history) > 1:
        lines.append(f"- invocations so far: {len(history)} (cached rows were reused)")
    lines.append("")

    if results.get("table"):
        lines += ["## Comparison (test mean ± 95% interval)", "", markdown_table(["model"] + targets, comparison_rows(results, targets)), ""]
        lines += ["### Detail", "", markdown_table(
            ["model", "target", "metric", "test", "cv", "train clients", "test clients", "features", "time"],
            detail_rows(results, targets)), ""]
        if (out / PROJECTION_PLOT).exists():
            lines += [f"![2-D PCA of the MeLES embeddings]({PROJECTION_PLOT})", ""]

    ablations = results.get("ablations", {})
    if ablations:
        lines += ["## Ablations (LightGBM on MeLES embeddings alone, test mean ± 95% interval)", "",
                  "Each row retrains MeLES with one setting changed, same budget; recall@(k−1) is the final "
                  "(and best) self-supervised validation recall of that run.", ""]
        for group, title in ABLATION_TITLES.items():
            if group in ablations:
                lines += [f"### {title}", "", markdown_table(
                    [group] + targets + ["val recall@(k−1) final", "best", "train time"], ablation_rows(results, group, targets)), ""]
        if size_plot := plot_quality_vs_size(results, targets, out / SIZE_PLOT):
            lines += [f"![quality vs embedding size]({size_plot.name})", ""]

    if results.get("fraction"):
        lines += ["## Quality vs share of labelled clients", "",
                  "The test part is fixed (the same as in the tables above); only the training part is "
                  "subsampled (stratified, nested: each smaller share is a subset of the larger ones), and the K "
                  "folds are drawn within the kept clients. MeLES is the main run, trained on all clients without labels.", "",
                  markdown_table(["labelled", "features"] + targets + ["train clients"], fraction_rows(results, targets)), ""]
        if fraction_plot := plot_quality_vs_fraction(results, targets, out / FRACTION_PLOT):
            lines += [f"![quality vs labelled fraction]({fraction_plot.name})", ""]

    errors = results.get("errors", {})
    if errors:
        lines += ["## Errors (these rows will be retried on the next run)", ""] + [f"- {k}: {v}" for k, v in errors.items()] + [""]
    path = out / REPORT_FILE
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines))
    return path
