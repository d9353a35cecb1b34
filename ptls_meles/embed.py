"""Inference: each client's full sequence (its last ``max_events`` events) → one embedding.

Clients are processed in length order so a batch wastes little padding, and the table
is written to Parquet batch by batch, so memory stays bounded for millions of clients.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from .allocator import reuse_freed_memory
from .batch import pad_segments
from .io_utils import atomic_path
from .store import SequenceStore, offsets_from_lengths, ragged_arange


def embedding_columns(dim: int) -> list[str]:
    return [f"emb_{i:03d}" for i in range(dim)]


def embedding_schema(id_type: pa.DataType, dim: int, metadata: dict) -> pa.Schema:
    """The embedding table's schema: ``client_id``, ``emb_000..`` float32, ``metadata`` (config,
    encoding) as JSON under the ``ptls_meles`` key; written alike by local and Spark embed."""
    fields = [pa.field("client_id", id_type)] + [pa.field(c, pa.float32()) for c in embedding_columns(dim)]
    return pa.schema(fields, metadata={b"ptls_meles": json.dumps(metadata).encode()})


class NonFiniteEmbeddingError(ValueError):
    """The model produced NaN or infinite embeddings: nothing is written."""


def unseen_shares(store: SequenceStore) -> dict[str, float]:
    """Per categorical field, the share of events the model sees as the unseen id (values it
    did not learn: new, rare or null), so a shift in the data is visible at embed time."""
    from .encoding import UNSEEN_ID

    n = max(store.n_events, 1)
    return {c: float(np.count_nonzero(store.columns[c] == UNSEEN_ID)) / n for c in store.categorical if c in store.columns}


def window_lengths(lengths: np.ndarray, max_events: int | None) -> np.ndarray:
    """How many events of each client inference reads: its last ``max_events`` (``None``:
    all). The one definition of the inference window; the events are the client's last ones."""
    return lengths if max_events is None else np.minimum(lengths, max_events)


# work allowed per batch: events for recurrent encoders, attention cells for Transformers
# (their memory grows with the square of the length); long clients then come in smaller batches
MAX_BATCH_EVENTS = 1 << 19
MAX_BATCH_ATTENTION = 1 << 25


def _cost_fn(embedder: torch.nn.Module):
    from .nn.seq_encoder import TransformerSeqEncoder

    if any(isinstance(m, TransformerSeqEncoder) for m in embedder.modules()):  # one model, or several side by side
        return lambda n, t: n * t * t <= MAX_BATCH_ATTENTION
    return lambda n, t: n * t <= MAX_BATCH_EVENTS


def _length_sorted_batches(order: np.ndarray, take: np.ndarray, batch_size: int, fits) -> Iterator[np.ndarray]:
    """Consecutive runs of the length-sorted clients: at most ``batch_size`` clients, and at
    most what ``fits(n_clients, longest)`` allows (at least one client)."""
    s = 0
    while s < len(order):
        n = min(batch_size, len(order) - s)
        while n > 1 and not fits(n, int(take[order[s + n - 1]])):
            n //= 2
        yield order[s : s + n]
        s += n


