"""pytorch-lifestream 0.7.0's CoLES pipeline on a raw log: the reference side of ``bench speed --compare-ptls``.

    PYTHON ptls_reference.py --raw FILE --work DIR [--threads 2] [--phases prepare,train,embed] [--train-clients N]

Runs under another interpreter, one where ``import ptls`` works, so it imports only the
standard library at the top and numpy, pandas, torch, pytorch_lightning and ptls inside
the phases: never ptls_meles, which that interpreter may lack. ``bench speed`` starts it
by file (not ``-m``), so not even ``ptls_meles/__init__.py`` runs there.

The setup is ptls's own tutorial (coles-emb) with the benchmark's settings: PandasDataPreprocessor
(categories small_group, trans_type; numeric amount_rur; time trans_date as is); TrxEncoder with
16-wide embeddings and log amount; RnnSeqEncoder GRU 256; ColesDataset with SampleSlices 5 × 25–200;
ContrastiveLoss(margin 0.5, HardNegativePairSelector(neg_count=5)); batch 64; Adam 1e-3; one epoch
of pl.Trainer with one DataLoader worker; InferenceModule over the whole sequences, batch 256.

Each phase runs in its own forked child, so its peak RSS is its own (the libraries, imported
once in the parent, count in each). Timed: prepare = read the
file + fit_transform (pickling the records for the next phase is not timed: ptls keeps them in
memory); train = the whole ``trainer.fit``, start-up included; embed = the whole ``trainer.predict``.
The last line on stdout is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import sys
import time
from pathlib import Path

COLUMNS = ["client_id", "trans_date", "small_group", "trans_type", "amount_rur"]
CATEGORIES = ["small_group", "trans_type"]


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _records(work: Path) -> tuple[list, dict]:
    import pickle

    with open(work / "records.pkl", "rb") as f:
        saved = pickle.load(f)
    return saved["records"], saved["sizes"]


def _seq_encoder(sizes: dict):
    from ptls.nn import RnnSeqEncoder, TrxEncoder

    trx = TrxEncoder(embeddings={c: {"in": sizes[c], "out": 16} for c in CATEGORIES},
                     numeric_values={"amount_rur": "log"})
    return RnnSeqEncoder(trx_encoder=trx, hidden_size=256, type="gru")


def _prepare(args: dict) -> dict:
    import pickle

    import pandas as pd
    from ptls.preprocessing import PandasDataPreprocessor

    t0 = time.perf_counter()
    raw = args["raw"]
    df = pd.read_parquet(raw, columns=COLUMNS) if raw.endswith(".parquet") else pd.read_csv(raw, usecols=COLUMNS)
    pre = PandasDataPreprocessor(col_id="client_id", col_event_time="trans_date", event_time_transformation="none",
                                 cols_category=CATEGORIES, cols_numerical=["amount_rur"], return_records=True)
    records = pre.fit_transform(df)
    sec = time.perf_counter() - t0
    records = sorted(records, key=lambda r: r["client_id"])
    with open(Path(args["work"]) / "records.pkl", "wb") as f:
        pickle.dump({"records": records, "sizes": pre.get_category_dictionary_sizes()}, f, protocol=pickle.HIGHEST_PROTOCOL)
    return {"events": len(df), "seconds": sec, "events_s": len(df) / sec, "peak_gib": _peak_gib()}


def _train(args: dict) -> dict:
    from functools import partial

    import pytorch_lightning as pl
    import torch
    from ptls.frames import PtlsDataModule
    from ptls.frames.coles import ColesDataset, CoLESModule
    from ptls.frames.coles.losses import ContrastiveLoss
    from ptls.frames.coles.sampling_strategies import HardNegativePairSelector
    from ptls.frames.coles.split_strategy import SampleSlices

    torch.set_num_threads(args["threads"])
    records, sizes = _records(Path(args["work"]))
    if args["train_clients"]:
        records = records[: args["train_clients"]]
    seq_encoder = _seq_encoder(sizes)
    module = CoLESModule(seq_encoder=seq_encoder,
                         loss=ContrastiveLoss(margin=0.5, sampling_strategy=HardNegativePairSelector(neg_count=5)),
                         optimizer_partial=partial(torch.optim.Adam, lr=1e-3),
                         lr_scheduler_partial=partial(torch.optim.lr_scheduler.StepLR, step_size=30, gamma=0.9))
    data = PtlsDataModule(train_data=ColesDataset(records, splitter=SampleSlices(split_count=5, cnt_min=25, cnt_max=200)),
                          train_batch_size=64, train_num_workers=1)

    class CountEvents(pl.Callback):
        """Events the encoder saw: the real (unpadded) events of every view."""
        events = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            CountEvents.events += int(batch[0].seq_lens.sum())

    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, enable_progress_bar=False, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, callbacks=[CountEvents()])
    t0 = time.perf_counter()
    trainer.fit(module, data)
    sec = time.perf_counter() - t0
    torch.save(seq_encoder.state_dict(), Path(args["work"]) / "seq_encoder.pt")
    return {"clients": len(records), "seconds": sec, "clients_s": len(records) / sec,
            "events_s": CountEvents.events / sec, "peak_gib": _peak_gib()}


def _embed(args: dict) -> dict:
    import pytorch_lightning as pl
    import torch
    from ptls.data_load.datasets import inference_data_loader
    from ptls.frames.inference_module import InferenceModule

    torch.set_num_threads(args["threads"])
    records, sizes = _records(Path(args["work"]))
    seq_encoder = _seq_encoder(sizes)
    seq_encoder.load_state_dict(torch.load(Path(args["work"]) / "seq_encoder.pt"))
    events = sum(len(r["event_time"]) for r in records)
    t0 = time.perf_counter()
    trainer = pl.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False, logger=False, enable_model_summary=False)
    # pandas_output=True fails in 0.7.0 when the records have no scalar column left (the loader drops client_id)
    parts = trainer.predict(InferenceModule(model=seq_encoder, pandas_output=False, model_out_name="emb"),
                            inference_data_loader(records, num_workers=0, batch_size=256))
    embeddings = torch.vstack([p["emb"] for p in parts])
    sec = time.perf_counter() - t0
    assert len(embeddings) == len(records), (len(embeddings), len(records))
    return {"clients": len(records), "seconds": sec, "clients_s": len(records) / sec, "events_s": events / sec,
            "peak_gib": _peak_gib()}


PHASES = {"prepare": _prepare, "train": _train, "embed": _embed}


def _child(name: str, args: dict) -> None:
    out = PHASES[name](args)
    (Path(args["work"]) / f"{name}.json").write_text(json.dumps(out))


def _run(name: str, args: dict) -> dict:
    """One phase in a forked child (the parent holds only the standard library), its figures read back."""
    done = Path(args["work"]) / f"{name}.json"
    done.unlink(missing_ok=True)
    p = mp.get_context("fork").Process(target=_child, args=(name, args))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise SystemExit(f"pytorch-lifestream {name} phase failed (exit code {p.exitcode}); its traceback is above")
    return json.loads(done.read_text())


def _preload() -> None:
    """Import the libraries once, before the phases fork: each phase would spend ~10 s on them otherwise.

    The forked children share these pages, and each counts them in its peak RSS, as a run that
    imported them itself would.
    """
    import pytorch_lightning  # noqa: F401
    import torch  # noqa: F401
    from ptls.frames import coles, inference_module  # noqa: F401
    from ptls import preprocessing  # noqa: F401


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("pytorch-lifestream", "torch", "pytorch-lightning"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "?"
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", required=True, help="the raw log (.parquet or .csv) with columns " + ", ".join(COLUMNS))
    ap.add_argument("--work", required=True, help="scratch directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--phases", default="prepare,train,embed", help="comma-separated subset of prepare,train,embed")
    ap.add_argument("--train-clients", type=int, default=0, help="train one epoch on this many clients (0: all)")
    a = ap.parse_args(argv)
    Path(a.work).mkdir(parents=True, exist_ok=True)
    args = {"raw": a.raw, "work": a.work, "threads": a.threads, "train_clients": a.train_clients}
    phases = {p.strip() for p in a.phases.split(",") if p.strip()}
    _preload()
    res = {"versions": _versions(), "threads": a.threads}
    res["prepare"] = _run("prepare", args)  # always: later phases read its records
    if phases & {"train", "embed"}:
        res["train"] = _run("train", args)
    if "embed" in phases:
        res["embed"] = _run("embed", args)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
