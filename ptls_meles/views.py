"""Pair generation: cut ``split_count`` views (sub-sequences) out of each client's history.

Views of one client are positives for each other; views of other clients are negatives.
All strategies work on the store's flat arrays at once — one NumPy pass per batch of
clients, never a Python loop per client — and return :class:`Views`.

Short clients (fewer events than ``cnt_min``): slices and samples are then drawn with
lengths between ``ceil(L/2)`` and ``L`` (at least one event), so views still differ; a
client with one event yields ``split_count`` identical one-event views. Nobody is dropped.

``long_view`` (N > 0) makes the last of each client's views a contiguous slice of ``min(L, N)``
events, the others drawn as the strategy says: pairs of a short and a long view ask the
encoder to place a long history (as it is embedded after training: the last 1,600 events)
near its short pieces, the way multi-crop training pairs global and local crops of an image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import CHOICES
from .store import offsets_from_lengths, ragged_arange

SPLITS = CHOICES["split"]


@dataclass
class Views:
    """Views as flat event indices: view ``v`` is events ``index[offsets[v]:offsets[v+1]]``
    of the store, in time order; ``label[v]`` is the position of its client in the batch."""

    index: np.ndarray
    offsets: np.ndarray
    label: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _view_lengths(seq_len: np.ndarray, split_count: int, cnt_min: int, cnt_max: int, rng: np.random.Generator) -> np.ndarray:
    """[n_clients, split_count] lengths uniform in [cnt_min, min(L, cnt_max)], or [ceil(L/2), L] when L < cnt_min."""
    lo = np.where(seq_len >= cnt_min, cnt_min, np.ceil(seq_len / 2)).astype(np.int64)
    hi = np.minimum(seq_len, cnt_max).astype(np.int64)
    lo = np.maximum(np.minimum(lo, hi), 1)
    hi = np.maximum(hi, 1)
    u = rng.random((len(seq_len), split_count))
    return (lo[:, None] + np.floor(u * (hi - lo + 1)[:, None])).astype(np.int64).clip(max=hi[:, None])


def _cut(starts: np.ndarray, seq_len: np.ndarray, lens: np.ndarray, rng: np.random.Generator) -> Views:
    """Contiguous slices of ``lens [n_clients, k]`` events at uniform random starts, k per client."""
    free = np.maximum(seq_len[:, None] - lens, 0)
    begin = np.floor(rng.random(lens.shape) * (free + 1)).astype(np.int64).clip(max=free)
    index = ragged_arange((starts[:, None] + begin).ravel(), lens.ravel())
    return Views(index, offsets_from_lengths(lens.ravel()), np.repeat(np.arange(len(seq_len)), lens.shape[1]))


def random_slices(starts: np.ndarray, seq_len: np.ndarray, split_count: int, cnt_min: int, cnt_max: int, rng: np.random.Generator) -> Views:
    """Contiguous random sub-sequences (the paper's best strategy)."""
    lens = _view_lengths(seq_len, split_count, cnt_min, cnt_max, rng)
    return _cut(starts, seq_len, lens, rng)


def random_samples(starts: np.ndarray, seq_len: np.ndarray, split_count: int, cnt_min: int, cnt_max: int, rng: np.random.Generator) -> Views:
    """Random subsets of events (kept in time order); views may overlap."""
    n = len(seq_len)
    lens = _view_lengths(seq_len, split_count, cnt_min, cnt_max, rng).ravel()
    client = np.repeat(np.arange(n), split_count)
    full = seq_len[client]  # every view draws from the whole sequence
    seg = np.repeat(np.arange(len(full)), full)
    pos = ragged_arange(np.zeros(len(full), np.int64), full)
    order = np.lexsort((rng.random(len(seg)), seg))
    rank = np.arange(len(seg)) - np.repeat(offsets_from_lengths(full)[:-1], full)
    keep = rank < lens[seg]
    chosen, chosen_seg = pos[order][keep], seg[keep]
    by_time = np.lexsort((chosen, chosen_seg))
    index = starts[client][chosen_seg[by_time]] + chosen[by_time]
    return Views(index, offsets_from_lengths(lens), client)


def random_disjoint(starts: np.ndarray, seq_len: np.ndarray, split_count: int, cnt_min: int, cnt_max: int, rng: np.random.Generator) -> Views:
    """Each event goes to at most one view: a random partition into ``split_count`` parts.

    Parts have ``L // split_count`` events (at least one, so clients shorter than
    ``split_count`` repeat events), capped at ``cnt_max``; ``cnt_min`` does not apply.
    """
    n = len(seq_len)
    part = np.clip(seq_len // split_count, 1, cnt_max)
    seg = np.repeat(np.arange(n), seq_len)
    pos = ragged_arange(np.zeros(n, np.int64), seq_len)
    order = np.lexsort((rng.random(len(seg)), seg))
    rank = np.arange(len(seg)) - np.repeat(offsets_from_lengths(seq_len)[:-1], seq_len)
    perm = pos[order]
    # rank r → view r // part; short clients (L < split_count) wrap around
    view = rank // part[seg]
    wrap = seq_len[seg] < split_count
    keep = (view < split_count) & ~wrap
    chosen, chosen_view, chosen_client = perm[keep], view[keep], seg[keep]
    if wrap.any():
        short = np.flatnonzero(seq_len < split_count)
        c_rep = np.repeat(short, split_count)
        v_rep = np.tile(np.arange(split_count), len(short))
        p_rep = v_rep % seq_len[c_rep]
        chosen = np.concatenate([chosen, p_rep])
        chosen_view = np.concatenate([chosen_view, v_rep])
        chosen_client = np.concatenate([chosen_client, c_rep])
    key = chosen_client * split_count + chosen_view
    by_time = np.lexsort((chosen, key))
    lens = np.bincount(key, minlength=n * split_count)
    index = starts[chosen_client[by_time]] + chosen[by_time]
    return Views(index, offsets_from_lengths(lens), np.repeat(np.arange(n), split_count))


_STRATEGIES = {"slices": random_slices, "samples": random_samples, "disjoint": random_disjoint}


def long_slices(starts: np.ndarray, seq_len: np.ndarray, length: int, rng: np.random.Generator) -> Views:
    """One contiguous slice of ``min(L, length)`` events per client, at a random start."""
    return _cut(starts, seq_len, np.minimum(seq_len, length).astype(np.int64)[:, None], rng)


def _joined(first: Views, second: Views) -> Views:
    """Both sets of views as one :class:`Views`, each client's views together (``first``'s, then ``second``'s)."""
    lens = np.concatenate([first.lengths, second.lengths])
    starts = np.concatenate([first.offsets[:-1], len(first.index) + second.offsets[:-1]])
    label = np.concatenate([first.label, second.label])
    order = np.argsort(label, kind="stable")
    index = np.concatenate([first.index, second.index])[ragged_arange(starts[order], lens[order])]
    return Views(index, offsets_from_lengths(lens[order]), label[order])


def make_views(
    offsets: np.ndarray, clients: np.ndarray, strategy: str, split_count: int, cnt_min: int, cnt_max: int,
    rng: np.random.Generator, long_view: int = 0,
) -> Views:
    """Views of the given clients (positions in the store) by the named strategy; with
    ``long_view`` N > 0 the last of each client's ``split_count`` views is a slice of up to N events."""
    if strategy not in _STRATEGIES:
        raise ValueError(f"split strategy {strategy!r} is not one of {SPLITS}")
    if split_count < 2:
        raise ValueError(f"split_count must be at least 2 (positives need two views), got {split_count}")
    if not 1 <= cnt_min <= cnt_max:
        raise ValueError(f"need 1 <= cnt_min <= cnt_max, got cnt_min={cnt_min}, cnt_max={cnt_max}")
    if long_view < 0:
        raise ValueError(f"long_view must be 0 (off) or the long view's largest length in events, got {long_view}")
    clients = np.asarray(clients, dtype=np.int64)
    starts = offsets[clients]
    seq_len = offsets[clients + 1] - starts
    if len(seq_len) and seq_len.min() < 1:
        # an empty client would get views made of its neighbour's events
        empty = clients[seq_len < 1]
        raise ValueError(f"{len(empty)} client(s) have no events (store positions e.g. {empty[:5].tolist()}); drop them before splitting")
    if not long_view:
        return _STRATEGIES[strategy](starts, seq_len, split_count, cnt_min, cnt_max, rng)
    short = _STRATEGIES[strategy](starts, seq_len, split_count - 1, cnt_min, cnt_max, rng)
    return _joined(short, long_slices(starts, seq_len, long_view, rng))