def chunk_segments(starts: np.ndarray, lengths: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut each segment ``[start, start + length)`` into ``ceil(length / chunk)`` contiguous,
    evenly sized chunks: ``(chunk starts, chunk lengths, segment position of each chunk)``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    k = np.maximum(1, -(-lengths // chunk))
    owner = np.repeat(np.arange(len(lengths)), k)
    j = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)
    first = (j * lengths[owner]) // k[owner]
    last = ((j + 1) * lengths[owner]) // k[owner]
    return np.asarray(starts, dtype=np.int64)[owner] + first, last - first, owner


def iter_embeddings(
    embedder: torch.nn.Module,
    store: SequenceStore,
    max_events: int | None = None,
    batch_size: int = 256,
    show_progress: bool = True,
    chunk: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(client positions, embeddings [n, D])`` batch by batch, in length order, from
    each client's last ``max_events`` events (:func:`window_lengths`).

    Embeddings are the embedder's raw (not L2-normalised) outputs: downstream models get the
    full information, and cosine retrieval can still normalise them. With ``chunk``, a
    client's window is cut into contiguous chunks of at most ``chunk`` events and its
    embedding is the mean of theirs: the encoder then reads sequences as long as the views
    it was trained on, not several times longer.
    """
    reuse_freed_memory()
    take = window_lengths(store.lengths, max_events)
    order = np.argsort(take, kind="stable")
    was_training = embedder.training
    embedder.eval()
    bar = tqdm(total=store.n_clients, unit="clients", desc="embed", disable=not show_progress)
    try:
        with torch.inference_mode():
            for clients in _length_sorted_batches(order, take, batch_size, _cost_fn(embedder)):
                n = take[clients]
                starts = store.offsets[clients + 1] - n
                owner = None
                if chunk:
                    starts, n, owner = chunk_segments(starts, n, chunk)
                batch = pad_segments(store.columns, ragged_arange(starts, n), offsets_from_lengths(n))
                device = next(embedder.parameters()).device
                out = embedder(batch.to(device)).float().cpu().numpy()
                if owner is not None:  # the mean of each client's chunks (a client's chunks are adjacent)
                    counts = np.bincount(owner, minlength=len(clients))
                    out = (np.add.reduceat(out.astype(np.float64), np.cumsum(counts) - counts) / counts[:, None]).astype(np.float32)
                bad = ~np.isfinite(out).all(axis=1)
                if bad.any():
                    example = store.client_ids[clients[np.flatnonzero(bad)[0]]]
                    raise NonFiniteEmbeddingError(
                        f"the model gave NaN or infinite embeddings for {int(bad.sum())} of {len(clients)} clients in a batch "
                        f"(e.g. client {example!r}); its weights or these clients' inputs hold non-finite or huge values. "
                        "Nothing was written: retrain the model (fit stops on a non-finite loss) or check the input numbers"
                    )
                bar.update(len(clients))
                yield clients, out
    finally:
        bar.close()
        embedder.train(was_training)


def embed_array(embedder: torch.nn.Module, store: SequenceStore, **kwargs) -> np.ndarray:
    """All embeddings ``[n_clients, D]`` (float32) in store order."""
    out = np.zeros((store.n_clients, embedder.output_size), np.float32)
    for clients, emb in iter_embeddings(embedder, store, **kwargs):
        out[clients] = emb
    return out


def embed_frame(embedder: torch.nn.Module, store: SequenceStore, **kwargs) -> pd.DataFrame:
    """All embeddings as a DataFrame ``client_id, emb_000, ...`` in store order."""
    emb = embed_array(embedder, store, **kwargs)
    df = pd.DataFrame(emb, columns=embedding_columns(emb.shape[1]))
    df.insert(0, "client_id", store.client_ids)
    return df


def write_embeddings(
    embedder: torch.nn.Module,
    store: SequenceStore,
    path: str | Path,
    metadata: dict | None = None,
    row_group_rows: int = 65_536,
    **kwargs,
) -> dict:
    """Stream embeddings into a Parquet table at ``path`` (written under a temporary name,
    renamed when complete). ``metadata`` (config, encoding) is stored in the file's schema.

    Batches are buffered up to ``row_group_rows`` rows per Parquet row group: memory stays
    bounded by one row group, and readers do not pay for thousands of tiny row groups.
    """
    path = Path(path)
    t0 = time.perf_counter()
    dim = embedder.output_size
    schema = embedding_schema(pa.array(store.client_ids[:1]).type, dim, metadata or {})
    rows = 0
    buffered: list[tuple[np.ndarray, np.ndarray]] = []
    n_buffered = 0

    def flush(writer: pq.ParquetWriter) -> None:
        nonlocal n_buffered
        clients = np.concatenate([c for c, _ in buffered])
        emb = np.concatenate([e for _, e in buffered]).astype(np.float32, copy=False).T.copy()  # [D, n]: contiguous columns
        arrays = [pa.array(store.client_ids[clients])] + [pa.array(emb[j]) for j in range(dim)]
        writer.write_table(pa.Table.from_arrays(arrays, schema=schema), row_group_size=len(clients))
        buffered.clear()
        n_buffered = 0

    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            for clients, emb in iter_embeddings(embedder, store, **kwargs):
                buffered.append((clients, emb))
                n_buffered += len(clients)
                rows += len(clients)
                if n_buffered >= row_group_rows:
                    flush(writer)
            if buffered:
                flush(writer)
    seconds = time.perf_counter() - t0
    return {"clients": rows, "dim": dim, "seconds": seconds, "clients_per_s": rows / seconds if seconds else float("nan"),
            "unseen_shares": unseen_shares(store)}
