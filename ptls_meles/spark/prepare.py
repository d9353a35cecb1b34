"""``prepare`` on Spark: raw events → the same sequence store as :func:`ptls_meles.prepare.prepare`.

Same schema, same error texts, same encoding JSON, same store bytes-for-values: the
single-machine path is the specification and this module reproduces it with Spark jobs
that scale past one machine's memory:

1. read (Parquet or CSV files, a pandas/Arrow table, or a Spark DataFrame); every row
   keeps its input order as ``(file rank, block, position)`` so ties in time resolve
   exactly as the local stable sort does;
2. parse client, time and numbers (native Spark expressions for typed columns; for
   text columns a pandas UDF around the very functions of :mod:`ptls_meles.schema`, so
   ``"d hh:mm:ss"``, timestamp strings and odd numbers parse identically);
3. one job counts rows, bad rows per reason, null categories and the numeric moments;
   one job counts category values → :meth:`CategoryVocab.fit` on the driver (same
   frequency order and tie-breaking);
4. events are range-partitioned by client id (the one shuffle), grouped per client with
   ``collect_list(struct(time, order…, fields…))`` + ``array_sort``, and each partition,
   sorted by id, is written by Spark as one part file;
5. the part files are combined into ``sequences.parquet`` by streaming row groups in
   order (memory-bounded: about two row groups), next to ``encoding.json``.

Known differences: moments of ``standardize`` columns agree to float64 rounding (the
sums are added in another order); error counts are per 1,000,000-row chunk for Parquet
and pandas input like the local path, but per file for CSV (the local path counts per
64 MB block). The local path's counts of duplicate rows, of naive timestamps beside
zoned ones and of categories unknown to an applied encoding are not reported here (the
events are the same; only the counts in the summary are missing). CSV files of one input
must share one delimiter (the local path sniffs each file's own).
"""
from __future__ import annotations

import logging
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..encoding import UNSEEN_ID, N_RESERVED, CategoryVocab, Encoding, NumericTransform, as_category_strings
from ..io_utils import atomic_path
from ..prepare import PrepareReport, remove_stale_outputs
from ..prepare_rules import (
    NULL_CLIENT_PROBLEM, all_dropped_error, bad_rows_error, check_arguments, drop_reasons, no_rows_error, numeric_transforms,
)
from ..schema import (
    BAD_NUMBER, EXACT_FLOAT_INT, FLOAT32_MAX, INT64_MAX, NOT_A_NUMBER, EventSchema, SchemaError, check_column_types,
    detect_time_format, parse_number, parse_time,
)
from ..sources import (
    PARQUET_SUFFIXES, _check_columns, _from_pandas, csv_header, iter_chunks, list_files, open_parquet, pandas_client_ids,
)
from ..store import ENCODING_FILE, STORE_FILE, TIME_COLUMN, file_metadata
from .session import get_session

log = logging.getLogger(__name__)
CSV_NULL_MARK = "\u0000ptls-meles-no-null\u0000"  # no text stands for null: CSV fields are text, as in pyarrow's string columns
BROADCAST_LIMIT = 1_000_000  # vocabularies up to this size are broadcast to every task


# ----------------------------------------------------------------- reading
@dataclass
class _Input:
    df: object  # Spark DataFrame: raw columns + __file, __blk, __pos
    names: list[str]  # display name of each file rank, for messages
    exact_rows: bool  # __pos is the row number within the file
    csv: bool
    first: pa.Table | None  # first chunk of the first file (time-format detection)
    label: str  # the whole source, for messages
    merged_ids: int = 0  # client ids given both as number and text in a pandas column, merged


