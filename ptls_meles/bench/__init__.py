"""Benchmarks: runnable experiments behind every figure in the README."""
from __future__ import annotations


def run_bench(name: str, argv: list[str]) -> None:
    argv = [a for a in argv if a != "--"]
    if name == "speed":
        from .speed import main
    elif name == "paper":
        from .paper import main
    elif name == "memory":
        from .memory import main
    elif name == "spark":
        from .spark import main
    elif name == "quality":
        from .quality import main
    elif name == "profile":
        from .profile import main
    else:
        raise ValueError(f"unknown benchmark {name!r}; choose speed, profile, paper, quality, memory or spark")
    main(argv)
