"""The default thread count leaves out cores that other processes keep busy."""
from __future__ import annotations

import pytest
import torch

from ptls_meles import threads


@pytest.mark.parametrize("cores,load,expected", [(2, 0.0, 2), (2, 1.2, 1), (2, 3.5, 1), (16, 2.4, 8), (16, 10.0, 6)])
def test_default_threads_subtracts_busy_cores(monkeypatch, cores, load, expected):
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, load, load))
    assert threads.default_threads() == expected


def test_set_threads_honours_an_explicit_count_and_refuses_zero():
    before = torch.get_num_threads()
    try:
        assert threads.set_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="--threads must be >= 1"):
            threads.set_threads(0)
    finally:
        torch.set_num_threads(before)