def _q(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def spark_path(path: Path) -> str:
    """An absolute local path as Spark reads it: plain text (Spark does not decode ``%20``
    in URIs), with Hadoop's glob characters escaped so a name like ``a[1].parquet`` is literal."""
    return re.sub(r"([*?\[\]{}\\])", r"\\\1", str(Path(path).resolve()))


def _is_spark_frame(source) -> bool:
    return type(source).__module__.startswith("pyspark.") and hasattr(source, "sparkSession")


def _read(spark, source, schema: EventSchema, tmp: Path, chunk_rows: int) -> _Input:
    from pyspark.sql import functions as F

    cols = schema.raw_columns
    if _is_spark_frame(source):
        label = "<Spark DataFrame>"
        _check_columns(source.columns, cols, label)
        df = source.select(*[F.col(_q(c)) for c in cols])
        first = pa.Table.from_pandas(df.limit(10_000).toPandas(), preserve_index=False)
        df = df.select("*", F.lit(0).alias("__file"), F.lit(0).cast("long").alias("__blk"), F.monotonically_increasing_id().alias("__pos"))
        return _Input(df, [label], False, False, first, label)

    if isinstance(source, (pd.DataFrame, pa.Table)):
        label = "<DataFrame>" if isinstance(source, pd.DataFrame) else "<Table>"
        first_chunk = next(iter_chunks(source, cols, chunk_rows), None)  # the local missing-column error
        merged = 0
        if isinstance(source, pd.DataFrame):
            clients, merged = pandas_client_ids(source[cols[0]])  # the local rule for ids mixing 1 and "1"
            table = _from_pandas(source[cols[1:]]).add_column(0, cols[0], clients)
        else:
            table = source.select(cols)
        files, names = [tmp / "input.parquet"], [label]
        pq.write_table(table, files[0])
    else:
        label = str(source)
        files = list_files(Path(source))
        names = [str(f) for f in files]
        first_chunk = None
    csv = not files[0].name.lower().endswith(PARQUET_SUFFIXES)  # list_files: one format per input
    delimiters: dict[str, str] = {}  # the local engine's rules (csv_header, open_parquet), file by file
    for f, name in zip(files, names):
        if csv:
            delimiters.setdefault(csv_header(f, cols)[1], name)
        else:
            open_parquet(f, cols)
    if first_chunk is None:
        first_chunk = next(iter_chunks(files[0], cols, chunk_rows), None)
    first = check_column_types(first_chunk.table, names[0]) if first_chunk is not None else None

    if len(delimiters) > 1:
        (d1, f1), (d2, f2) = list(delimiters.items())[:2]
        raise SchemaError(f"{label}: the CSV files use different delimiters ({f1} {d1!r}, {f2} {d2!r}); the Spark "
                          "engine reads one delimiter per input: rewrite the files with one, or use the local engine")
    uris = [spark_path(f) for f in files]
    if csv:
        delimiter = next(iter(delimiters))
        reader = spark.read.options(header="true", sep=delimiter, inferSchema="false", escape='"', nullValue=CSV_NULL_MARK, mode="FAILFAST")
        raw = reader.csv(uris)
        # an empty field comes back null whatever nullValue says; pyarrow reads it as "" (the
        # client column, typed by inference there, treats it as null: see _client_expr)
        text = [F.col(_q(c)) if c == schema.client_col else F.coalesce(F.col(_q(c)), F.lit("")).alias(c) for c in cols]
        df = raw.select(*text, F.col("_metadata.file_path").alias("__path"),
                        F.col("_metadata.file_block_start").alias("__blk"), F.monotonically_increasing_id().alias("__pos"))
    else:
        from pyspark.sql import types as T

        raw = spark.read.parquet(*uris)
        # bytes are read as UTF-8 text, as check_column_types does on the local path
        text = [F.col(_q(c)).cast("string").alias(c) if isinstance(raw.schema[c].dataType, T.BinaryType) else F.col(_q(c)) for c in cols]
        df = raw.select(*text, F.col("_metadata.file_path").alias("__path"),
                        F.lit(0).cast("long").alias("__blk"), F.col("_metadata.row_index").alias("__pos"))
    # file rank in the local path's order (sorted paths), joined on the path Spark reports per
    # row; local files appear as file:///… in the listing but file:/… per row, so both forms
    # are listed, and rows of no listed file get rank -1 (counted and refused later)
    rank_of = {f.resolve(): i for i, f in enumerate(files)}
    ranks = []
    for uri in raw.inputFiles():
        local = Path(unquote(urlparse(uri).path)).resolve()
        if local not in rank_of:
            raise RuntimeError(f"Spark read a file the input listing does not hold: {uri}")
        ranks += [(form, rank_of[local]) for form in dict.fromkeys([uri, uri.replace("file:///", "file:/", 1)])]
    file_ranks = spark.createDataFrame(ranks, "__path string, __file int")
    df = df.join(F.broadcast(file_ranks), "__path", "left").drop("__path").fillna(-1, subset=["__file"])
    return _Input(df, names, not csv, csv, first, label, merged if isinstance(source, pd.DataFrame) else 0)


# ----------------------------------------------------------------- parsing
def _udf_time(fmt: str):
    from pyspark.sql.functions import pandas_udf

    @pandas_udf("double")
    def parse(s: pd.Series) -> pd.Series:
        p = parse_time(pa.array(s, from_pandas=True), fmt)
        return pd.Series(np.where(p.bad, np.nan, p.values))

    return parse


def _castable(value) -> bool:
    try:
        pc.cast(pa.array([str(value)], pa.string()), pa.float64())
        return True
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False


def _udf_number():
    """Numbers in a text column, parsed by :func:`parse_number`; ``nn`` flags values whose
    text is not a number at all, which changes the problem named in the local error."""
    from pyspark.sql.functions import pandas_udf

    @pandas_udf("v double, nn boolean")
    def parse(s: pd.Series) -> pd.DataFrame:
        p = parse_number(pa.array(s, from_pandas=True))
        nn = np.zeros(len(s), dtype=bool)
        if p.bad.any() and p.problem == NOT_A_NUMBER:
            bad_values = pd.Series(s[p.bad]).dropna().unique()  # one check per distinct bad value
            nonnumeric = [v for v in bad_values if not _castable(v)]
            nn = (s.isin(nonnumeric).to_numpy(dtype=bool) & p.bad) if nonnumeric else nn
        return pd.DataFrame({"v": np.where(p.bad, np.nan, p.values), "nn": nn})

    return parse


def _udf_category():
    from pyspark.sql.functions import pandas_udf

    @pandas_udf("string")
    def key(s: pd.Series) -> pd.Series:
        out = pd.Series(as_category_strings(s), dtype=object)
        out[s.isna().to_numpy()] = None
        return out

    return key


def _is_numeric_type(t) -> bool:
    from pyspark.sql import types as T

    return isinstance(t, (T.NumericType, T.BooleanType))


def _client_expr(df, name: str, csv: bool):
    """Client ids typed as the local path types them: integers as int64 (also integral
    floats and integer-looking CSV text), other text as strings."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    c = F.col(_q(name))
    t = df.schema[name].dataType
    if isinstance(t, T.IntegralType):
        return c.cast("long")
    if isinstance(t, T.BooleanType):
        return F.when(c, F.lit("True")).when(~c, F.lit("False"))
    if isinstance(t, T.DecimalType) and t.scale == 0:  # Parquet uint64: ids beyond int64 stay exact, as text
        lo, hi = df.select(F.min(c), F.max(c)).first()
        return c.cast("long") if hi is None or (lo >= -INT64_MAX - 1 and hi <= INT64_MAX) else c.cast("string")
    if isinstance(t, (T.FractionalType,)):
        x = c.cast("double")
        frac = df.select(F.count(F.when(x.isNotNull() & (F.isnan(x) | (x != F.floor(x))), 1))).first()[0]
        return x.cast("long") if frac == 0 else x
    if isinstance(t, T.StringType) and csv:
        s = F.when(c != "", c)
        d = F.expr(f"try_cast(nullif({_q(name)}, '') as double)")
        # as csv_client_ids: through float only when every id is exact in float64 (rint, not
        # floor: Spark's floor returns a bigint, which clamps ids beyond 2**63)
        inexact = F.isnan(d) | (F.abs(d) == float("inf")) | ((d == F.rint(d)) & (F.abs(d) > EXACT_FLOAT_INT))
        n, n_long, n_dbl, n_frac, n_inexact = df.select(
            F.count(s), F.count(F.expr(f"try_cast(nullif({_q(name)}, '') as bigint)")), F.count(d),
            F.count(F.when(d != F.rint(d), 1)), F.count(F.when(inexact, 1)),
        ).first()
        if n == n_long:
            return s.cast("long")
        if n == n_dbl and n_inexact == 0:
            return d.cast("long") if n_frac == 0 else d
        return s
    return c.cast("string")


@dataclass
class _Parsed:
    df: object
    client_type: str  # Spark simple type name of __cid
    time_format: str
    time_problem: str
    python_parsing: bool  # some column is parsed by a pandas UDF


def _parse(inp: _Input, schema: EventSchema, time_format: str, transforms: dict[str, NumericTransform]) -> _Parsed:
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    df = inp.df
    if time_format == "auto":
        time_format = detect_time_format(inp.first.column(schema.time_col)) if inp.first is not None and inp.first.num_rows else "number"
        log.info("time column %r detected as %s", schema.time_col, time_format)
    # each column's problem text, taken from the local parsers themselves
    time_problem = parse_time(pa.array([None], pa.string()), time_format).problem
    cols = {"__cid": _client_expr(df, schema.client_col, inp.csv)}
    python_parsing = False

    tcol, ttype = F.col(_q(schema.time_col)), df.schema[schema.time_col].dataType
    if time_format == "number" and _is_numeric_type(ttype):
        cols["__t"] = tcol.cast("double")
    elif time_format == "timestamp" and isinstance(ttype, (T.TimestampType, T.TimestampNTZType, T.DateType)):
        cols["__t"] = F.unix_micros(tcol.cast("timestamp")) / F.lit(1e6)
    else:
        cols["__t"] = _udf_time(time_format)(tcol)
        python_parsing = True

    for i, c in enumerate(schema.numeric):
        col = F.col(_q(c))
        if _is_numeric_type(df.schema[c].dataType):
            cols[f"__v{i}"] = col.cast("double")
        else:  # text: the __nn flag marks values that are not numbers at all
            cols[f"__p{i}"] = _udf_number()(col)
            python_parsing = True
    for i, c in enumerate(schema.categorical):
        col, t = F.col(_q(c)), df.schema[c].dataType
        if isinstance(t, T.StringType):
            cols[f"__k{i}"] = col
        elif isinstance(t, T.IntegralType):
            cols[f"__k{i}"] = col.cast("string")
        elif isinstance(t, T.BooleanType):
            cols[f"__k{i}"] = F.when(col, F.lit("1")).when(~col, F.lit("0"))
        else:
            cols[f"__k{i}"] = _udf_category()(col)
            python_parsing = True

    df = df.select("__file", "__blk", "__pos", *[e.alias(k) for k, e in cols.items()])
    for i, c in enumerate(schema.numeric):
        if f"__p{i}" in df.columns:
            df = df.select("*", F.col(f"__p{i}.v").alias(f"__v{i}"), F.col(f"__p{i}.nn").alias(f"__nn{i}")).drop(f"__p{i}")

    def bad(x):
        return x.isNull() | F.isnan(x) | (F.abs(x) == float("inf"))

    for i, c in enumerate(schema.numeric):
        v = F.col(f"__v{i}")
        base = F.signum(v) * F.log1p(F.abs(v)) if transforms[c].logged else v  # NumericTransform.base
        df = df.withColumn(f"__b{i}", base)
    code = F.when(F.col("__cid").isNull(), 1).when(bad(F.col("__t")), 2)
    for i in range(len(schema.numeric)):
        # NumericTransform.check_range: a value beyond float32 after the transform is a bad number
        code = code.when(bad(F.col(f"__v{i}")) | (F.abs(F.col(f"__b{i}")) > FLOAT32_MAX), 3 + i)
    df = df.withColumn("__code", code.otherwise(0))
    client_type = df.schema["__cid"].dataType.simpleString()
    return _Parsed(df, client_type, time_format, time_problem, python_parsing)


# ----------------------------------------------------------------- validation report
def _raise_first_problem(inp: _Input, parsed: _Parsed, schema: EventSchema, chunk_rows: int,
                         transforms: dict[str, NumericTransform]) -> None:
    """The error the local path raises: the first chunk (file order) with a bad row, its first
    failing check, the first such row, the count in that chunk."""
    from pyspark.sql import functions as F

    df = parsed.df.filter(F.col("__code") > 0)
    chunk = (F.col("__pos") / F.lit(chunk_rows)).cast("long") if inp.exact_rows else F.lit(0).cast("long")
    df = df.withColumn("__chunk", chunk)
    f, ch = df.select("__file", "__chunk").orderBy("__file", "__chunk").first()
    in_chunk = df.filter((F.col("__file") == f) & (F.col("__chunk") == ch))
    k = in_chunk.agg(F.min("__code")).first()[0]
    rows = in_chunk.filter(F.col("__code") == k)
    nn_cols = [c for c in rows.columns if c.startswith("__nn")]
    aggs = [F.count(F.lit(1)), F.min(F.struct("__blk", "__pos"))]
    aggs += [F.max(F.col(c).cast("int")) for c in nn_cols]
    count, first, *nn = rows.agg(*aggs).first()
    blk, pos = first["__blk"], first["__pos"]
    raw = inp.df.filter((F.col("__file") == f) & (F.col("__blk") == blk) & (F.col("__pos") == pos))
    if inp.exact_rows:
        row = int(pos)
    else:
        row = inp.df.filter((F.col("__file") == f) & ((F.col("__blk") < blk) | ((F.col("__blk") == blk) & (F.col("__pos") < pos)))).count()
    nn_any = dict(zip(nn_cols, nn))
    if k == 1:
        column, problem, example = schema.client_col, NULL_CLIENT_PROBLEM, None
    elif k == 2:
        column, problem = schema.time_col, parsed.time_problem
        example = raw.select(F.col(_q(column))).first()[0]
    else:
        i = k - 3
        column = schema.numeric[i]
        problem = NOT_A_NUMBER if nn_any.get(f"__nn{i}") else BAD_NUMBER  # as parse_number names them
        example = raw.select(F.col(_q(column))).first()[0]
        first = transforms[column].check_range(parse_number(pa.array([example])))
        if first.overflow is not None and first.overflow[0]:
            problem = first.overflow_problem
    raise bad_rows_error(inp.names[f], column, count, problem, example, row)


# ----------------------------------------------------------------- the pipeline
def prepare_spark(
    source,
    schema: EventSchema,
    out: str | Path,
    encoding: Encoding | None = None,
    on_error: str = "raise",
    min_count: int = 1,
    max_vocab: int | None = None,
    spark=None,
    chunk_rows: int = 1_000_000,
    row_group_size: int = 10_000,
    cache: bool | None = None,
) -> PrepareReport:
    """Spark twin of :func:`ptls_meles.prepare.prepare`: writes ``out/sequences.parquet`` and
    ``out/encoding.json`` (same content as the local path) and returns the report.

    ``source``: Parquet/CSV file or directory, pandas DataFrame, Arrow table or Spark
    DataFrame. ``spark``: a session (default: :func:`get_session`). ``cache``: keep the parsed
    events in Spark's cache between the counting and the grouping jobs (default: only when
    text columns are parsed in Python; re-reading typed Parquet is cheaper than caching).
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    check_arguments(schema, encoding, on_error)
    t0 = time.perf_counter()
    spark = spark or get_session()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".spark-prepare-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    report = PrepareReport()
    transforms = numeric_transforms(schema, encoding)
    parsed_df = None
    time_zone = spark.conf.get("spark.sql.session.timeZone")
    spark.conf.set("spark.sql.session.timeZone", "UTC")  # naive timestamps and dates read as UTC, like pyarrow
    try:
        inp = _read(spark, source, schema, tmp, chunk_rows)
        parsed = _parse(inp, schema, encoding.time_format if encoding is not None else schema.time_format, transforms)
        cache = parsed.python_parsing if cache is None else cache
        parsed_df = parsed.df.persist(StorageLevel.MEMORY_AND_DISK) if cache else parsed.df
        phases = {"start": t0, "list and plan the input": time.perf_counter()}
        parsed.df = parsed_df
        code, kept = F.col("__code"), F.col("__code") == 0
        n_num, n_cat = len(schema.numeric), len(schema.categorical)
        aggs = [F.count(F.lit(1)), F.count(F.when(kept, 1)), F.count(F.when(F.col("__file") < 0, 1))]
        aggs += [F.count(F.when(code == k, 1)) for k in range(1, 3 + n_num)]
        aggs += [F.count(F.when(kept & F.col(f"__k{i}").isNull(), 1)) for i in range(n_cat)]
        for i in range(n_num):
            b = F.col(f"__b{i}")
            aggs += [F.sum(F.when(kept, b)), F.sum(F.when(kept, b * b))]
        stats = parsed_df.agg(*aggs).first()
        phases["read and count"] = time.perf_counter()
        n_rows, n_kept, unmatched = stats[0], stats[1], stats[2]
        if unmatched:
            raise RuntimeError(f"{unmatched} rows came from files Spark named differently from the input listing")
        bad_counts = stats[3 : 5 + n_num]
        null_cats = stats[5 + n_num : 5 + n_num + n_cat]
        sums = stats[5 + n_num + n_cat :]
        report.n_rows_read = int(n_rows)
        report.merged_client_ids += inp.merged_ids
        if n_rows == 0:
            raise no_rows_error(inp.label)
        if on_error == "raise" and any(bad_counts):
            _raise_first_problem(inp, parsed, schema, chunk_rows, transforms)
        for reason, n in zip(drop_reasons(schema), bad_counts):  # check k fails with __code k + 1
            if n:
                report.dropped[reason] += int(n)
        for c, n in zip(schema.categorical, null_cats):
            if n:
                report.null_categories[c] += int(n)
        if n_kept == 0:
            raise all_dropped_error(inp.label, n_rows, report.dropped)

        # encoding: vocabularies and moments fitted exactly as the local path fits them
        vocabs = _vocabularies(parsed_df.filter(kept), schema, encoding, min_count, max_vocab)
        phases["vocabularies"] = time.perf_counter()
        for i, c in enumerate(schema.numeric):
            if encoding is None:
                transforms[c].fit_moments(float(sums[2 * i] or 0.0), float(sums[2 * i + 1] or 0.0), int(n_kept))
        enc = encoding or Encoding(schema.client_col, schema.time_col, parsed.time_format, vocabs, transforms)

        events = parsed_df.filter(kept)
        fields = [F.col("__t").alias("t"), F.col("__file").alias("f"), F.col("__blk").alias("b"), F.col("__pos").alias("p")]
        for i, c in enumerate(schema.categorical):
            mapping = pd.DataFrame({f"__k{i}": pd.Series(vocabs[c].values, dtype=object),
                                    f"__id{i}": np.arange(len(vocabs[c].values), dtype=np.int32) + N_RESERVED})
            mapping = spark.createDataFrame(mapping, f"__k{i} string, __id{i} int")
            if len(vocabs[c].values) <= BROADCAST_LIMIT:
                mapping = F.broadcast(mapping)
            events = events.join(mapping, f"__k{i}", "left")
            fields.append(F.coalesce(F.col(f"__id{i}"), F.lit(UNSEEN_ID)).cast("int").alias(f"c{i}"))
        for i, c in enumerate(schema.numeric):
            value = F.col(f"__b{i}").cast("float")
            tr = transforms[c]
            if tr.standardized:  # NumericTransform.standardize: float32 arithmetic
                value = ((value - F.lit(tr.mean).cast("float")) / F.lit(tr.std).cast("float")).cast("float")
            fields.append(value.alias(f"n{i}"))
        n_parts = int(spark.conf.get("spark.sql.shuffle.partitions"))
        events = events.repartitionByRange(n_parts, "__cid")  # the grouping below reuses this partitioning
        grouped = events.groupBy("__cid").agg(F.array_sort(F.collect_list(F.struct(*fields))).alias("ev"))
        names = [TIME_COLUMN, *schema.categorical, *schema.numeric]
        sources = ["t"] + [f"c{i}" for i in range(n_cat)] + [f"n{i}" for i in range(n_num)]
        table = grouped.select(F.col("__cid").alias("client_id"), *[F.col(f"ev.{s}").alias(n) for s, n in zip(sources, names)])
        parts = tmp / "parts"
        table.sortWithinPartitions("client_id").write.parquet(str(parts.resolve()))
        phases["group, sort, write"] = time.perf_counter()

        list_type = pa.list_ if n_kept < 2**31 else pa.large_list
        id_type = {"bigint": pa.int64(), "double": pa.float64()}.get(parsed.client_type, pa.string())
        target = pa.schema(
            [pa.field("client_id", id_type), pa.field(TIME_COLUMN, list_type(pa.float64()))]
            + [pa.field(c, list_type(pa.int32())) for c in schema.categorical]
            + [pa.field(c, list_type(pa.float32())) for c in schema.numeric],
            metadata=file_metadata({"schema": schema.to_dict()}, enc),
        )
        report.n_clients = combine_parts(parts, out / STORE_FILE, target, row_group_size)
        phases["combine"] = time.perf_counter()
        times = list(phases.values())
        report.phases = {k: b - a for k, a, b in zip(list(phases)[1:], times, times[1:])}
        log.info("spark prepare phases: %s", ", ".join(f"{k} {s:.1f} s" for k, s in report.phases.items()))
        report.n_events = int(n_kept)
        enc.save(out / ENCODING_FILE)
        remove_stale_outputs(out)
    finally:
        if parsed_df is not None and cache:
            parsed_df.unpersist()
        shutil.rmtree(tmp, ignore_errors=True)
        spark.conf.set("spark.sql.session.timeZone", time_zone)
    report.seconds = time.perf_counter() - t0
    log.info(report.summary())
    return report


