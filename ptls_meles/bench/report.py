"""Markdown tables and PNG figures shared by the benchmarks' reports."""
from __future__ import annotations

from pathlib import Path

from ..io_utils import atomic_path


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured Markdown table (no dependency on ``tabulate``)."""
    def text(v) -> str:
        return "" if v is None else str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(text(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(text(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


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
