"""Retrieval metrics for self-supervised validation."""
from __future__ import annotations

import torch


def recall_at_k(embeddings: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Share of each view's ``k`` nearest other views (cosine) that come from the same client.

    With ``split_count`` views per client and ``k = split_count - 1`` a perfect encoder
    scores 1.0; chance is about ``k / (n_views - 1)``.
    """
    x = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    sim = x @ x.T
    sim.fill_diagonal_(-float("inf"))
    k = min(k, len(labels) - 1)
    top = sim.topk(k, dim=1).indices
    return (labels[top] == labels[:, None]).float().mean().item()
