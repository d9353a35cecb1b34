"""The quickstart notebook runs top to bottom (tiny sizes) and its key cells show the right things.

The kernel is a throw-away kernelspec whose argv is this interpreter (``sys.executable``), so the
notebook runs in the same environment as the tests in any clone, whatever kernels the machine has.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
KERNEL_NAME = "ptls-meles-test"
TINY = {
    "QUICKSTART_CLIENTS": "120",
    "QUICKSTART_EVENTS": "60",
    "QUICKSTART_EPOCHS": "1",
    "QUICKSTART_HIDDEN": "16",
    "QUICKSTART_TREES": "20",
    "QUICKSTART_FOLDS": "2",
    "QUICKSTART_FINETUNE_EPOCHS": "1",
    "QUICKSTART_JOBS": "1",
    "QUICKSTART_OUT": "out",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MPLBACKEND": "module://matplotlib_inline.backend_inline",
}
FEATURE_SETS = ["hand-crafted", "MeLES embeddings", "hand-crafted + MeLES"]  # LightGBM rows
NEURAL = ["supervised encoder", "MeLES fine-tuned"]
ROWS = FEATURE_SETS + NEURAL


def _kernel_manager(tmp: Path) -> KernelManager:
    """A kernel running this interpreter, with tiny sizes and the repo importable."""
    spec_dir = tmp / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    env = {**TINY, "PYTHONPATH": str(REPO)}
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ptls-meles test",
        "language": "python",
        "env": env,
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(tmp / "kernels")])
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """(executed notebook, working directory): runs once for all assertions below."""
    tmp = tmp_path_factory.mktemp("quickstart")
    work = tmp / "work"
    work.mkdir()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, km=_kernel_manager(tmp), timeout=120, resources={"metadata": {"path": str(work)}}
    )
    client.execute()
    return nb, work


def _cell(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def _text(cell) -> str:
    """All text a cell showed: stream output and the text/plain of results."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def _has_image(cell) -> bool:
    return any("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


def test_committed_outputs_are_clean_or_one_full_run():
    """Either no outputs at all, or every code cell ran once, in order, without error, with the defaults."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    if all(not c.outputs and c.execution_count is None for c in code):
        return
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert not [o for c in code for o in c.outputs if o["output_type"] == "error"]
    knobs = _text(_cell(nb, "knobs"))
    assert "N_CLIENTS=1500 MEAN_EVENTS=150 EPOCHS=8 HIDDEN=128 LGBM_TREES=60 N_FOLDS=5 FINETUNE_EPOCHS=3" in knobs, knobs
    assert "True, max |diff| = 0.0" in _text(_cell(nb, "save-load"))
    assert NOTEBOOK.stat().st_size < 500_000  # outputs stay small enough to review


def test_no_cell_failed(executed):
    nb, _ = executed
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.execution_count is not None
            errors = [o for o in cell.outputs if o["output_type"] == "error"]
            assert not errors, f"cell failed: {cell.source[:80]!r}: {errors[0].get('evalue')}"


def test_knobs_come_from_environment(executed):
    nb, _ = executed
    text = _text(_cell(nb, "knobs"))
    assert "N_CLIENTS=120 MEAN_EVENTS=60 EPOCHS=1 HIDDEN=16 LGBM_TREES=20 N_FOLDS=2 FINETUNE_EPOCHS=1 LGBM_JOBS=1" in text


def test_data_and_store_cells(executed):
    nb, _ = executed
    assert "client_id" in _text(_cell(nb, "events-head")) and "amount_rur" in _text(_cell(nb, "events-head"))
    assert "of 120 clients" in _text(_cell(nb, "events-sizes"))
    assert _text(_cell(nb, "prepare")).startswith("prepared 120 clients")
    store_text = _text(_cell(nb, "store"))
    assert "store: 120 clients" in store_text and "small_group vocabulary:" in store_text


def test_training_curve_and_embeddings(executed):
    nb, work = executed
    metrics = pd.read_csv(work / "out" / "run" / "logs" / "metrics.csv")
    recall = metrics["val_recall"].dropna()
    assert len(recall) == 1 and 0.0 <= recall.iloc[0] <= 1.0
    assert _has_image(_cell(nb, "recall-plot"))
    # client_id + 16 dimensions × (last, mean, max) + 8 × (mean, last) for 32 categories and the others
    # + 8 × share for each of the 200 small groups and the others
    assert "(120, 2185)" in _text(_cell(nb, "embeddings"))
    assert _has_image(_cell(nb, "pca-plot"))


def test_results_table_has_every_row(executed):
    """One table: the three LightGBM feature sets and the two neural baselines, on both targets."""
    nb, work = executed
    shown = _text(_cell(nb, "results"))
    for name in ROWS:
        assert name in shown
    results = pd.read_csv(work / "out" / "results.csv", keep_default_na=False)
    assert sorted(map(tuple, results[["model", "target"]].to_numpy())) == sorted((m, t) for m in ROWS for t in ("bins", "gender"))
    assert set(results.loc[results["target"] == "bins", "metric"]) == {"accuracy"}
    assert set(results.loc[results["target"] == "gender", "metric"]) == {"auroc"}
    assert all(0.0 <= s <= 1.0 and not math.isnan(s) for s in results["test"])


def test_neural_baselines_respect_the_epoch_cap(executed):
    """Each neural fold reports its kept epoch, within the QUICKSTART_FINETUNE_EPOCHS cap."""
    nb, work = executed
    results = pd.read_csv(work / "out" / "results.csv", keep_default_na=False).set_index("model")
    cap = int(TINY["QUICKSTART_FINETUNE_EPOCHS"])
    for name in NEURAL:
        for epochs in results.loc[name, "best_epochs"]:
            kept = [int(e) for e in str(epochs).split()]
            assert len(kept) == int(TINY["QUICKSTART_FOLDS"]) and all(1 <= e <= cap for e in kept)
    assert set(results.loc[FEATURE_SETS, "best_epochs"]) == {""}
    printed = _text(_cell(nb, "neural"))
    assert printed.count(f"(cap {cap})") == 2 * len(NEURAL)


def test_each_row_is_compared_with_handcrafted(executed):
    nb, _ = executed
    lines = _text(_cell(nb, "versus-handcrafted")).splitlines()
    compared = [line for line in lines if line.startswith("  ")]
    assert len(compared) == 2 * (len(ROWS) - 1)
    assert all(line.rstrip().endswith(("(clear)", "(within the intervals)")) for line in compared)


def test_saved_model_gives_same_embeddings(executed):
    nb, work = executed
    assert "same embeddings after save/load: True, max |diff| = 0.0" in _text(_cell(nb, "save-load"))
    assert {"model.pt", "config.json", "encoding.json"} <= {p.name for p in (work / "out" / "model").iterdir()}
