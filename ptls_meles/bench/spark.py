"""Spark benchmark: events/s of ``prepare`` and ``embed`` on Spark (local mode, 1 and 2 cores)
beside the single-machine path, on the seeded synthetic log.

    ptls-meles bench spark [--clients 5000] [--mean-events 300] [--cores 1,2] [--out result.json]
    ptls-meles bench spark -- --clients 50000 --mean-events 880      # the 44 M-event set

Setup as ``bench speed``: ~200 MCC-like codes, ~50 types, heavy-tailed amounts; GRU 256 with
category embeddings 16, randomly initialised (inference cost does not depend on training).
Spark timings exclude the session start (reported apart) and include reading, all jobs
and the final single-file combine; each Spark run is checked against the local result
(stores identical, embeddings max |Δ|).
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptls-meles bench spark", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=5000)
    p.add_argument("--mean-events", type=float, default=300, help="median events per client of the synthetic log")
    p.add_argument("--cores", default="1,2", help="comma-separated core counts, one local[N] Spark run each")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--max-events", type=int, default=1600)
    p.add_argument("--batch-size", type=int, default=256, help="clients per inference batch")
    p.add_argument("--driver-memory", default="2g", help="Spark driver memory (local mode: the whole JVM)")
    p.add_argument("--work", help="working directory (default: a temporary one, removed afterwards)")
    p.add_argument("--out", help="write the results as JSON")
    return p


def _compare_stores(a_dir: Path, b_dir: Path) -> bool:
    from ..store import SequenceStore

    a, b = SequenceStore.load(a_dir), SequenceStore.load(b_dir)
    return (np.array_equal(a.client_ids, b.client_ids) and np.array_equal(a.offsets, b.offsets)
            and all(np.array_equal(a.columns[k], b.columns[k]) for k in b.columns))


def _max_diff(a_path: Path, b_path: Path) -> float:
    import pandas as pd

    a = pd.read_parquet(a_path)
    b = pd.read_parquet(b_path).set_index("client_id").loc[a["client_id"]]
    return float(np.abs(a.iloc[:, 1:].to_numpy() - b.to_numpy()).max())


def run(args, work: Path) -> dict:
    import torch

    from ..config import MeLESConfig
    from ..datasets import synthetic
    from ..embed import window_lengths, write_embeddings
    from ..prepare import prepare
    from ..schema import EventSchema
    from ..spark import embed_spark, get_session, prepare_spark
    from ..train import MeLESModule
    from .memory import ProcessTreePeak

    raw = synthetic.write(work / "raw", n_clients=args.clients, mean_events=args.mean_events, with_type=True, fmt="parquet")["transactions"]
    schema = EventSchema("client_id", "trans_date", ["small_group", "trans_type"], ["amount_rur"], time_format="number")
    result: dict = {"clients": args.clients, "mean_events": args.mean_events, "machine": platform.processor() or platform.machine(),
                    "local": {}, "spark": {}}

    with ProcessTreePeak() as peak:
        store, report = prepare(raw, schema, out=work / "local_store", show_progress=False)
    n_events = store.n_events
    embed_events = int(window_lengths(store.lengths, args.max_events).sum())
    result.update(events=n_events, embed_events=embed_events)
    result["local"].update(prepare_events_s=n_events / report.seconds, prepare_s=report.seconds,
                           prepare_peak_gib=peak.gib)
    config = MeLESConfig(encoder="gru", hidden_size=args.hidden_size, cat_embedding_dim=16, max_events=args.max_events, embed_batch_size=args.batch_size)
    torch.manual_seed(0)
    module = MeLESModule(config, store.encoding).eval()
    cores = [int(c) for c in args.cores.split(",") if c]
    for threads in cores:
        torch.set_num_threads(threads)
        with ProcessTreePeak() as peak:
            stats = write_embeddings(module.embedder, store, work / "local_emb.parquet", **module.inference_settings, show_progress=False)
        result["local"][f"embed_events_s_{threads}thr"] = embed_events / stats["seconds"]
        result["local"][f"embed_s_{threads}thr"] = stats["seconds"]
        result["local"][f"embed_peak_gib_{threads}thr"] = peak.gib
    del store

    for n in cores:
        t0 = time.perf_counter()
        spark = get_session(f"local[{n}]", {"spark.driver.memory": args.driver_memory, "spark.sql.shuffle.partitions": str(4 * n)})
        spark.range(1).count()  # the JVM and the first job's warm-up belong to the start, not to the work
        started = time.perf_counter() - t0
        out = work / f"spark{n}"
        with ProcessTreePeak() as prepare_peak:
            rep = prepare_spark(raw, schema, out / "store", spark=spark)
        with ProcessTreePeak() as embed_peak:
            emb = embed_spark(out / "store", module, out / "emb.parquet", spark=spark)
        result["spark"][f"local[{n}]"] = {
            "session_start_s": started,
            "prepare_events_s": rep.n_rows_read / rep.seconds,
            "prepare_s": rep.seconds,
            "prepare_phases_s": rep.phases,
            "prepare_peak_gib": prepare_peak.gib,
            "embed_events_s": embed_events / emb["seconds"],
            "embed_s": emb["seconds"],
            "embed_peak_gib": embed_peak.gib,
            "store_identical": _compare_stores(out / "store", work / "local_store"),
            "embed_max_abs_diff": _max_diff(out / "emb.parquet", work / "local_emb.parquet"),
        }
        spark.stop()
    return result


def _peaks(gib: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in gib.items() if v >= 0.005)


def format_result(r: dict) -> str:
    lines = [f"synthetic log: {r['clients']:,} clients, {r['events']:,} events ({r['embed_events']:,} embedded); {r['machine']}",
             f"{'engine':<22}{'prepare events/s':>18}{'embed events/s':>18}  check"]
    local = r["local"]
    embeds = {k: v for k, v in local.items() if k.startswith("embed_events_s")}
    for i, (key, value) in enumerate(embeds.items()):
        threads = key.rsplit("_", 1)[1].replace("thr", "")
        prep = f"{local['prepare_events_s']:>18,.0f}" if i == 0 else f"{'':>18}"
        lines.append(f"{'local (' + threads + ' thread' + ('s' if threads != '1' else '') + ')':<22}{prep}{value:>18,.0f}")
    for name, s in r["spark"].items():
        check = f"store {'identical' if s['store_identical'] else 'DIFFERS'}, emb max|Δ| {s['embed_max_abs_diff']:.1e}"
        lines.append(f"{'spark ' + name:<22}{s['prepare_events_s']:>18,.0f}{s['embed_events_s']:>18,.0f}  {check}"
                     f" (session start {s['session_start_s']:.0f} s, not counted)")
    lines.append("")
    lines.append("wall seconds and peak RSS (GiB) by process kind")
    if "prepare_s" in local:
        lines.append(f"local prepare {local['prepare_s']:.1f} s [{_peaks(local['prepare_peak_gib'])}]")
        for key in (k for k in local if k.startswith("embed_s_")):
            threads = key.rsplit("_", 1)[1]
            lines.append(f"local embed ({threads.replace('thr', ' thr.')}) {local[key]:.1f} s [{_peaks(local['embed_peak_gib_' + threads])}]")
    for name, s in r["spark"].items():
        if "prepare_s" not in s:
            continue
        phases = ", ".join(f"{k} {v:.1f}" for k, v in s["prepare_phases_s"].items())
        lines.append(f"spark {name} prepare {s['prepare_s']:.1f} s ({phases}) [{_peaks(s['prepare_peak_gib'])}]")
        lines.append(f"spark {name} embed {s['embed_s']:.1f} s [{_peaks(s['embed_peak_gib'])}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        result = run(args, work)
    else:
        with tempfile.TemporaryDirectory(prefix="ptls-bench-spark-") as tmp:
            result = run(args, Path(tmp))
    print(format_result(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result
