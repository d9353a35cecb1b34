"""Event encoder: one vector per event from categorical ids, numbers and (optionally) time gaps.

Padding never leaks in: padded positions are cleaned before any arithmetic and the numeric
scaling statistics are taken over real events only, so whatever sits in the padded slots
(zeros, garbage, NaN) changes neither the outputs nor the running statistics.
"""
from __future__ import annotations

import math

import numpy as np
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


def time_scalars(event_time: torch.Tensor, mask: torch.Tensor, parts: tuple[str, ...]) -> list[torch.Tensor]:
    """The scalar time features named in ``parts`` (``[B, T]`` float32 each, 0 on padding):
    ``gap`` log1p of the gap to the previous event, ``elapsed`` log1p of the time since the
    sequence's first event, ``absolute`` the event time itself (scaled later by BatchNorm)."""
    t = event_time.to(torch.float64)
    zero = torch.zeros((), dtype=t.dtype, device=t.device)
    out = []
    if "gap" in parts:
        out.append(time_deltas(event_time, mask))
    if "elapsed" in parts:
        elapsed = torch.where(mask, t - t[:, :1], zero).clamp(min=0)
        out.append(torch.log1p(elapsed).to(torch.float32))
    if "absolute" in parts:
        out.append(torch.where(mask, t, zero).to(torch.float32))
    return out


SECONDS_PER_DAY = 86_400.0


def daytime_features(event_time: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T, 4]``: sin/cos of the time of day and of the day of the week, for times in
    seconds (timestamps, ``d hh:mm:ss``). Periodic, so 23:59 sits next to 00:00."""
    t = event_time.to(torch.float64)
    day_angle = 2 * math.pi * torch.remainder(t, SECONDS_PER_DAY) / SECONDS_PER_DAY
    week_angle = 2 * math.pi * torch.remainder(torch.floor(t / SECONDS_PER_DAY), 7.0) / 7.0
    feats = torch.stack([day_angle.sin(), day_angle.cos(), week_angle.sin(), week_angle.cos()], dim=-1)
    return torch.where(mask.unsqueeze(-1), feats, torch.zeros((), dtype=feats.dtype, device=feats.device)).to(torch.float32)


class PeriodicEncoding(nn.Module):
    """Each scalar ``x`` -> ``ReLU(Linear([sin(2π c x), cos(2π c x)]))`` with learned
    frequencies ``c`` (Gorishniy et al. 2022, "On Embeddings for Numerical Features"):
    lets the network read thresholds and bands of a value instead of one slope."""

    def __init__(self, n_features: int, out_dim: int, n_frequencies: int = 16, sigma: float = 1.0):
        super().__init__()
        self.frequencies = nn.Parameter(torch.randn(n_features, n_frequencies) * sigma)
        self.linear = nn.ModuleList(nn.Linear(2 * n_frequencies, out_dim) for _ in range(n_features))
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, F]`` -> ``[B, T, F * out_dim]``."""
        angles = 2 * math.pi * x.unsqueeze(-1) * self.frequencies
        periodic = torch.cat([angles.sin(), angles.cos()], dim=-1)  # [B, T, F, 2k]
        return torch.cat([torch.relu(lin(periodic[..., i, :])) for i, lin in enumerate(self.linear)], dim=-1)


