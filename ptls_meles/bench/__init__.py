"""Benchmarks: runnable experiments behind every figure in the README."""
from __future__ import annotations

from importlib import import_module

BENCHES = ("speed", "profile", "quality", "parts", "memory", "spark")


def run_bench(name: str, argv: list[str]) -> None:
    if name not in BENCHES:
        raise ValueError(f"unknown benchmark {name!r}; choose {', '.join(BENCHES)}")
    import_module(f"{__name__}.{name}").main([a for a in argv if a != "--"])
