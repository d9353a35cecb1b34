"""Auxiliary generative objective: from the state after event t, predict event t+1.

Contrastive views teach what is stable about a client; predicting the next event's
category, numbers and gap makes the states also carry the dynamics (what tends to come
next and when), which aggregates cannot express. Used beside the metric loss.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ptls_meles.batch import PaddedBatch
from ptls_meles.nn.event_encoder import TIME_FIELD, category_value_moments, time_deltas


class NextEventHead(nn.Module):
    """``forward(sequence, batch) -> loss``: cross-entropy of the next event's category of
    the first categorical field, plus squared error of its numbers and log gap.

    A number is scored standardised within the next event's own category (moments set by
    :meth:`fit_value_moments`): one numeric column often holds many kinds of measurement
    (PhysioNet's ``value`` holds heart rates, pH and urine volumes), and standardised over
    the batch the target would mostly say *which* kind comes next, repeating the category
    term, with the largest kinds drowning the rest. Within its category it says whether the
    next value is high or low for its kind. Without a categorical field, and for the gap,
    the batch standardises. The moments are refitted from the store at every training start
    (only training reads this head), so they are not saved with the weights."""

    def __init__(self, hidden_size: int, category_field: str | None, vocab_size: int, numeric_fields: list[str],
                 predict_gap: bool):
        super().__init__()
        self.category_field = category_field
        self.numeric_fields = list(numeric_fields)
        self.predict_gap = predict_gap
        self.category = nn.Linear(hidden_size, vocab_size) if category_field else None
        n_reg = len(self.numeric_fields) + int(predict_gap)
        self.regression = nn.Linear(hidden_size, n_reg) if n_reg else None
        by_category = (len(self.numeric_fields), vocab_size if category_field else 0)
        self.register_buffer("value_mean", torch.zeros(by_category), persistent=False)
        self.register_buffer("value_std", torch.ones(by_category), persistent=False)

    def fit_value_moments(self, columns: dict) -> None:
        """Per-category mean and std of each number over flat store columns."""
        if self.category_field and self.numeric_fields:
            mean, std = category_value_moments(columns, self.category_field, self.numeric_fields, self.value_mean.shape[1])
            self.value_mean.copy_(mean)
            self.value_std.copy_(std)

    def forward(self, sequence: torch.Tensor, batch: PaddedBatch) -> torch.Tensor:
        """Mean cross-entropy of the next category plus mean squared error of the next
        event's standardised numbers (and log gap) over every event that has a successor;
        a missing number is left out of the error, not scored as a zero."""
        mask = batch.mask()
        has_next = mask[:, 1:]
        if not bool(has_next.any()):
            return sequence.sum() * 0.0
        h = sequence[:, :-1][has_next]
        loss = sequence.new_zeros(())
        if self.category is not None:
            next_category = batch.payload[self.category_field][:, 1:][has_next].long()
            loss = loss + F.cross_entropy(self.category(h), next_category)
        if self.regression is None:
            return loss
        columns = []
        for i, name in enumerate(self.numeric_fields):
            x = batch.payload[name][:, 1:][has_next].to(torch.float32)
            if self.category is not None:
                x = (x - self.value_mean[i][next_category]) / self.value_std[i][next_category]
            else:
                x = _batch_standardised(x)
            columns.append(x)
        if self.predict_gap:
            columns.append(_batch_standardised(time_deltas(batch.payload[TIME_FIELD], mask)[:, 1:][has_next]))
        target = torch.stack(columns, dim=-1)
        known = torch.isfinite(target)
        if bool(known.any()):
            pred = self.regression(h)
            loss = loss + F.mse_loss(pred[known], target[known].clamp(-10, 10))
        return loss


def _batch_standardised(x: torch.Tensor) -> torch.Tensor:
    """``x`` standardised by its finite entries' batch mean and std (every number weighs the
    same whatever its unit); non-finite entries stay non-finite."""
    finite = torch.isfinite(x)
    if not bool(finite.any()):
        return x
    mean = x[finite].mean()
    std = x[finite].std(unbiased=False).clamp(min=1e-3)
    return (x - mean) / std
