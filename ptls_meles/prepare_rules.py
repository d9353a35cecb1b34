"""The rules of ``prepare``, written once and called by both engines (local and Spark):
argument checks, the checks a row must pass in order, the drop reasons, the error texts.

Local ``prepare`` is the specification; Spark reproduces its results, so every text a
user sees and every count key comes from here.
"""
from __future__ import annotations

from .encoding import Encoding, NumericTransform
from .schema import EventSchema, SchemaError

ON_ERROR = ("raise", "drop")


def check_arguments(schema: EventSchema, encoding: Encoding | None, on_error: str) -> None:
    """Refuse an unknown ``on_error`` and an applied encoding that lacks a schema column."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if encoding is not None:
        missing = [c for c in schema.categorical if c not in encoding.categorical] + [c for c in schema.numeric if c not in encoding.numeric]
        if missing:
            raise SchemaError(f"the saved encoding has no state for column(s) {missing}; it knows {list(encoding.categorical) + list(encoding.numeric)}")


def numeric_transforms(schema: EventSchema, encoding: Encoding | None) -> dict[str, NumericTransform]:
    """Each numeric column's transform: the applied encoding's, or a new one of the schema's
    kind (whose moments the engine then fits with :meth:`NumericTransform.fit_moments`)."""
    if encoding is not None:
        return {c: encoding.numeric[c] for c in schema.numeric}
    return {c: NumericTransform(schema.transform_of(c)) for c in schema.numeric}


NULL_CLIENT_PROBLEM = "a null client id"


def drop_reasons(schema: EventSchema) -> list[str]:
    """The checks a row must pass, in the order they run (client id, time, each number),
    named as :attr:`PrepareReport.dropped` counts the rows that fail them."""
    return ["null client id", f"bad time ({schema.time_col})", *[f"bad number ({c})" for c in schema.numeric]]


def bad_rows_error(source: str, column: str, count: int, problem: str, example, row: int) -> SchemaError:
    """The error of ``on_error='raise'``: the first chunk's first failing check, its first row."""
    return SchemaError(
        f"{source}: column {column!r} has {count} row(s) with {problem}, "
        f"e.g. {example!r} at row {row}. Fix the input or pass on_error='drop' (--on-error drop)."
    )


def no_rows_error(source: str) -> SchemaError:
    return SchemaError(f"{source}: no events in the input (0 rows)")


def all_dropped_error(source: str, n_rows: int, dropped: dict) -> SchemaError:
    return SchemaError(f"{source}: all {n_rows} rows were dropped as bad: {dict(dropped)}")
