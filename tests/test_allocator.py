"""reuse_freed_memory: a training step's large activations (over glibc's 32 MiB mmap limit) come
from the heap again instead of being page-faulted in anew at every step. Each mode runs in a
fresh interpreter, so the test process itself is not changed."""
from __future__ import annotations

import subprocess
import sys

import pytest

from ptls_meles.allocator import reuse_freed_memory

PROBE = """
import resource, sys
import torch
torch.set_num_threads(1)
if sys.argv[1] == "reuse":
    from ptls_meles.allocator import reuse_freed_memory
    assert reuse_freed_memory()
from ptls_meles.nn.seq_encoder import BagSeqEncoder
torch.manual_seed(0)
encoder = BagSeqEncoder(16, 256, num_layers=2, pooling="mean,max")
x, lengths = torch.randn(256, 160, 16), torch.randint(20, 161, (256,))  # [256, 160, 256] floats: 42 MiB

def step():
    encoder.zero_grad()
    encoder(x, lengths).pow(2).mean().backward()

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


def _faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def test_training_step_reuses_freed_activation_memory():
    if not reuse_freed_memory():
        pytest.skip("not glibc: mallopt is unavailable")
    default, reuse = _faults_per_step("default"), _faults_per_step("reuse")
    assert default > 20_000  # each 42 MiB activation faulted in again: ~10k pages apiece
    assert reuse < 0.5 * default  # measured: ~102k faults per step by default, ~22k with reuse


def test_process_tree_peak_sees_a_child_process_memory():
    """Spark's JVM and Python workers are children: their RSS must count, ru_maxrss would miss it."""
    import subprocess
    import sys
    import time

    from ptls_meles.bench.memory import ProcessTreePeak

    child = [sys.executable, "-c", "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5)"]
    with ProcessTreePeak(interval_s=0.05) as peak:
        subprocess.run(child, check=True)
        time.sleep(0.1)
    gib = peak.gib
    assert gib.get("python workers", 0) >= 0.28, gib
    assert gib["this process"] > 0.01
    with ProcessTreePeak(interval_s=0.05) as quiet:
        time.sleep(0.2)
    assert quiet.gib.get("python workers", 0) == 0
