"""Speed benchmark: prepare, training and embedding throughput and peak memory.

    ptls-meles bench speed [--clients 5000] [--mean-events 320] [--train-batches 40] [--threads 2]

Each phase runs in its own child process, so each peak RSS is that phase's alone.
Setup (the issue's): seeded synthetic log, ~200 MCC-like codes, ~50 types, heavy-tailed
amounts, lengths 50–1500; GRU 256, category embeddings 16, log amount, slices 5 × 25–200,
contrastive margin 0.5 with 5 hard negatives, batch 64 clients, Adam 1e-3.
Reference (pytorch-lifestream 0.7.0, same setup, measured on the 2-core dev machine):
prepare ~134 k events/s at ~1 GiB; train ~25 clients/s (~13 k events/s); embed ~48 clients/s
(~17 k events/s); ~4.8 GiB peak RSS.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import time
from pathlib import Path

REFERENCE = {"prepare_events_s": 134_000, "train_clients_s": 25, "train_events_s": 13_000, "embed_clients_s": 48, "embed_events_s": 17_000, "peak_rss_gib": 4.8}


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _phase_prepare(args, q) -> None:
    from ..prepare import prepare
    from ..schema import EventSchema

    schema = EventSchema("client_id", "trans_date", ["small_group", "trans_type"], ["amount_rur"], time_format="number")
    _, report = prepare(args["raw"], schema, out=args["store"], show_progress=False)
    q.put({"events": report.n_events, "seconds": report.seconds, "events_s": report.events_per_second, "peak_gib": _peak_gib()})


def _phase_train(args, q) -> None:
    import numpy as np
    import torch

    from ..config import MeLESConfig
    from ..data import ViewBatches
    from ..store import SequenceStore
    from ..train import MeLESModule

    torch.set_num_threads(args["threads"])
    store = SequenceStore.load(args["store"])
    cfg = MeLESConfig(hidden_size=256, cat_embedding_dim=16, batch_size=64, lr=1e-3, margin=0.5, neg_count=5)
    ds = ViewBatches(store, np.arange(store.n_clients), cfg)
    module = MeLESModule(cfg.to_dict(), store.encoding.to_dict())
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr)
    n = min(args["train_batches"], len(ds))
    clients = events = 0
    warm = 3
    for b in range(n + warm):
        if b == warm:
            t0 = time.perf_counter()
        batch, labels = ds[(0, b % len(ds))]
        loss = module.loss_fn(module.embedder(batch), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if b >= warm:
            clients += int(labels.max()) + 1
            events += int(batch.lengths.sum())
    sec = time.perf_counter() - t0
    torch.save(module.state_dict(), Path(args["store"]) / "bench_model.pt")
    q.put({"batches": n, "seconds": sec, "clients_s": clients / sec, "events_s": events / sec, "peak_gib": _peak_gib()})


def _phase_embed(args, q) -> None:
    import torch

    from ..config import MeLESConfig
    from ..embed import write_embeddings
    from ..store import SequenceStore
    from ..train import MeLESModule

    torch.set_num_threads(args["threads"])
    store = SequenceStore.load(args["store"])
    cfg = MeLESConfig(hidden_size=256, cat_embedding_dim=16)
    module = MeLESModule(cfg.to_dict(), store.encoding.to_dict())
    module.load_state_dict(torch.load(Path(args["store"]) / "bench_model.pt", weights_only=True))
    stats = write_embeddings(module.embedder, store, Path(args["store"]) / "bench_embeddings.parquet", max_events=cfg.max_events,
                             batch_size=cfg.embed_batch_size, show_progress=False)
    q.put({"clients": stats["clients"], "seconds": stats["seconds"], "clients_s": stats["clients_per_s"],
           "events_s": store.n_events / stats["seconds"], "peak_gib": _peak_gib()})


def _run(fn, args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(args, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="ptls-meles bench speed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=5000)
    ap.add_argument("--mean-events", type=float, default=320)
    ap.add_argument("--train-batches", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="runs/bench_speed", help="scratch directory")
    ap.add_argument("--out", help="write the figures as JSON")
    a = ap.parse_args(argv)
    from ..datasets.synthetic import write

    work = Path(a.work)
    raw = work / "raw"
    files = write(raw, n_clients=a.clients, seed=0, mean_events=a.mean_events, with_type=True, fmt="parquet")
    args = {"raw": str(files["transactions"]), "store": str(work / "store"), "threads": a.threads, "train_batches": a.train_batches}
    res = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, threads={a.threads}"}
    res["prepare"] = _run(_phase_prepare, args)
    res["train"] = _run(_phase_train, args)
    res["embed"] = _run(_phase_embed, args)
    p, t, e = res["prepare"], res["train"], res["embed"]
    rows = [
        ("prepare events/s", p["events_s"], REFERENCE["prepare_events_s"]),
        ("train clients/s", t["clients_s"], REFERENCE["train_clients_s"]),
        ("train events/s (in views)", t["events_s"], REFERENCE["train_events_s"]),
        ("embed clients/s", e["clients_s"], REFERENCE["embed_clients_s"]),
        ("embed events/s", e["events_s"], REFERENCE["embed_events_s"]),
        ("peak RSS GiB (max of phases)", max(p["peak_gib"], t["peak_gib"], e["peak_gib"]), REFERENCE["peak_rss_gib"]),
    ]
    print(f"speed benchmark: {a.clients} clients, {p['events']:,} events; {res['machine']}")
    print(f"| figure | ptls-meles | pytorch-lifestream 0.7.0 (reference, measured earlier) | ratio |\n|---|---|---|---|")
    for name, ours, ref in rows:
        print(f"| {name} | {ours:,.1f} | {ref:,} | {ours / ref:.1f}× |")
    print(f"peak RSS by phase (GiB): prepare {p['peak_gib']:.2f}, train {t['peak_gib']:.2f}, embed {e['peak_gib']:.2f}")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return res
