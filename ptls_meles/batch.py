"""Padded batches: a dict of ``[B, T]`` tensors plus the true lengths."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PaddedBatch:
    """``payload[name]`` is ``[B, T]``: long for categorical ids, float32 for numbers and
    ``event_time``. Positions ``t >= lengths[b]`` are padding (id 0 / value 0)."""

    payload: dict[str, torch.Tensor]
    lengths: torch.Tensor  # int64 [B]

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def max_len(self) -> int:
        return int(next(iter(self.payload.values())).shape[1]) if self.payload else 0

    def mask(self) -> torch.Tensor:
        """``[B, T]`` bool, True on real events."""
        t = torch.arange(self.max_len, device=self.lengths.device)
        return t[None, :] < self.lengths[:, None]

    def to(self, device) -> "PaddedBatch":
        return PaddedBatch({k: v.to(device) for k, v in self.payload.items()}, self.lengths.to(device))

    def pin_memory(self) -> "PaddedBatch":
        return PaddedBatch({k: v.pin_memory() for k, v in self.payload.items()}, self.lengths.pin_memory())


def pad_segments(columns: dict[str, np.ndarray], index: np.ndarray, offsets: np.ndarray) -> PaddedBatch:
    """Gather segments ``index[offsets[i]:offsets[i+1]]`` of flat columns into a padded batch.

    One fancy-index per column; categorical int columns become int64 (embedding ids),
    ``event_time`` stays float64 (Unix seconds in float32 would lose their gaps), the rest
    become float32.
    """
    lengths = np.diff(offsets)
    n, t = len(lengths), int(lengths.max()) if len(lengths) else 0
    row = np.repeat(np.arange(n), lengths)
    pos = np.arange(len(index)) - np.repeat(offsets[:-1], lengths)
    payload = {}
    for name, flat in columns.items():
        if np.issubdtype(flat.dtype, np.integer):
            dtype = np.int64
        else:
            dtype = np.float64 if name == "event_time" else np.float32
        out = np.zeros((n, t), dtype=dtype)
        out[row, pos] = flat[index]
        payload[name] = torch.from_numpy(out)
    return PaddedBatch(payload, torch.from_numpy(lengths.astype(np.int64)))
