"""Shared small fixtures for the data-path tests: tiny event tables and stores built by hand."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ptls_meles.encoding import Encoding  # noqa: E402
from ptls_meles.store import SequenceStore  # noqa: E402

torch.set_num_threads(1)


def synthetic_events_and_store(n_clients: int, seed: int, mean_events: int):
    """The shipped generator's transactions and their store (``client_id, trans_date, small_group,
    amount_rur``): a small log that a few training epochs can learn something from."""
    from ptls_meles import EventSchema
    from ptls_meles.datasets.synthetic import generate
    from ptls_meles.prepare import prepare

    events, _ = generate(n_clients=n_clients, seed=seed, mean_events=mean_events)
    schema = EventSchema("client_id", "trans_date", ["small_group"], ["amount_rur"], time_format="number")
    return events, prepare(events, schema, show_progress=False)[0], schema


def events_frame(n_clients: int = 6, max_len: int = 9, seed: int = 0, shuffle: bool = True) -> pd.DataFrame:
    """Raw events: int client ids, integer day times (with ties), skewed int ``mcc``, signed ``amount``.

    Every client has between 1 and ``max_len`` events; rows come shuffled unless told not to.
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, n_clients)
    client = np.repeat(np.arange(n_clients) * 7 + 3, lengths)  # ids 3, 10, 17, ...: numeric order != text order
    n = len(client)
    df = pd.DataFrame(
        {
            "client": client,
            "day": rng.integers(0, 30, n),
            "mcc": rng.choice([5411, 5812, 6011, 4111], n, p=[0.5, 0.25, 0.15, 0.1]),
            "amount": np.round(rng.normal(0, 200, n), 2),
        }
    )
    if shuffle:
        df = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    return df


@pytest.fixture
def make_events():
    """Factory for small raw event DataFrames (see :func:`events_frame`)."""
    return events_frame


def store_from_lengths(lengths, seed: int = 0) -> SequenceStore:
    """A store with the given per-client lengths; ``owner`` holds client position + 1 on every event,
    ``pos`` the event's position within its client, so views can be traced back by value."""
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    n = int(offsets[-1])
    rng = np.random.default_rng(seed)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.arange(n) - offsets[:-1][owner]
    columns = {
        "event_time": (pos * 10.0 + owner).astype(np.float64),
        "owner": (owner + 1).astype(np.int32),
        "pos": pos.astype(np.float32),
        "amount": rng.normal(size=n).astype(np.float32),
    }
    enc = Encoding("client", "event_time", "number")
    return SequenceStore(np.arange(len(lengths)) + 100, offsets, columns, enc)


@pytest.fixture
def make_store():
    """Factory for hand-built stores (see :func:`store_from_lengths`)."""
    return store_from_lengths
