"""Pooling of per-event outputs ``[B, T, H]`` into one client vector.

``last`` is the classic RNN summary; ``mean`` / ``max`` keep what happened earlier in a
long sequence (extremes, typical levels) that the last state may have forgotten;
``attention`` learns which events matter. Parts are concatenated in a fixed order.
"""
from __future__ import annotations

import torch
from torch import nn

POOLING_PARTS = ("last", "mean", "max", "attention")


class SequencePooling(nn.Module):
    def __init__(self, parts: tuple[str, ...] | str, size: int):
        super().__init__()
        if isinstance(parts, str):
            parts = tuple(p for p in parts.split(",") if p)
        bad = [p for p in parts if p not in POOLING_PARTS]
        if bad or not parts:
            raise ValueError(f"pooling {','.join(parts)!r}: parts must be among {', '.join(POOLING_PARTS)}")
        self.parts = tuple(p for p in POOLING_PARTS if p in parts)
        self.size = size
        self.attention = nn.Linear(size, 1) if "attention" in self.parts else None

    @property
    def output_size(self) -> int:
        return self.size * len(self.parts)

    def forward(self, out: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``out`` ``[B, T, H]`` (rows padded after their ``lengths``, lengths >= 1) -> ``[B, H * parts]``."""
        real = torch.arange(out.shape[1], device=out.device)[None, :] < lengths[:, None]
        keep = real.unsqueeze(-1)
        pooled = []
        for part in self.parts:
            if part == "last":
                index = (lengths - 1).view(-1, 1, 1).expand(-1, 1, out.shape[-1])
                pooled.append(out.gather(1, index).squeeze(1))
            elif part == "mean":
                total = torch.where(keep, out, out.new_zeros(())).sum(dim=1)
                pooled.append(total / lengths.clamp(min=1).unsqueeze(-1).to(out.dtype))
            elif part == "max":
                pooled.append(torch.where(keep, out, out.new_full((), float("-inf"))).amax(dim=1))
            else:
                scores = self.attention(out).squeeze(-1).masked_fill(~real, float("-inf"))
                weights = torch.softmax(scores, dim=1).unsqueeze(-1)
                pooled.append((torch.where(keep, out, out.new_zeros(())) * weights).sum(dim=1))
        return torch.cat(pooled, dim=-1)
