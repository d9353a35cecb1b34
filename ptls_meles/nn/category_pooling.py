"""Per-category pooling: the per-event states of each frequent category, pooled apart.

Why: the strongest hand-crafted features are per category (a lab value's last and mean
level, a merchant type's typical amount), while mean / max / last pooling mixes every
category into one vector, where a rare parameter's last value is hard to keep. Here the
states of the ``n_categories`` most frequent values of the first categorical field (ids
2.. in the frequency-ordered vocabulary) and of all other values together are projected to
``width`` learned dimensions and pooled apart, by their mean and by their last occurrence,
and optionally by their ``share``: the slot's sum divided by the sequence's length, so the
projection's bias carries how often the category occurs (a mean forgets counts) while the
measure stays the same for a short training view and a whole history; and by their ``max``,
each projected dimension's largest value over the category's events, which keeps the
extremes a mean averages away (a dimension that falls with a lab value gives its minimum).
The share may count more categories (``share_categories``) than the other statistics: how
often a rare category occurs is one number worth keeping, while its mean and last states
would give the objective a slot per rare category to fit.
It is pooling over learned event representations: each event's state has read its
neighbours through the sequence encoder, and the projection is trained by the objectives.
"""
from __future__ import annotations

import torch
from torch import nn

#: the first frequent category's id in a frequency-ordered vocabulary (0 = padding, 1 = unseen)
FIRST_VALUE_ID = 2
#: the statistics a slot can be pooled by, in the order they appear in the output
STATISTICS = ("mean", "last", "share", "max")


class CategoryPooling(nn.Module):
    """``forward(states [B, T, H], ids [B, T], lengths [B]) -> [B, output_size]``:
    per statistic (in :data:`STATISTICS` order), per slot (each frequent category, then "any
    other"): the mean of its events' projected states, the projected state at its last event,
    the sum of its projected states over the sequence's length, their elementwise maximum;
    zeros for a slot without events. The share has ``share_categories`` + 1 slots (None: as
    many as the others), the others ``n_categories`` + 1, each ``width`` wide."""

    def __init__(self, state_size: int, n_categories: int, width: int = 8,
                 statistics: tuple[str, ...] = ("mean", "last"), share_categories: int | None = None):
        super().__init__()
        if n_categories < 1:
            raise ValueError(f"category pooling needs at least one category, got {n_categories}")
        unknown = [s for s in statistics if s not in STATISTICS]
        if unknown or not statistics:
            raise ValueError(f"category pooling statistics must be some of {STATISTICS}, got {statistics}")
        share_categories = n_categories if share_categories is None else share_categories
        if share_categories < 1:
            raise ValueError(f"category pooling's share needs at least one category, got {share_categories}")
        self.n_categories, self.share_categories, self.width = n_categories, share_categories, width
        self.statistics = tuple(s for s in STATISTICS if s in statistics)
        self.project = nn.Linear(state_size, width)

    @property
    def statistic_sizes(self) -> dict[str, int]:
        """Statistic -> its number of output columns, in output order."""
        return {s: ((self.share_categories if s == "share" else self.n_categories) + 1) * self.width
                for s in self.statistics}

    @property
    def output_size(self) -> int:
        return sum(self.statistic_sizes.values())

    @staticmethod
    def slots(ids: torch.Tensor, n_categories: int) -> torch.Tensor:
        """Each event's slot: ids 2.. -> 0.. for the ``n_categories`` most frequent, the rest -> ``n_categories``."""
        slot = ids.long() - FIRST_VALUE_ID
        return torch.where((slot < 0) | (slot >= n_categories), n_categories, slot)

    def forward(self, states: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        batch, steps, _ = states.shape
        slots = self.n_categories + 1
        real = torch.arange(steps, device=states.device)[None, :] < lengths[:, None]
        # padding may hold garbage (even NaN): zero it before the projection, so no gradient reads it
        states = torch.where(real.unsqueeze(-1), states, states.new_zeros(()))
        z = self.project(states).float() * real.unsqueeze(-1)  # [B, T, W]; sums in float32 under bf16
        slot = self.slots(ids[:, :steps], self.n_categories)
        index = slot.unsqueeze(-1).expand(batch, steps, self.width)
        sums = z.new_zeros(batch, slots, self.width).scatter_add_(1, index, z)
        counts = z.new_zeros(batch, slots).scatter_add_(1, slot, real.float())
        out = {"mean": sums / counts.clamp(min=1).unsqueeze(-1)}
        if "share" in self.statistics:
            share_sums = sums
            if self.share_categories != self.n_categories:
                share_slot = self.slots(ids[:, :steps], self.share_categories)
                share_sums = z.new_zeros(batch, self.share_categories + 1, self.width).scatter_add_(
                    1, share_slot.unsqueeze(-1).expand(batch, steps, self.width), z)
            out["share"] = share_sums / lengths.clamp(min=1).to(sums.dtype)[:, None, None]
        if "max" in self.statistics:
            lowest = torch.finfo(z.dtype).min
            highest = z.new_full((batch, slots, self.width), lowest).scatter_reduce(
                1, index, torch.where(real.unsqueeze(-1), z, z.new_full((), lowest)), reduce="amax")
            out["max"] = torch.where(counts.unsqueeze(-1) > 0, highest, z.new_zeros(()))
        if "last" not in self.statistics:
            return torch.cat([out[s].flatten(1) for s in self.statistics], dim=1)
        position = torch.where(real, torch.arange(steps, device=states.device)[None, :], -1)
        last_at = torch.full((batch, slots), -1, dtype=torch.long, device=states.device)
        last_at = last_at.scatter_reduce(1, slot, position, reduce="amax")
        last = z.gather(1, last_at.clamp(min=0).unsqueeze(-1).expand(batch, slots, self.width))
        out["last"] = last * (last_at >= 0).unsqueeze(-1)
        return torch.cat([out[s].flatten(1) for s in self.statistics], dim=1)
