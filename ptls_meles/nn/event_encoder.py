"""Event encoder: one vector per event from categorical ids, numbers and (optionally) time gaps.

Padding never leaks in: padded positions are cleaned before any arithmetic and the numeric
scaling statistics are taken over real events only, so whatever sits in the padded slots
(zeros, garbage, NaN) changes neither the outputs nor the running statistics.
"""
from __future__ import annotations

import torch
from torch import nn

from ptls_meles.batch import PaddedBatch

TIME_FIELD = "event_time"


class BatchFieldError(ValueError):
    """A field the encoder needs is missing from the batch."""


class MaskedBatchNorm(nn.Module):
    """BatchNorm over the feature axis of ``[B, T, F]`` that sees only real events.

    Plain BatchNorm would average in the padding zeros, so its statistics (and thus the
    embedding of a client) would depend on how much padding shares the batch.
    """

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.num_features = num_features
        self.momentum = momentum
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, T, F]``, ``mask``: ``[B, T]`` bool (True = real). Padded outputs are 0."""
        keep = mask.unsqueeze(-1)
        x = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
        if self.training:
            count = mask.sum()
            n = count.clamp(min=1).to(x.dtype)
            mean = x.sum(dim=(0, 1)) / n
            centred = torch.where(keep, x - mean, torch.zeros((), dtype=x.dtype, device=x.device))
            var = centred.pow(2).sum(dim=(0, 1)) / n
            with torch.no_grad():  # an all-padding batch leaves the running stats alone
                step = (count > 0).to(self.running_mean.dtype) * self.momentum
                unbiased = var * (n / (n - 1).clamp(min=1))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), step)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), step)
        else:
            mean, var = self.running_mean.to(x.dtype), self.running_var.to(x.dtype)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight + self.bias
        return torch.where(keep, y, torch.zeros((), dtype=y.dtype, device=y.device))


def time_deltas(event_time: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log1p`` of the gap to the previous event, 0 for the first event and for padding.

    Computed in float64 so large absolute timestamps (e.g. Unix seconds) keep their gaps;
    negative gaps (unsorted input) are clipped to 0.
    """
    t = event_time.to(torch.float64)
    delta = torch.zeros_like(t)
    delta[:, 1:] = t[:, 1:] - t[:, :-1]
    delta = torch.where(mask, delta, torch.zeros((), dtype=t.dtype, device=t.device))
    return torch.log1p(delta.clamp(min=0)).to(torch.float32)


class EventEncoder(nn.Module):
    """Concatenates per-field embeddings, batch-normed numbers and optional time gaps.

    ``categorical`` maps field -> ``(vocab_size, embedding_dim)``; id 0 is padding and
    embeds to zeros. ``numeric`` lists float fields already transformed (e.g. signed log);
    the masked BatchNorm makes their raw scale irrelevant.
    """

    def __init__(
        self,
        categorical: dict[str, tuple[int, int]],
        numeric: list[str],
        time_features: bool = False,
    ):
        super().__init__()
        if not categorical and not numeric and not time_features:
            raise ValueError("EventEncoder needs at least one field, got categorical={}, numeric=[]")
        self.categorical_fields = list(categorical)
        self.numeric_fields = list(numeric)
        self.time_features = time_features
        self.embeddings = nn.ModuleDict(
            {name: nn.Embedding(vocab, dim, padding_idx=0) for name, (vocab, dim) in categorical.items()}
        )
        n_scaled = len(self.numeric_fields) + int(time_features)
        self.numeric_norm = MaskedBatchNorm(n_scaled) if n_scaled else None
        self._output_size = sum(dim for _, dim in categorical.values()) + n_scaled

    @property
    def output_size(self) -> int:
        return self._output_size

    def _field(self, batch: PaddedBatch, name: str) -> torch.Tensor:
        try:
            return batch.payload[name]
        except KeyError:
            raise BatchFieldError(
                f"field {name!r} is missing from the batch; present fields: {sorted(batch.payload)}"
            ) from None

    def forward(self, batch: PaddedBatch) -> torch.Tensor:
        """``[B, T, output_size]`` float32, zeros at padded positions."""
        mask = batch.mask()
        parts = [
            emb(self._field(batch, name).masked_fill(~mask, 0))
            for name, emb in self.embeddings.items()
        ]
        if self.numeric_norm is not None:
            columns = [self._field(batch, name).to(torch.float32) for name in self.numeric_fields]
            if self.time_features:
                columns.append(time_deltas(self._field(batch, TIME_FIELD), mask))
            parts.append(self.numeric_norm(torch.stack(columns, dim=-1), mask))
        return torch.cat(parts, dim=-1)
