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
from ptls_meles.nn.event_encoder import TIME_FIELD, time_deltas


class NextEventHead(nn.Module):
    def __init__(self, hidden_size: int, category_field: str | None, vocab_size: int, numeric_fields: list[str],
                 predict_gap: bool):
        super().__init__()
        self.category_field = category_field
        self.numeric_fields = list(numeric_fields)
        self.predict_gap = predict_gap
        self.category = nn.Linear(hidden_size, vocab_size) if category_field else None
        n_reg = len(self.numeric_fields) + int(predict_gap)
        self.regression = nn.Linear(hidden_size, n_reg) if n_reg else None

    def forward(self, sequence: torch.Tensor, batch: PaddedBatch) -> torch.Tensor:
        """Mean cross-entropy of the next category plus mean squared error of the next
        event's standardised numbers (and log gap) over every event that has a successor."""
        mask = batch.mask()
        has_next = mask[:, 1:]
        if not bool(has_next.any()):
            return sequence.sum() * 0.0
        h = sequence[:, :-1][has_next]
        loss = sequence.new_zeros(())
        if self.category is not None:
            target = batch.payload[self.category_field][:, 1:][has_next].long()
            loss = loss + F.cross_entropy(self.category(h), target)
        if self.regression is not None:
            columns = [batch.payload[name].to(torch.float32) for name in self.numeric_fields]
            if self.predict_gap:
                columns.append(time_deltas(batch.payload[TIME_FIELD], mask))
            target = torch.stack(columns, dim=-1)[:, 1:][has_next]
            target = torch.nan_to_num(target, nan=0.0)
            # per-batch standardisation: every number weighs the same whatever its unit
            target = (target - target.mean(0)) / target.std(0, unbiased=False).clamp(min=1e-3)
            loss = loss + F.mse_loss(self.regression(h), target.clamp(-10, 10))
        return loss
