"""Auxiliary objective: from one view's embedding, predict the statistics of the client's other views.

The pair loss only asks that views of one client lie close; nothing asks the embedding to
keep *what* the client does. Predicting the other views' category shares, per-category
mean values and event rate (never the own view's: that would reward copying) makes the
embedding carry the client's stable habits, learned from the sequence — the information
hand-crafted aggregates hold — while the pair loss keeps what aggregates miss.

``statistics`` chooses what is predicted: ``shares`` (of each categorical field's values),
``values`` (mean standardised number per category of the first field), ``deviations`` (mean
*absolute* standardised number per category: how far from typical a client's values lie in
either direction, which a mean of highs and lows cancels — abnormal lab values are abnormal
whether low or high), ``rate`` (mean log gap) and ``gaps`` (how the gaps are spread: shares
of log-gap bins, and the mean standardised log gap before each category's events) — the
timing that value levels miss.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ptls_meles.batch import PaddedBatch
from ptls_meles.nn.event_encoder import TIME_FIELD, category_value_moments, time_deltas

STATISTICS = ("shares", "values", "deviations", "rate", "gaps")
GAP_BINS = 16  # log-gap bins: gaps of 0, then 15 quantile bins of the training data's positive gaps


def other_views(sums: torch.Tensor, counts: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each view's target: the pooled statistic (sum / count) of the *other* views with its
    label, and where it is defined (count > 0)."""
    n_clients = int(labels.max()) + 1
    total_s = torch.zeros(n_clients, sums.shape[1], device=sums.device).index_add_(0, labels, sums)
    total_c = torch.zeros(n_clients, sums.shape[1], device=sums.device).index_add_(0, labels, counts)
    other_s, other_c = total_s[labels] - sums, total_c[labels] - counts
    known = other_c > 0.5
    return torch.where(known, other_s / other_c.clamp(min=1e-6), torch.zeros_like(other_s)), known


