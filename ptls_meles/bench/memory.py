"""Memory benchmark: embed many clients through ``write_embeddings`` and report peak RSS.

    ptls-meles bench memory [--clients 1000000] [--min-events 20] [--max-events 50] [--hidden 32]

The store is built directly with NumPy (no generator, no prepare), so the figure shows
what embedding itself costs on top of the store: ``write_embeddings`` streams batches to
Parquet row groups, so its overhead must not grow with the number of clients.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np


def _rss_mib() -> float:
    """Current resident set size (Linux /proc; 0 where unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _process_table() -> dict[int, tuple[int, str, int]]:
    """pid -> (parent pid, command name, RSS bytes) for every readable process (Linux /proc)."""
    import os

    page = os.sysconf("SC_PAGE_SIZE")
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            rss_pages = int((entry / "statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        table[int(entry.name)] = (ppid, name, rss_pages * page)
    return table


class ProcessTreePeak:
    """Peak RSS of this process and each kind of its descendants, sampled in a thread.

    Spark in local mode runs the driver and executors in one JVM, and the Python functions
    in forked Python workers; ``ru_maxrss`` sees none of them, so the tree is sampled:
    ``with ProcessTreePeak() as peak: ...`` then ``peak.gib`` maps
    ``this process`` / ``java`` / ``python workers`` / ``other`` to GiB (each kind's
    simultaneous sum at its highest sample).
    """

    def __init__(self, interval_s: float = 0.25):
        self.interval_s = interval_s
        self.peak: dict[str, int] = {}

    @staticmethod
    def _kind(pid: int, name: str) -> str:
        import os

        if pid == os.getpid():
            return "this process"
        if name.startswith("java"):
            return "java"
        return "python workers" if name.startswith("python") else "other"

    def sample(self) -> None:
        import os

        table = _process_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        totals: dict[str, int] = {}
        stack = [os.getpid()]
        while stack:
            pid = stack.pop()
            if pid in table:
                kind = self._kind(pid, table[pid][1])
                totals[kind] = totals.get(kind, 0) + table[pid][2]
            stack.extend(children.get(pid, ()))
        for kind, rss in totals.items():
            self.peak[kind] = max(self.peak.get(kind, 0), rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "ProcessTreePeak":
        import threading

        self._stop = threading.Event()
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def gib(self) -> dict[str, float]:
        return {k: v / 2**30 for k, v in sorted(self.peak.items())}


def synthetic_store(n_clients: int, min_events: int = 20, max_events: int = 50, n_codes: int = 100, seed: int = 0):
    """A store of ``n_clients`` clients with uniform lengths in [min_events, max_events]:
    one categorical field ``mcc``, one numeric ``amount``, increasing event times."""
    from ..encoding import CategoryVocab, Encoding, NumericTransform
    from ..store import SequenceStore, offsets_from_lengths

    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_events, max_events + 1, n_clients)
    offsets = offsets_from_lengths(lengths)
    n = int(offsets[-1])
    columns = {
        "event_time": np.arange(n, dtype=np.float64),  # increasing, hence sorted within every client
        "mcc": rng.integers(2, n_codes + 2, n, dtype=np.int32),
        "amount": rng.standard_normal(n, dtype=np.float32),
    }
    vocab = CategoryVocab(values=[str(i) for i in range(n_codes)])
    encoding = Encoding("client_id", "event_time", "number", {"mcc": vocab}, {"amount": NumericTransform("identity")})
    return SequenceStore(np.arange(n_clients, dtype=np.int64), offsets, columns, encoding)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="ptls-meles bench memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=1_000_000)
    ap.add_argument("--min-events", type=int, default=20)
    ap.add_argument("--max-events", type=int, default=50)
    ap.add_argument("--hidden", type=int, default=32, help="GRU hidden size")
    ap.add_argument("--batch-size", type=int, default=1024, help="clients per inference batch")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", help="embedding table path (default: a temporary file, removed afterwards)")
    a = ap.parse_args(argv)

    import torch

    from ..config import MeLESConfig
    from ..embed import write_embeddings
    from ..train import embedder_from_config

    if a.threads:
        torch.set_num_threads(a.threads)
    rss_start = _rss_mib()
    t0 = time.perf_counter()
    store = synthetic_store(a.clients, a.min_events, a.max_events)
    build_s = time.perf_counter() - t0
    torch.manual_seed(0)
    embedder = embedder_from_config(MeLESConfig(encoder="gru", hidden_size=a.hidden, cat_embedding_dim=8), store.encoding)
    rss_store = _rss_mib()
    peak_before = _peak_rss_mib()

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(a.out) if a.out else Path(scratch) / "embeddings.parquet"
        stats = write_embeddings(embedder, store, path, max_events=None, batch_size=a.batch_size, show_progress=False)
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        row_groups, rows = meta.num_row_groups, meta.num_rows
    peak = _peak_rss_mib()
    res = {
        "clients": store.n_clients,
        "events": store.n_events,
        "store_build_s": build_s,
        "store_mib": rss_store - rss_start,
        "rss_before_embed_mib": rss_store,
        "peak_rss_before_embed_mib": peak_before,
        "peak_rss_mib": peak,
        "embed_overhead_mib": peak - max(rss_store, 0.0),
        "embed_s": stats["seconds"],
        "clients_per_s": stats["clients_per_s"],
        "rows_written": rows,
        "row_groups": row_groups,
        "threads": torch.get_num_threads(),
    }
    print(
        f"memory benchmark: {res['clients']:,} clients, {res['events']:,} events (GRU {a.hidden}, batch {a.batch_size}, "
        f"{res['threads']} threads)\n"
        f"  store built in {build_s:.1f} s, RSS with store {rss_store:,.0f} MiB\n"
        f"  embedded in {res['embed_s']:.1f} s ({res['clients_per_s']:,.0f} clients/s); "
        f"{rows:,} rows in {row_groups} row groups\n"
        f"  peak RSS {peak:,.0f} MiB (embedding overhead over the store {res['embed_overhead_mib']:,.0f} MiB)"
    )
    return res


if __name__ == "__main__":
    main()
