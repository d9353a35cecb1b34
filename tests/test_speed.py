"""The speed work keeps the numbers: fused pooling and grouped GRU calls give what the plain formulas give."""
from __future__ import annotations

import itertools

import pytest
import torch

from ptls_meles.nn.pooling import POOLING_PARTS, SequencePooling


def _pooled_by_formula(pool: SequencePooling, out: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The pooling written out with masks, differentiated by autograd."""
    real = torch.arange(out.shape[1])[None, :] < lengths[:, None]
    keep = real.unsqueeze(-1)
    parts = []
    for part in pool.parts:
        if part == "last":
            parts.append(out[torch.arange(len(lengths)), lengths - 1])
        elif part == "mean":
            parts.append(torch.where(keep, out, 0.0).sum(dim=1) / lengths.unsqueeze(-1).to(out.dtype))
        elif part == "max":
            parts.append(torch.where(keep, out, float("-inf")).amax(dim=1))
        else:
            weights = torch.softmax(pool.attention(out).squeeze(-1).masked_fill(~real, float("-inf")), dim=1)
            parts.append((torch.where(keep, out, 0.0) * weights.unsqueeze(-1)).sum(dim=1))
    return torch.cat(parts, dim=-1)


@pytest.mark.parametrize("parts", [",".join(c) for r in (1, 2, 3, 4) for c in itertools.combinations(POOLING_PARTS, r)])
def test_pooling_values_and_gradients_match_the_formulas_with_garbage_in_padding(parts):
    torch.manual_seed(0)
    pool = SequencePooling(parts, 6).double()
    lengths = torch.tensor([1, 7, 3, 7, 5])
    out = torch.randn(5, 7, 6, dtype=torch.float64)
    out[torch.arange(7)[None, :] >= lengths[:, None]] = float("nan")  # padding must not leak in
    out.requires_grad_()
    got, expected = pool(out, lengths), _pooled_by_formula(pool, out, lengths)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, expected, atol=1e-12)
    upstream = torch.randn_like(got)
    (grad_got,) = torch.autograd.grad(got, out, upstream)
    (grad_expected,) = torch.autograd.grad(expected, out, upstream)
    assert torch.allclose(torch.nan_to_num(grad_got), torch.nan_to_num(grad_expected), atol=1e-12)
    assert (grad_got[torch.arange(7)[None, :] >= lengths[:, None]] == 0).all()  # no gradient into padding