@torch.no_grad()
def category_value_moments(columns: dict, category_field: str, numeric_fields: list[str],
                           vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n_numeric, vocab]`` mean and std of each number within each category of
    ``category_field`` over flat store columns; categories with < 2 values get 0 / 1."""
    ids = torch.from_numpy(np.asarray(columns[category_field], dtype=np.int64))
    means, stds = [], []
    for name in numeric_fields:
        x = torch.from_numpy(np.asarray(columns[name], dtype=np.float64))
        ok = torch.isfinite(x)
        c, v = ids[ok], x[ok]
        n = torch.bincount(c, minlength=vocab).double()
        s = torch.bincount(c, weights=v, minlength=vocab)
        mean = torch.where(n > 0, s / n.clamp(min=1), torch.zeros_like(s))
        sq = torch.bincount(c, weights=(v - mean[c]) ** 2, minlength=vocab)
        std = torch.sqrt(sq / (n - 1).clamp(min=1))
        means.append(mean.float())
        stds.append(torch.where((n > 1) & (std > 1e-6), std, torch.ones_like(std)).float())
    empty = torch.zeros(0, vocab)
    return (torch.stack(means) if means else empty), (torch.stack(stds) if stds else empty + 1)


@torch.no_grad()
def category_value_edges(columns: dict, category_field: str, numeric_fields: list[str], vocab: int,
                         n_bins: int, max_rows: int = 2_000_000) -> torch.Tensor:
    """``[n_numeric, vocab, n_bins + 1]`` quantile edges of each number within each category of
    ``category_field`` over flat store columns (every ``k``-th row past ``max_rows``: quantiles
    need no more). A category with fewer than ``2 * n_bins`` finite values takes the edges of the
    whole column; one sort per number, no loop over categories."""
    ids = np.asarray(columns[category_field], dtype=np.int64)
    step = max(1, -(-len(ids) // max_rows))
    ids = ids[::step]
    q = np.linspace(0.0, 1.0, n_bins + 1)
    out = np.zeros((len(numeric_fields), vocab, n_bins + 1), dtype=np.float64)
    for i, name in enumerate(numeric_fields):
        x = np.asarray(columns[name], dtype=np.float64)[::step]
        ok = np.isfinite(x)
        c, v = ids[ok], x[ok]
        if not len(v):
            out[i] = np.linspace(-1.0, 1.0, n_bins + 1)
            continue
        out[i] = np.quantile(v, q)
        order = np.lexsort((v, c))
        v = v[order]
        counts = np.bincount(c, minlength=vocab)[:vocab]
        starts = np.cumsum(counts) - counts
        enough = counts >= 2 * n_bins
        positions = starts[enough, None] + np.floor(q * (counts[enough, None] - 1)).astype(np.int64)
        out[i, enough] = v[positions]
    return torch.from_numpy(out).float()


class EventEncoder(nn.Module):
    """One vector per event: per-field category embeddings, numbers and time features.

    ``categorical`` maps field -> ``(vocab_size, embedding_dim)``; id 0 is padding and
    embeds to zeros. ``numeric`` lists float fields already transformed (e.g. signed log).
    ``numeric_encoding`` (any of):

    - ``scalar``: the numbers, scaled by a masked BatchNorm, as plain inputs;
    - ``by_category``: the number standardised within its event's category of the first
      categorical field (moments set by :meth:`fit_value_moments`) scales a learned
      vector of that category: "120" is then read differently for heart rate and glucose;
    - ``periodic``: a learned periodic encoding of each (scaled) number;
    - ``piecewise``: a piecewise-linear encoding of the number within its event's category
      (Gorishniy et al. 2022): ``piecewise_bins`` bins between the category's quantiles (set by
      :meth:`fit_value_moments`), each filled 0..1 by the value, weigh learned vectors of that
      category, so each category reads its numbers through its own piecewise-linear curve and
      thresholds such as "creatinine above normal" need no depth to find.

    ``time_features`` (any of): ``gap``, ``elapsed``, ``absolute`` (scalars, BatchNorm) and
    ``daytime`` (time of day / day of week; needs times in seconds).
    """

    def __init__(
        self,
        categorical: dict[str, tuple[int, int]],
        numeric: list[str],
        time_features: bool | tuple[str, ...] = (),
        numeric_encoding: tuple[str, ...] = ("scalar",),
        periodic_dim: int = 16,
        piecewise_bins: int = 8,
    ):
        super().__init__()
        if isinstance(time_features, bool):
            time_features = ("gap",) if time_features else ()
        if not categorical and not numeric and not time_features:
            raise ValueError("EventEncoder needs at least one field, got categorical={}, numeric=[]")
        self.categorical_fields = list(categorical)
        self.numeric_fields = list(numeric)
        self.time_parts = tuple(p for p in ("gap", "elapsed", "absolute") if p in time_features)
        self.daytime = "daytime" in time_features
        self.numeric_encoding = tuple(numeric_encoding)
        self.embeddings = nn.ModuleDict(
            {name: nn.Embedding(vocab, dim, padding_idx=0) for name, (vocab, dim) in categorical.items()}
        )
        size = sum(dim for _, dim in categorical.values())
        n_numeric = len(self.numeric_fields)
        self.by_category = "by_category" in self.numeric_encoding and n_numeric > 0 and bool(categorical)
        if self.by_category:
            vocab, dim = next(iter(categorical.values()))
            self.value_vectors = nn.Embedding(vocab, dim * n_numeric, padding_idx=0)
            nn.init.normal_(self.value_vectors.weight, std=0.1)
            self.register_buffer("value_mean", torch.zeros(n_numeric, vocab))
            self.register_buffer("value_std", torch.ones(n_numeric, vocab))
            size += dim * n_numeric
        self.piecewise = "piecewise" in self.numeric_encoding and n_numeric > 0 and bool(categorical)
        if self.piecewise:
            vocab, dim = next(iter(categorical.values()))
            self.piecewise_bins = piecewise_bins
            self.bin_vectors = nn.Embedding(vocab, n_numeric * piecewise_bins * dim, padding_idx=0)
            nn.init.normal_(self.bin_vectors.weight, std=0.1)
            with torch.no_grad():
                self.bin_vectors.weight[0].zero_()
            edges = torch.linspace(-1.0, 1.0, piecewise_bins + 1).expand(n_numeric, vocab, -1)
            self.register_buffer("value_edges", edges.clone())
            size += dim * n_numeric
        n_scaled = (n_numeric if "scalar" in self.numeric_encoding or "periodic" in self.numeric_encoding else 0) + len(self.time_parts)
        self.numeric_norm = MaskedBatchNorm(n_scaled) if n_scaled else None
        self._n_scalar_outputs = (n_numeric if "scalar" in self.numeric_encoding else 0) + len(self.time_parts)
        size += self._n_scalar_outputs
        self.periodic = PeriodicEncoding(n_numeric, periodic_dim) if "periodic" in self.numeric_encoding and n_numeric else None
        if self.periodic is not None:
            size += n_numeric * periodic_dim
        size += 4 * int(self.daytime)
        self._output_size = size

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

    def fit_value_moments(self, columns: dict) -> None:
        """Per-category mean/std (``by_category``) and quantile edges (``piecewise``) of every
        numeric field over the given flat store columns (category = the first categorical field)."""
        if self.piecewise:
            self.value_edges.copy_(category_value_edges(columns, self.categorical_fields[0], self.numeric_fields,
                                                        self.value_edges.shape[1], self.piecewise_bins))
        if self.by_category:
            mean, std = category_value_moments(columns, self.categorical_fields[0], self.numeric_fields,
                                               self.value_mean.shape[1])
            self.value_mean.copy_(mean)
            self.value_std.copy_(std)

    def _piecewise(self, batch: PaddedBatch, numbers: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """``[B, T, n_numeric * dim]``: each number's bins (0..1 each, NaN -> all 0) weigh its
        category's learned bin vectors."""
        ids = self._field(batch, self.categorical_fields[0]).masked_fill(~mask, 0)
        x = torch.stack(numbers, dim=-1)  # [B, T, F]
        edges = self.value_edges[:, ids].permute(1, 2, 0, 3)  # [B, T, F, K + 1]
        low, high = edges[..., :-1], edges[..., 1:]
        filled = ((x.unsqueeze(-1) - low) / (high - low).clamp(min=1e-6)).clamp(0.0, 1.0)
        filled = torch.where(mask[..., None, None], torch.nan_to_num(filled, nan=0.0), torch.zeros((), device=x.device))
        vectors = self.bin_vectors(ids).view(*ids.shape, len(numbers), self.piecewise_bins, -1)  # [B, T, F, K, D]
        return torch.matmul(filled.unsqueeze(-2), vectors).squeeze(-2).flatten(-2)

    def forward(self, batch: PaddedBatch) -> torch.Tensor:
        """``[B, T, output_size]`` float32, zeros at padded positions."""
        mask = batch.mask()
        keep = mask.unsqueeze(-1)
        zero = torch.zeros((), device=mask.device)
        parts = [
            emb(self._field(batch, name).masked_fill(~mask, 0))
            for name, emb in self.embeddings.items()
        ]
        numbers = [self._field(batch, name).to(torch.float32) for name in self.numeric_fields]
        if self.by_category:
            ids = self._field(batch, self.categorical_fields[0]).masked_fill(~mask, 0)
            z = torch.stack(
                [(x - self.value_mean[i][ids]) / self.value_std[i][ids] for i, x in enumerate(numbers)], dim=-1
            )
            z = torch.where(keep, torch.nan_to_num(z, nan=0.0).clamp(-10, 10), zero)
            vectors = self.value_vectors(ids).view(*ids.shape, len(numbers), -1)
            parts.append((vectors * z.unsqueeze(-1)).flatten(-2))
        if self.piecewise:
            parts.append(self._piecewise(batch, numbers, mask))
        scalars = []
        if "scalar" in self.numeric_encoding or self.periodic is not None:
            scalars += numbers
        if self.time_parts:
            scalars += time_scalars(self._field(batch, TIME_FIELD), mask, self.time_parts)
        if self.numeric_norm is not None:
            scaled = self.numeric_norm(torch.stack(scalars, dim=-1), mask)
            n_num = len(scalars) - len(self.time_parts)
            if self.periodic is not None:
                periodic = self.periodic(scaled[..., :n_num])
                parts.append(torch.where(keep, periodic, zero))
            if "scalar" in self.numeric_encoding:
                parts.append(scaled)
            elif self.time_parts:
                parts.append(scaled[..., n_num:])
        if self.daytime:
            parts.append(daytime_features(self._field(batch, TIME_FIELD), mask))
        return torch.cat(parts, dim=-1)
