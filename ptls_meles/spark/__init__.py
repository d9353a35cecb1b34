"""Spark engine: ``prepare`` and ``embed`` beyond one machine, with the local path's results.

    from ptls_meles.spark import get_session, prepare_spark, embed_spark
    spark = get_session("local[4]")            # or a cluster master URL
    prepare_spark("events/", schema, "store/", spark=spark)
    embed_spark("store/", "runs/m1/model", "emb.parquet", spark=spark)

Needs ``pip install 'ptls-meles[spark]'`` (pyspark) and Java 17+. Imports of pyspark
happen inside the functions, so this package imports without it.
"""
from __future__ import annotations

from .session import get_session, parse_conf


def __getattr__(name):  # keep `import ptls_meles.spark` light: torch and pyspark load on use
    if name == "prepare_spark":
        from .prepare import prepare_spark

        return prepare_spark
    if name == "embed_spark":
        from .embed import embed_spark

        return embed_spark
    raise AttributeError(name)


__all__ = ["get_session", "parse_conf", "prepare_spark", "embed_spark"]
