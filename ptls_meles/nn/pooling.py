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
        summaries = tuple(p for p in self.parts if p != "attention")
        if not summaries:
            pooled = []
        elif torch.is_grad_enabled() and out.requires_grad:
            pooled = list(_SummaryPooling.apply(out, lengths, summaries))
        else:  # inference (embedding): no arg-max to keep for a backward
            pooled = _summaries(out, lengths, summaries, for_backward=False)[0]
        if self.attention is not None:
            real = torch.arange(out.shape[1], device=out.device)[None, :] < lengths[:, None]
            scores = self.attention(out).squeeze(-1).masked_fill(~real, float("-inf"))
            weights = torch.softmax(scores, dim=1).unsqueeze(-1)
            pooled.append((torch.where(real.unsqueeze(-1), out, out.new_zeros(())) * weights).sum(dim=1))
        return torch.cat(pooled, dim=-1)


class _SummaryPooling(torch.autograd.Function):
    """``last`` / ``mean`` / ``max`` of ``[B, T, H]`` over each row's real steps, with a
    hand-written backward that writes the ``[B, T, H]`` gradient once.

    Autograd through the plain formulas (masked copies for mean and max, ``amax``'s
    tie-splitting backward, a zero-filled tensor per part, then their sum) made ~15 passes
    over the GRU's output and cost ~10% of a GRU-256 training step; here forward makes a
    padding-free copy for the mean and one for the max (as before), and backward
    writes the gradient once (the mean's share) and scatters the last and max entries into
    it. The max passes its gradient to one arg-max step per unit, as ``torch.max(dim)``
    does (``amax`` splits it among exact ties).
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, lengths: torch.Tensor, parts: tuple[str, ...]):
        results, weights, arg_max = _summaries(out, lengths, parts, for_backward=True)
        ctx.parts, ctx.shape = parts, out.shape
        ctx.save_for_backward(lengths, weights, arg_max)
        return tuple(results)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        lengths, weights, arg_max = ctx.saved_tensors
        batch, steps, size = ctx.shape
        grad = dict(zip(ctx.parts, grads))  # unused outputs arrive as zeros (materialised grads)
        if "mean" in grad:
            grad_out = torch.bmm(weights.unsqueeze(2), grad["mean"].unsqueeze(1))  # the one full write
        else:
            grad_out = grads[0].new_zeros(batch, steps, size)
        if "last" in grad:
            rows = torch.arange(batch, device=grad_out.device)
            grad_out.index_put_((rows, lengths - 1), grad["last"], accumulate=True)
        if "max" in grad:
            grad_out.scatter_add_(1, arg_max.unsqueeze(1), grad["max"].unsqueeze(1))
        return grad_out, None, None


def _summaries(out: torch.Tensor, lengths: torch.Tensor, parts: tuple[str, ...], for_backward: bool):
    """``(pooled parts, mean weights [B, T], arg-max [B, H])``; the last two only ``for_backward``."""
    batch, steps, _ = out.shape
    real = torch.arange(steps, device=out.device)[None, :] < lengths[:, None]
    padding = ~real.unsqueeze(-1)  # padding may hold garbage, even NaN: never read it
    results, weights, arg_max = [], None, None
    for part in parts:
        if part == "last":
            results.append(out[torch.arange(batch, device=out.device), lengths - 1])
        elif part == "mean":
            if for_backward:
                weights = real.to(out.dtype) / lengths.unsqueeze(-1).to(out.dtype)
            results.append(torch.where(padding, 0.0, out).sum(dim=1) / lengths.unsqueeze(-1).to(out.dtype))
        else:
            masked = torch.where(padding, float("-inf"), out)
            if for_backward:  # max with indices is ~5x slower than amax: only when training
                values, arg_max = masked.max(dim=1)
            else:
                values = masked.amax(dim=1)
            results.append(values)
    return results, weights, arg_max
