"""Several trained embedders read as one: their embeddings side by side."""
from __future__ import annotations

import torch
from torch import nn

from ptls_meles.batch import PaddedBatch


class SideBySide(nn.Module):
    """``forward(batch) -> [B, D_1 + ... + D_k]``: each member's embedding of the same batch, in
    member order, so models trained apart (other seeds or settings, one core each) are read as
    one table by every embedding path (local, chunked, streamed to Parquet)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"side by side needs at least two embedders, got {len(members)}")
        self.members = nn.ModuleList(members)

    @property
    def output_size(self) -> int:
        return sum(m.output_size for m in self.members)

    def forward(self, batch: PaddedBatch) -> torch.Tensor:
        return torch.cat([m(batch) for m in self.members], dim=1)
