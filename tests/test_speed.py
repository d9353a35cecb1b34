"""The speed work keeps the numbers: fused pooling and grouped GRU calls give what the plain formulas give."""
from __future__ import annotations

import itertools

import numpy as np
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
    assert torch.equal(got, expected)  # forward: the same formulas, bitwise
    with torch.no_grad():  # the inference path (embedding) gives the same vectors
        assert torch.allclose(pool(out, lengths), expected, atol=1e-12)
    upstream = torch.randn_like(got)
    (grad_got,) = torch.autograd.grad(got, out, upstream)
    (grad_expected,) = torch.autograd.grad(expected, out, upstream)
    assert torch.allclose(torch.nan_to_num(grad_got), torch.nan_to_num(grad_expected), atol=1e-12)
    assert (grad_got[torch.arange(7)[None, :] >= lengths[:, None]] == 0).all()  # no gradient into padding


@pytest.mark.parametrize("encoder,category_pooling,category_inputs,event_bag",
                         [("gru", 0, "states", 0), ("bag", 0, "states", 0), ("conv", 0, "states", 0),
                          ("conv", 4, "states", 0), ("conv", 4, "states,events", 0), ("conv", 4, "states", 6)])
def test_profile_stages_give_the_gradients_of_the_plain_step(encoder, category_pooling, category_inputs, event_bag):
    """The profile cuts a step at module boundaries; its gradients must be training's."""
    from ptls_meles.bench.profile import _Timers, _staged_step, plain_loss
    from ptls_meles.config import MeLESConfig
    from ptls_meles.datamodule import ViewBatches
    from ptls_meles.datasets.synthetic import generate
    from ptls_meles.prepare import prepare
    from ptls_meles.schema import EventSchema
    from ptls_meles.train import MeLESModule

    events, _ = generate(n_clients=140, seed=1, mean_events=50)
    store, _ = prepare(events, EventSchema("client_id", "trans_date", ["small_group"], ["amount_rur"], time_format="number"),
                       show_progress=False)
    config = MeLESConfig(hidden_size=8, batch_size=26, cnt_min=3, cnt_max=30, encoder=encoder,
                         num_layers=1 if encoder == "gru" else 2,  # 130 views: 2 length groups
                         category_pooling=category_pooling, category_inputs=category_inputs, event_bag=event_bag)
    module = MeLESModule(config, store.encoding)
    module.embedder.event_encoder.fit_value_moments(store.columns)
    module.train()
    padded, labels = ViewBatches(store, np.arange(store.n_clients), config)[(0, 0)]
    assert encoder == "bag" or module.embedder.seq_encoder.length_groups(padded.lengths) is not None

    plain_loss(module, padded, labels).backward()
    plain = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)

    class KeepGradients:
        def step(self):
            pass

        def zero_grad(self, set_to_none=True):
            pass

    timers = _Timers()
    _staged_step(module, padded, labels, KeepGradients(), timers)
    staged = {name: p.grad for name, p in module.named_parameters() if p.grad is not None}
    assert staged.keys() == plain.keys() and len(plain) > 5
    assert bool(category_pooling) == any(name.startswith("embedder.category_pooling") for name in plain)
    for name, grad in plain.items():
        assert torch.allclose(staged[name], grad, atol=1e-6, rtol=1e-4), name
    core = {"gru": "GRU", "bag": "bag MLP", "conv": "convolutions"}[encoder]
    assert {f"{core} fwd", f"{core} bwd", "pooling bwd", "event encoder fwd"} <= set(timers.total)