def _vocabularies(kept_df, schema: EventSchema, encoding: Encoding | None, min_count: int, max_vocab: int | None) -> dict[str, CategoryVocab]:
    """Counts of every (column, value) in one Spark job, then :meth:`CategoryVocab.fit`."""
    from pyspark.sql import functions as F

    if encoding is not None:
        return {c: encoding.categorical[c] for c in schema.categorical}
    if not schema.categorical:
        return {}
    pairs = F.array(*[F.struct(F.lit(i).alias("i"), F.col(f"__k{i}").alias("k")) for i in range(len(schema.categorical))])
    counts = (kept_df.select(F.explode(pairs).alias("e")).select("e.i", "e.k").where(F.col("k").isNotNull())
              .groupBy("i", "k").count().toPandas())
    vocabs = {}
    for i, c in enumerate(schema.categorical):
        part = counts[counts["i"] == i]
        uniques = part["k"].to_numpy(dtype=object).astype(str)
        vocabs[c] = CategoryVocab.fit(uniques, part["count"].to_numpy(np.int64), min_count=min_count, max_size=max_vocab)
    return vocabs


def combine_parts(part_dir: Path, target: Path, schema: pa.Schema, row_group_size: int, key: str = "client_id") -> int:
    """Stream Spark's sorted part files into one Parquet file, ``row_group_size`` rows per row
    group (memory: about two row groups). Checks that ``key`` stays ascending across parts."""
    files = sorted(Path(part_dir).glob("part-*.parquet"))
    plain = pa.schema(list(schema))  # cast target without metadata
    rows, last = 0, None
    pending: list[pa.Table] = []
    n_pending = 0
    with atomic_path(target) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            def write(final: bool) -> None:
                nonlocal pending, n_pending
                table = pa.concat_tables(pending) if len(pending) > 1 else pending[0]
                while table.num_rows >= row_group_size or (final and table.num_rows):
                    n = min(row_group_size, table.num_rows)
                    writer.write_table(table.slice(0, n).replace_schema_metadata(schema.metadata), row_group_size=n)
                    table = table.slice(n)
                pending, n_pending = ([table] if table.num_rows else []), table.num_rows

            for f in files:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=row_group_size):
                    table = pa.Table.from_batches([batch]).rename_columns(plain.names).cast(plain)
                    keys = table.column(key)
                    if last is not None and table.num_rows and pc.less(keys[0], last).as_py():
                        raise RuntimeError(f"Spark part files are out of {key} order at {f.name}; the store would be misordered")
                    if table.num_rows:
                        last = keys[table.num_rows - 1]
                    rows += table.num_rows
                    pending.append(table)
                    n_pending += table.num_rows
                    if n_pending >= row_group_size:
                        write(False)
            if pending:
                write(True)
    return rows
