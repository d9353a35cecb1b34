"""Per-category pooling: the per-event states of each frequent category, pooled apart.

Why: the strongest hand-crafted features are per category (a lab value's last and mean
level, a merchant type's typical amount), while mean / max / last pooling mixes every
category into one vector, where a rare parameter's last value is hard to keep. Here the
states of the ``n_categories`` most frequent values of the first categorical field (ids
2.. in the frequency-ordered vocabulary) and of all other values together are projected to
``width`` learned dimensions and pooled apart, by their mean and by their last occurrence.
It is pooling over learned event representations: each event's state has read its
neighbours through the sequence encoder, and the projection is trained by the objectives.
"""
from __future__ import annotations

import torch
from torch import nn

#: the first frequent category's id in a frequency-ordered vocabulary (0 = padding, 1 = unseen)
FIRST_VALUE_ID = 2


class CategoryPooling(nn.Module):
    """``forward(states [B, T, H], ids [B, T], lengths [B]) -> [B, 2 * (n_categories + 1) * width]``:
    per slot (each frequent category, then "any other"), the mean of its events' projected
    states, then the projected state at its last event; zeros for a slot without events."""

    def __init__(self, state_size: int, n_categories: int, width: int = 8):
        super().__init__()
        if n_categories < 1:
            raise ValueError(f"category pooling needs at least one category, got {n_categories}")
        self.n_categories, self.width = n_categories, width
        self.project = nn.Linear(state_size, width)

    @property
    def output_size(self) -> int:
        return 2 * (self.n_categories + 1) * self.width

    def forward(self, states: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        batch, steps, _ = states.shape
        slots = self.n_categories + 1
        real = torch.arange(steps, device=states.device)[None, :] < lengths[:, None]
        # padding may hold garbage (even NaN): zero it before the projection, so no gradient reads it
        states = torch.where(real.unsqueeze(-1), states, states.new_zeros(()))
        z = self.project(states).float() * real.unsqueeze(-1)  # [B, T, W]; sums in float32 under bf16
        slot = ids[:, :steps].long() - FIRST_VALUE_ID
        slot = torch.where((slot < 0) | (slot >= self.n_categories), self.n_categories, slot)  # "any other"
        index = slot.unsqueeze(-1).expand(batch, steps, self.width)
        sums = z.new_zeros(batch, slots, self.width).scatter_add_(1, index, z)
        counts = z.new_zeros(batch, slots).scatter_add_(1, slot, real.float())
        mean = sums / counts.clamp(min=1).unsqueeze(-1)
        position = torch.where(real, torch.arange(steps, device=states.device)[None, :], -1)
        last_at = torch.full((batch, slots), -1, dtype=torch.long, device=states.device)
        last_at = last_at.scatter_reduce(1, slot, position, reduce="amax")
        last = z.gather(1, last_at.clamp(min=0).unsqueeze(-1).expand(batch, slots, self.width))
        last = last * (last_at >= 0).unsqueeze(-1)
        return torch.cat([mean.flatten(1), last.flatten(1)], dim=1)
