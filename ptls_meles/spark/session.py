"""One place that starts Spark for ptls-meles, with settings the data path relies on.

Why: Python workers must run the same interpreter (and so the same installed packages)
as the driver, times must be read in UTC so ``prepare`` gives the same seconds as the
single-machine path, and small jobs should not pay for the web UI or 200 shuffle
partitions.
"""
from __future__ import annotations

import os
import sys

INSTALL_HINT = "Spark support needs pyspark: pip install 'ptls-meles[spark]' (and Java 17+)"


def require_pyspark():
    """Import pyspark or fail with the install hint."""
    try:
        import pyspark  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(INSTALL_HINT) from exc
    return pyspark


def parse_conf(pairs: list[str] | None) -> dict[str, str]:
    """``KEY=VALUE`` strings (the CLI's ``--spark-conf``) as a dict."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--spark-conf expects KEY=VALUE, got {pair!r} (example: spark.driver.memory=4g)")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def default_conf(master: str) -> dict[str, str]:
    """Settings ptls-meles relies on; any of them can be overridden by the caller."""
    cores = _cores(master)
    return {
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.session.timeZone": "UTC",  # naive timestamps and dates are read as UTC, like pyarrow
        "spark.sql.shuffle.partitions": str(max(2, 2 * cores)),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.adaptive.enabled": "true",
        "spark.sql.ansi.enabled": "false",  # casts that overflow give inf/null like NumPy, not a failed job
        "spark.pyspark.python": sys.executable,
        "spark.executorEnv.OMP_NUM_THREADS": "1",
    }


def get_session(master: str | None = None, conf: dict[str, str] | None = None, app_name: str = "ptls-meles"):
    """A SparkSession (the active one is reused, as Spark does). ``master`` defaults to
    ``local[*]``; ``conf`` overrides :func:`default_conf`."""
    require_pyspark()
    from pyspark.sql import SparkSession

    master = master or os.environ.get("SPARK_MASTER") or "local[*]"
    settings = {**default_conf(master), **(conf or {})}
    # the Python worker is chosen from the environment before the session exists
    os.environ.setdefault("PYSPARK_PYTHON", settings["spark.pyspark.python"])
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.master(master).appName(app_name)
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def _cores(master: str) -> int:
    if master.startswith("local["):
        inner = master[6:].split(",")[0].rstrip("]")
        return (os.cpu_count() or 1) if inner == "*" else max(1, int(inner))
    return os.cpu_count() or 1
