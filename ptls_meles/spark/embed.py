"""``embed`` on Spark: the store's clients are split over tasks, each runs the local inference.

The model travels once per executor as a broadcast (a checkpoint's bytes: config, encoding
and weights, rebuilt there by :func:`ptls_meles.train.load_model`);
each task turns its Arrow record batches of store rows straight into a
:class:`SequenceStore` (no per-client Python objects) and runs
:func:`ptls_meles.embed.embed_array` on it with one torch thread, so the numbers are
the single-machine numbers (up to the float noise of other batch compositions). The
result is the same table as :func:`ptls_meles.embed.write_embeddings` (``client_id``,
``emb_000..``, config and encoding in the schema metadata), in client order.
"""
from __future__ import annotations

import io
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..embed import embed_array, embedding_columns, embedding_schema
from ..encoding import Encoding
from ..store import ENCODING_FILE, STORE_FILE, SequenceStore
from .prepare import combine_parts, spark_path
from .session import get_session

_EMBEDDERS: dict[str, object] = {}  # per Python worker: token → embedder, so each worker loads the model once


def _resolve_model(model):
    """The MeLESModule of a MeLES, a MeLESModule or a saved model/run directory."""
    from ..api import MeLES
    from ..train import MeLESModule, load_model

    if isinstance(model, (str, Path)):
        model = load_model(model)
    if isinstance(model, MeLES):
        model._check_fitted()
        model = model.module_
    if isinstance(model, MeLESModule):
        return model
    raise TypeError(f"model must be a MeLES, a MeLESModule or a model directory, got {type(model).__name__}")


def _embedder(payload: dict):
    token = payload["token"]
    if token not in _EMBEDDERS:
        from ..train import load_model

        module = load_model(io.BytesIO(payload["model"]))
        _EMBEDDERS.clear()  # one model per worker at a time
        _EMBEDDERS[token] = module.embedder
    return _EMBEDDERS[token]


def _embed_batches(batches, payload: dict, store_encoding: dict, settings: dict):
    """mapInArrow body: record batches of store rows → record batches of embeddings."""
    import torch

    torch.set_num_threads(1)  # one task per core; more threads only fight each other
    embedder = _embedder(payload)
    encoding = Encoding.from_dict(store_encoding)
    names = ["client_id", *embedding_columns(embedder.output_size)]
    for batch in batches:
        if batch.num_rows == 0:
            continue
        table = pa.Table.from_batches([batch])
        store = SequenceStore.from_arrow(table, encoding)
        emb = embed_array(embedder, store, **settings, show_progress=False)
        emb = np.ascontiguousarray(emb.T)  # [D, n], store order
        arrays = [table.column("client_id").combine_chunks()] + [pa.array(emb[j]) for j in range(emb.shape[0])]
        yield pa.RecordBatch.from_arrays(arrays, names=names)


def embed_spark(
    store: str | Path,
    model,
    out: str | Path,
    spark=None,
    max_events: int | None = None,
    batch_size: int | None = None,
    partitions: int | None = None,
    row_group_rows: int = 65_536,
) -> dict:
    """Embed every client of a store on Spark into the Parquet table ``out``.

    ``model``: a fitted MeLES, a MeLESModule, or a model/run directory. Each client is
    embedded from its last ``max_events`` events, as ``MeLES.transform`` does; ``None`` (the
    default) is the model config's window, a number overrides it (there is no "whole
    sequence" value: pass a number above the longest client). ``batch_size`` defaults to
    the config's too.
    ``partitions``: client-id ranges to split the work into (default: twice the default
    parallelism).
    Returns ``{"clients", "dim", "seconds", "clients_per_s"}`` like the local writer.
    """
    import torch
    from pyspark.sql import types as T

    t0 = time.perf_counter()
    spark = spark or get_session()
    module = _resolve_model(model)
    config, encoding = module.config.to_dict(), module.encoding.to_dict()
    settings = module.inference_settings
    settings["max_events"] = settings["max_events"] if max_events is None else max_events
    settings["batch_size"] = batch_size or settings["batch_size"]
    buf = io.BytesIO()
    torch.save({"hyper_parameters": {"config": config, "encoding": encoding}, "state_dict": module.state_dict()}, buf)
    payload = spark.sparkContext.broadcast({"model": buf.getvalue(), "token": uuid.uuid4().hex})
    store_dir = Path(store) if Path(store).is_dir() else Path(store).parent
    store_file = store_dir / STORE_FILE
    if not store_file.exists():
        raise FileNotFoundError(f"no sequence store at {store_file}: run `ptls-meles prepare` first")
    store_encoding = Encoding.load(store_dir / ENCODING_FILE).to_dict()
    dim = int(module.embedder.output_size)

    # client-id ranges, one per task, each sorted: the tasks' outputs are then already in
    # store order, so no sort after the (expensive) embedding step, which runs exactly once
    target_parts = partitions or 2 * spark.sparkContext.defaultParallelism
    df = spark.read.parquet(spark_path(store_file))
    df = df.repartitionByRange(target_parts, "client_id").sortWithinPartitions("client_id")
    id_field = df.schema["client_id"]
    out_schema = T.StructType([id_field] + [T.StructField(c, T.FloatType(), False) for c in embedding_columns(dim)])

    def run(batches):
        return _embed_batches(batches, payload.value, store_encoding, settings)

    out = Path(out)
    tmp = out.parent / f".{out.name}.spark-{uuid.uuid4().hex[:8]}"
    try:
        df.mapInArrow(run, out_schema).write.parquet(str(tmp.resolve()))
        target = embedding_schema(pq.read_schema(store_file).field("client_id").type, dim, {"config": config, "encoding": encoding})
        rows = combine_parts(tmp, out, target, row_group_rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        payload.unpersist()
    seconds = time.perf_counter() - t0
    return {"clients": rows, "dim": dim, "seconds": seconds, "clients_per_s": rows / seconds if seconds else float("nan")}


def embed_input(model, source, out: str | Path, spark=None, schema=None) -> dict:
    """The CLI's ``embed --engine spark``: a store directory is embedded as is; raw events
    are first prepared on Spark with the model's encoding (into a temporary store beside
    ``out``, removed afterwards)."""
    from ..api import MeLES

    if isinstance(model, (str, Path)):
        model = MeLES.load(model)
    if isinstance(source, (str, Path)) and (Path(source) / STORE_FILE).exists():
        return embed_spark(source, model, out, spark=spark)
    from .prepare import prepare_spark

    schema = schema or getattr(model, "schema_", None) or model.schema
    if schema is None:
        raise ValueError("raw events need a schema: pass --schema FILE (or embed a prepared store)")
    out = Path(out)
    tmp = out.parent / f".{out.name}.store-{uuid.uuid4().hex[:8]}"
    try:
        prepare_spark(source, schema, tmp, encoding=model.encoding_, spark=spark)
        return embed_spark(tmp, model, out, spark=spark)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