def flat_log_gaps(times: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``log1p`` of each event's gap to the previous event of its client over flat store
    columns; NaN for each client's first event (it has no gap)."""
    t = np.asarray(times, dtype=np.float64)
    gaps = np.full(len(t), np.nan)
    if len(t) > 1:
        gaps[1:] = np.log1p(np.clip(np.diff(t), 0, None))
    starts = np.asarray(offsets[:-1], dtype=np.int64)
    gaps[starts[starts < len(t)]] = np.nan
    return gaps


def gap_bin_edges(log_gaps: np.ndarray) -> np.ndarray:
    """``GAP_BINS - 1`` edges: 0 (its own bin for events at the same time as the previous one,
    e.g. several measurements stamped together), then quantiles of the positive gaps, so the
    bins spread over the gaps that differ even where most gaps are 0."""
    positive = log_gaps[np.isfinite(log_gaps) & (log_gaps > 0)]
    if not len(positive):
        return np.zeros(GAP_BINS - 1)
    return np.concatenate([[0.0], np.quantile(positive, np.arange(1, GAP_BINS - 1) / (GAP_BINS - 1))])


class ViewStatsHead(nn.Module):
    """``forward(embeddings, batch, labels) -> loss``.

    ``vocab_sizes``: categorical field -> vocabulary size (shares are predicted for each);
    the per-category means of ``numeric_fields`` (and of gaps) use the first field's
    categories; ``hidden_size`` is the MLP's hidden width (None: ``embedding_size``). A
    view's targets average the client's *other* views in the batch (views with one view
    are skipped). Share blocks are scored by KL divergence, means by squared
    error where the other views saw the category.
    """

    def __init__(self, embedding_size: int, vocab_sizes: dict[str, int], numeric_fields: list[str], use_time: bool,
                 statistics: tuple[str, ...] = ("shares", "values", "rate"), hidden_size: int | None = None):
        super().__init__()
        unknown = sorted(set(statistics) - set(STATISTICS))
        if unknown:
            raise ValueError(f"view statistics {unknown} unknown; choose from {', '.join(STATISTICS)}")
        self.vocab_sizes = dict(vocab_sizes) if "shares" in statistics else {}
        self.mean_field = next(iter(vocab_sizes), None)
        # fields whose per-category moments are fitted: read by values and by deviations
        self.values, self.deviations = "values" in statistics, "deviations" in statistics
        self.numeric_fields = list(numeric_fields) if (self.values or self.deviations) and self.mean_field else []
        self.rate = use_time and "rate" in statistics
        self.gaps = use_time and "gaps" in statistics
        self.mean_vocab = mean_vocab = vocab_sizes[self.mean_field] if self.mean_field else 0
        n_gap_means = mean_vocab if self.gaps else 0  # the mean log gap before each category's events
        self.share_sizes = list(self.vocab_sizes.values()) + ([GAP_BINS] if self.gaps else [])
        n_value_means = len(self.numeric_fields) * mean_vocab * (int(self.values) + int(self.deviations))
        n_out = sum(self.share_sizes) + n_value_means + n_gap_means + int(self.rate)
        if not n_out:
            raise ValueError("aux_objective 'view_stats' needs a categorical field, or a numeric field with one, or time")
        hidden = hidden_size or embedding_size
        self.body = nn.Sequential(nn.Linear(embedding_size, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, n_out)
        # per-category value moments (fit_value_moments): values are compared within their
        # category, as hand-crafted features would
        value_shape = (len(self.numeric_fields), mean_vocab if self.numeric_fields else 0)
        self.register_buffer("value_mean", torch.zeros(value_shape))
        self.register_buffer("value_std", torch.ones(value_shape))
        if self.gaps:
            self.register_buffer("gap_edges", torch.zeros(GAP_BINS - 1))
            self.register_buffer("gap_mean", torch.zeros(n_gap_means))
            self.register_buffer("gap_std", torch.ones(n_gap_means))

    def fit_value_moments(self, columns: dict, offsets: np.ndarray | None = None) -> None:
        """Per-category moments of the numbers (and, with ``gaps``, of the log gaps and the
        log-gap bin edges, which need the store's ``offsets``) over flat store columns."""
        if self.numeric_fields:
            mean, std = category_value_moments(columns, self.mean_field, self.numeric_fields, self.value_mean.shape[1])
            self.value_mean.copy_(mean)
            self.value_std.copy_(std)
        if self.gaps:
            if offsets is None:
                raise ValueError("view statistics 'gaps' need the store's offsets to find each client's first event")
            gaps = flat_log_gaps(columns[TIME_FIELD], offsets)
            self.gap_edges.copy_(torch.from_numpy(gap_bin_edges(gaps)))
            if len(self.gap_mean):
                mean, std = category_value_moments({self.mean_field: columns[self.mean_field], "gap": gaps},
                                                   self.mean_field, ["gap"], len(self.gap_mean))
                self.gap_mean.copy_(mean[0])
                self.gap_std.copy_(std[0])

    def view_statistics(self, batch: PaddedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per view: ``sums [N, K]`` and ``counts [N, K]`` whose ratio is each statistic, in
        the order share blocks (fields, then gap bins), then means (per numeric field its values
        then its deviations per category, gaps per category, mean log gap)."""
        mask = batch.mask()
        n = mask.shape[0]
        weight = mask.to(torch.float32)
        length = batch.lengths.to(torch.float32).clamp(min=1)
        sums, counts = [], []

        def add_per_id(ids: torch.Tensor, values: torch.Tensor, seen: torch.Tensor, size: int) -> None:
            """Sum of ``values`` and count of ``seen`` events per id, for each view."""
            seen = seen.to(torch.float32)
            sums.append(torch.zeros(n, size, device=ids.device).scatter_add_(1, ids, values * seen))
            counts.append(torch.zeros(n, size, device=ids.device).scatter_add_(1, ids, seen))

        for name, vocab in self.vocab_sizes.items():  # shares: count per id over the view's length
            ids = batch.payload[name].masked_fill(~mask, 0)
            sums.append(torch.zeros(n, vocab, device=ids.device).scatter_add_(1, ids, weight))
            counts.append(length[:, None].expand(n, vocab))
        if self.gaps or self.rate:
            gaps = time_deltas(batch.payload[TIME_FIELD], mask)  # log1p gaps, 0 for the first event
            has_gap = mask.clone()
            has_gap[:, 0] = False  # a view's first event has no gap inside the view
            n_gaps = (batch.lengths - 1).clamp(min=0).to(torch.float32)[:, None]
        if self.gaps:  # shares of the gap bins over the view's gaps
            bins = torch.bucketize(gaps, self.gap_edges).masked_fill(~has_gap, 0)
            sums.append(torch.zeros(n, GAP_BINS, device=mask.device).scatter_add_(1, bins, has_gap.to(torch.float32)))
            counts.append(n_gaps.expand(n, GAP_BINS))
        if self.mean_field is not None and (self.numeric_fields or self.gaps):
            ids = batch.payload[self.mean_field].masked_fill(~mask, 0)
        for i, name in enumerate(self.numeric_fields):
            x = batch.payload[name].to(torch.float32)
            z = ((x - self.value_mean[i][ids]) / self.value_std[i][ids]).clamp(-10, 10)
            seen = mask & torch.isfinite(z)  # a missing value is not counted as a zero
            z = torch.where(seen, z, torch.zeros_like(z))
            if self.values:
                add_per_id(ids, z, seen, self.mean_vocab)
            if self.deviations:
                add_per_id(ids, z.abs(), seen, self.mean_vocab)
        if self.gaps and len(self.gap_mean):
            add_per_id(ids, ((gaps - self.gap_mean[ids]) / self.gap_std[ids]).clamp(-10, 10), has_gap, self.mean_vocab)
        if self.rate:
            sums.append((gaps * mask).sum(1, keepdim=True))
            counts.append(n_gaps)
        return torch.cat(sums, 1), torch.cat(counts, 1)

    def forward(self, embeddings: torch.Tensor, batch: PaddedBatch, labels: torch.Tensor) -> torch.Tensor:
        target, known = other_views(*self.view_statistics(batch), labels)
        pred = self.out(self.body(embeddings))
        loss = embeddings.new_zeros(())
        start = 0
        for size in self.share_sizes:  # shares: cross-entropy against the other views' mix
            p, t, k = pred[:, start:start + size], target[:, start:start + size], known[:, start]
            if bool(k.any()):
                loss = loss + F.kl_div(F.log_softmax(p[k], -1), t[k], reduction="batchmean")
            start += size
        rest_p, rest_t, rest_k = pred[:, start:], target[:, start:], known[:, start:]
        if rest_p.shape[1] and bool(rest_k.any()):  # means: squared error where the other views saw the category
            loss = loss + F.mse_loss(rest_p[rest_k], rest_t[rest_k])
        return loss
