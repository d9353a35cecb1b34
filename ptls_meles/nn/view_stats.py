"""Auxiliary objective: from one view's embedding, predict the statistics of the client's other views.

The pair loss only asks that views of one client lie close; nothing asks the embedding to
keep *what* the client does. Predicting the other views' category shares, per-category
mean values and event rate (never the own view's: that would reward copying) makes the
embedding carry the client's stable habits, learned from the sequence — the information
hand-crafted aggregates hold — while the pair loss keeps what aggregates miss.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ptls_meles.batch import PaddedBatch
from ptls_meles.nn.event_encoder import TIME_FIELD, category_value_moments, time_deltas


def other_views(sums: torch.Tensor, counts: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each view's target: the pooled statistic (sum / count) of the *other* views with its
    label, and where it is defined (count > 0)."""
    n_clients = int(labels.max()) + 1
    total_s = torch.zeros(n_clients, sums.shape[1], device=sums.device).index_add_(0, labels, sums)
    total_c = torch.zeros(n_clients, sums.shape[1], device=sums.device).index_add_(0, labels, counts)
    other_s, other_c = total_s[labels] - sums, total_c[labels] - counts
    known = other_c > 0.5
    return torch.where(known, other_s / other_c.clamp(min=1e-6), torch.zeros_like(other_s)), known


class ViewStatsHead(nn.Module):
    """``forward(embeddings, batch, labels) -> loss``.

    ``vocab_sizes``: categorical field -> vocabulary size (shares are predicted for each);
    the per-category means of ``numeric_fields`` use the first field's categories. A view's
    targets average the client's *other* views in the batch (views with one view are skipped).
    """

    def __init__(self, embedding_size: int, vocab_sizes: dict[str, int], numeric_fields: list[str], use_time: bool):
        super().__init__()
        self.vocab_sizes = dict(vocab_sizes)
        self.numeric_fields = list(numeric_fields)
        self.mean_field = next(iter(self.vocab_sizes), None) if self.numeric_fields else None
        self.use_time = use_time
        n_means = len(self.numeric_fields) * self.vocab_sizes[self.mean_field] if self.mean_field else 0
        n_out = sum(self.vocab_sizes.values()) + n_means + int(use_time)
        if not n_out:
            raise ValueError("aux_objective 'view_stats' needs a categorical field, or a numeric field with one, or time")
        self.body = nn.Sequential(nn.Linear(embedding_size, embedding_size), nn.ReLU())
        self.out = nn.Linear(embedding_size, n_out)
        # per-category value moments (fit_value_moments): values are compared within their
        # category, as hand-crafted features would
        means_vocab = self.vocab_sizes[self.mean_field] if self.mean_field else 0
        self.register_buffer("value_mean", torch.zeros(len(self.numeric_fields), means_vocab))
        self.register_buffer("value_std", torch.ones(len(self.numeric_fields), means_vocab))

    def fit_value_moments(self, columns: dict) -> None:
        if self.mean_field is not None:
            mean, std = category_value_moments(columns, self.mean_field, self.numeric_fields, self.value_mean.shape[1])
            self.value_mean.copy_(mean)
            self.value_std.copy_(std)

    def view_statistics(self, batch: PaddedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per view: ``sums [N, K]`` and ``counts [N, K]`` whose ratio is each statistic
        (share of each category, mean standardised value per category, mean log gap)."""
        mask = batch.mask()
        n = mask.shape[0]
        length = batch.lengths.to(torch.float32).clamp(min=1)
        sums, counts = [], []
        for name, vocab in self.vocab_sizes.items():
            ids = batch.payload[name].masked_fill(~mask, 0)
            hist = torch.zeros(n, vocab, device=ids.device).scatter_add_(1, ids, mask.to(torch.float32))
            sums.append(hist)
            counts.append(length[:, None].expand(n, vocab))
        if self.mean_field is not None:
            ids = batch.payload[self.mean_field].masked_fill(~mask, 0)
            vocab = self.vocab_sizes[self.mean_field]
            for i, name in enumerate(self.numeric_fields):
                x = batch.payload[name].to(torch.float32)
                z = ((x - self.value_mean[i][ids]) / self.value_std[i][ids]).clamp(-10, 10)
                seen = mask & torch.isfinite(z)  # a missing value is not counted as a zero
                z = torch.where(seen, z, torch.zeros_like(z))
                sums.append(torch.zeros(n, vocab, device=ids.device).scatter_add_(1, ids, z))
                counts.append(torch.zeros(n, vocab, device=ids.device).scatter_add_(1, ids, seen.to(torch.float32)))
        if self.use_time:
            gaps = time_deltas(batch.payload[TIME_FIELD], mask)  # log1p gaps, 0 for the first event
            sums.append((gaps * mask).sum(1, keepdim=True))
            counts.append((batch.lengths - 1).clamp(min=0).to(torch.float32)[:, None])
        return torch.cat(sums, 1), torch.cat(counts, 1)

    def forward(self, embeddings: torch.Tensor, batch: PaddedBatch, labels: torch.Tensor) -> torch.Tensor:
        target, known = other_views(*self.view_statistics(batch), labels)
        pred = self.out(self.body(embeddings))
        loss = embeddings.new_zeros(())
        start = 0
        for vocab in self.vocab_sizes.values():  # shares: cross-entropy against the other views' mix
            p, t, k = pred[:, start:start + vocab], target[:, start:start + vocab], known[:, start]
            if bool(k.any()):
                loss = loss + F.kl_div(F.log_softmax(p[k], -1), t[k], reduction="batchmean")
            start += vocab
        rest_p, rest_t, rest_k = pred[:, start:], target[:, start:], known[:, start:]
        if rest_p.shape[1] and bool(rest_k.any()):  # means: squared error where the other views saw the category
            loss = loss + F.mse_loss(rest_p[rest_k], rest_t[rest_k])
        return loss
