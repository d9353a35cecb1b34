"""How many torch threads to use when the user does not say.

Torch's intra-op pool waits at every parallel region for its slowest thread. When another
process keeps a core busy, a pool sized to every core runs at the speed of the thread
that shares that core (a demo epoch went from ~30 s to 3.5 min on 2 cores). So the
default leaves out the cores that other processes already keep busy.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def default_threads(max_threads: int = 8) -> int:
    """Usable cores minus the ones busy with other work (1-minute load average), at least 1."""
    cores = usable_cores()
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except (OSError, AttributeError):  # no load average on this platform
        busy = 0
    return max(1, min(max_threads, cores - busy))


def set_threads(n: int | None) -> int:
    """Set torch's intra-op threads to ``n``, or to :func:`default_threads` when ``n`` is None."""
    import torch

    if n is not None and n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    chosen = n or default_threads()
    torch.set_num_threads(chosen)
    if n is None:
        log.info("torch threads: %d (%d usable cores, load %.1f); set --threads to choose", chosen, usable_cores(),
                 os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)
    return chosen
