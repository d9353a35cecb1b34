"""Tests for ptls_meles.nn: shapes, padding invariance, masked batchnorm, gradients."""
from __future__ import annotations

import math

import pytest
import torch

from ptls_meles.batch import PaddedBatch
from ptls_meles.nn import (
    BatchFieldError,
    EventEncoder,
    MaskedBatchNorm,
    RnnSeqEncoder,
    TransformerSeqEncoder,
    build_embedder,
    time_deltas,
)

CATEGORICAL = {"mcc": (20, 5), "channel": (4, 3)}
NUMERIC = ["amount"]

ENCODER_CONFIGS = {
    "gru": dict(encoder="gru"),
    "lstm": dict(encoder="lstm"),
    "gru_bidir_2layers": dict(encoder="gru", bidirectional=True, num_layers=2, learn_initial_state=True),
    "lstm_bidir_init": dict(encoder="lstm", bidirectional=True, learn_initial_state=True),
    "transformer_cls": dict(encoder="transformer", dropout=0.0),
    "transformer_mean": dict(encoder="transformer", pooling="mean", dropout=0.0),
    "transformer_time": dict(encoder="transformer", time_encoding=True, dropout=0.0),
    "bag": dict(encoder="bag", num_layers=2),
    "conv": dict(encoder="conv", num_layers=3),
}


def random_sequence(length: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "mcc": torch.randint(1, 20, (length,), generator=gen),
        "channel": torch.randint(1, 4, (length,), generator=gen),
        "amount": torch.randn(length, generator=gen) * 100,
        "event_time": torch.cumsum(torch.rand(length, generator=gen) * 5, 0),
    }


def pad(sequences: list[dict[str, torch.Tensor]], max_len: int | None = None, garbage: bool = True) -> PaddedBatch:
    """Pad to ``max_len``; with ``garbage`` the padded slots hold nonsense, not zeros."""
    lengths = torch.tensor([len(s["mcc"]) for s in sequences])
    t = max_len or int(lengths.max())
    payload = {}
    for name in sequences[0]:
        dtype = sequences[0][name].dtype
        fill = (10_000 if dtype == torch.int64 else float("nan")) if garbage else 0
        out = torch.full((len(sequences), t), fill, dtype=dtype)
        for row, seq in enumerate(sequences):
            out[row, : len(seq[name])] = seq[name]
        payload[name] = out
    return PaddedBatch(payload, lengths)


def make_embedder(name: str, hidden_size: int = 16, time_features: bool = True):
    torch.manual_seed(0)
    kwargs = dict(ENCODER_CONFIGS[name])
    encoder = kwargs.pop("encoder")
    if encoder == "transformer":
        kwargs.update(nhead=2, num_layers=2, dim_feedforward=32)
    return build_embedder(CATEGORICAL, NUMERIC, encoder=encoder, hidden_size=hidden_size,
                          time_features=time_features, **kwargs)


def train_batchnorm_stats(model, gen: torch.Generator) -> None:
    """One training-mode pass so eval uses non-trivial running statistics."""
    model.train()
    with torch.no_grad():
        model(pad([random_sequence(n, gen) for n in (3, 9, 6)]))
    model.eval()


@pytest.mark.parametrize("name", list(ENCODER_CONFIGS))
def test_output_shape_and_raw_vectors(name):
    gen = torch.Generator().manual_seed(1)
    model = make_embedder(name)
    batch = pad([random_sequence(n, gen) for n in (4, 1, 7)])
    out = model(batch)
    expected = 32 if "bidir" in name else 48 if name in ("bag", "conv") else 16  # these pool last, mean and max
    assert model.output_size == expected
    assert out.shape == (3, expected)
    # raw, not L2-normalised: the training head normalises, embeddings keep the full information
    assert not torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-3)


@pytest.mark.parametrize("name", list(ENCODER_CONFIGS))
def test_padding_invariance_eval(name):
    gen = torch.Generator().manual_seed(2)
    model = make_embedder(name)
    train_batchnorm_stats(model, gen)
    target = random_sequence(6, gen)
    others = [random_sequence(n, gen) for n in (2, 11, 1)]
    with torch.no_grad():
        alone = model(pad([target], garbage=False))[0]
        extra_padding = model(pad([target], max_len=15))[0]
        in_batch = model(pad([others[0], target, others[1], others[2]]))[1]
    assert torch.isfinite(alone).all()
    assert alone.abs().max() > 1e-3
    assert torch.allclose(alone, extra_padding, atol=1e-5)
    assert torch.allclose(alone, in_batch, atol=1e-5)


@pytest.mark.parametrize("kind,bidirectional", [("gru", False), ("lstm", False), ("gru", True), ("lstm", True)])
def test_rnn_returns_last_real_state(kind, bidirectional):
    torch.manual_seed(3)
    encoder = RnnSeqEncoder(5, 7, kind=kind, bidirectional=bidirectional).eval()
    x = torch.randn(3, 8, 5)
    lengths = torch.tensor([8, 3, 5])
    with torch.no_grad():
        out = encoder(x, lengths)
        for row, length in enumerate(lengths.tolist()):
            full, _ = encoder.rnn(x[row : row + 1, :length])  # unpadded run of one sequence
            forward_last = full[0, -1, :7]
            assert torch.allclose(out[row, :7], forward_last, atol=1e-6)
            if bidirectional:
                backward_last = full[0, 0, 7:]  # the backward pass ends at the first event
                assert torch.allclose(out[row, 7:], backward_last, atol=1e-6)


def test_masked_batchnorm_hand_computed_and_ignores_padding():
    bn = MaskedBatchNorm(1, momentum=0.1, eps=0.0, affine=False)
    x = torch.tensor([[[1.0], [2.0], [3.0]], [[6.0], [float("nan")], [1e9]]], requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    y = bn(x, mask)
    mean, var = 3.0, (4 + 1 + 0 + 9) / 4  # real values 1, 2, 3, 6
    expected = torch.tensor([[1.0, 2.0, 3.0], [6.0, 0.0, 0.0]])
    expected = torch.where(mask, (expected - mean) / math.sqrt(var), torch.zeros(()))
    assert torch.allclose(y[..., 0], expected, atol=1e-6)
    assert torch.allclose(bn.running_mean, torch.tensor([0.1 * mean]))
    assert torch.allclose(bn.running_var, torch.tensor([0.9 + 0.1 * var * 4 / 3]))
    (y * torch.arange(6.0).view(2, 3, 1)).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[~mask] == 0).all()
    bn.eval()
    y_eval = bn(x.detach(), mask)
    assert torch.allclose(y_eval[0, 0, 0], (1.0 - 0.3) / torch.sqrt(bn.running_var[0]))


def test_event_encoder_ignores_padding_values():
    gen = torch.Generator().manual_seed(4)
    sequences = [random_sequence(n, gen) for n in (5, 2, 8)]
    torch.manual_seed(0)
    encoder = EventEncoder(CATEGORICAL, NUMERIC, time_features=True)
    clean_state = {k: v.clone() for k, v in encoder.state_dict().items()}
    clean = encoder(pad(sequences, garbage=False))
    clean_running = encoder.numeric_norm.running_mean.clone()
    encoder.load_state_dict(clean_state)
    dirty = encoder(pad(sequences, garbage=True))
    assert clean.shape == (3, 8, 5 + 3 + 1 + 1)
    assert torch.isfinite(dirty).all()
    assert torch.allclose(clean, dirty, atol=1e-6)
    assert torch.allclose(clean_running, encoder.numeric_norm.running_mean)
    mask = pad(sequences).mask()
    assert (dirty[~mask] == 0).all()
    # numeric raw scale does not matter in training mode: amount * 1000 gives the same output
    scaled = [dict(s, amount=s["amount"] * 1000) for s in sequences]
    encoder.load_state_dict(clean_state)
    assert torch.allclose(encoder(pad(scaled)), clean, atol=1e-4)


def test_time_features_hand_computed():
    times = torch.tensor([[10.0, 12.0, 12.0, 20.0], [3.0, 1e9, float("nan"), 0.0]])
    mask = torch.tensor([[True] * 4, [True, False, False, False]])
    expected = torch.tensor([[0.0, math.log1p(2.0), 0.0, math.log1p(8.0)], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(time_deltas(times, mask), expected)
    # large Unix-second timestamps keep small gaps exactly (float64 arithmetic)
    unix = torch.tensor([[1.7e9, 1.7e9 + 1.0]], dtype=torch.float64)
    assert torch.allclose(time_deltas(unix, torch.tensor([[True, True]])), torch.tensor([[0.0, math.log1p(1.0)]]))
    with_time = EventEncoder(CATEGORICAL, NUMERIC, time_features=True)
    without = EventEncoder(CATEGORICAL, NUMERIC, time_features=False)
    assert with_time.output_size == without.output_size + 1 == 5 + 3 + 1 + 1


@pytest.mark.parametrize("name", list(ENCODER_CONFIGS))
def test_gradients_reach_all_parameters(name):
    gen = torch.Generator().manual_seed(5)
    model = make_embedder(name).train()
    out = model(pad([random_sequence(n, gen) for n in (4, 9, 2, 6)]))
    (out * torch.randn(out.shape, generator=gen)).sum().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().sum() > 0, param_name


def test_unknown_names_and_missing_fields_raise():
    with pytest.raises(ValueError, match="cnn"):
        build_embedder(CATEGORICAL, NUMERIC, encoder="cnn")
    with pytest.raises(ValueError, match="rnn kind"):
        RnnSeqEncoder(4, 4, kind="rnn")
    with pytest.raises(ValueError, match="pooling"):
        TransformerSeqEncoder(4, d_model=8, nhead=2, pooling="median")
    gen = torch.Generator().manual_seed(6)
    batch = pad([random_sequence(3, gen)])
    del batch.payload["channel"]
    with pytest.raises(BatchFieldError, match="channel"):
        EventEncoder(CATEGORICAL, NUMERIC)(batch)
    encoder = TransformerSeqEncoder(4, d_model=8, nhead=2, max_len=5)
    with pytest.raises(ValueError, match="max_len"):
        encoder(torch.zeros(1, 6, 4), torch.tensor([6]))


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_length_buckets_give_the_same_states_as_one_padded_run(kind):
    torch.manual_seed(0)
    x = torch.randn(260, 40, 5)
    lengths = torch.randint(1, 41, (260,))
    bucketed = RnnSeqEncoder(5, 8, kind=kind, length_buckets=4).eval()
    single = RnnSeqEncoder(5, 8, kind=kind, length_buckets=1).eval()
    single.load_state_dict(bucketed.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(bucketed(x, lengths), single(x, lengths), atol=1e-5, rtol=1e-5)


def test_bag_encoder_is_a_pooled_per_event_mlp_blind_to_order():
    """The bag reads each event alone: shuffling the events changes only its "last" part."""
    gen = torch.Generator().manual_seed(3)
    model = make_embedder("bag", time_features=False)
    train_batchnorm_stats(model, gen)
    seq = random_sequence(6, gen)
    order = torch.tensor([5, 2, 0, 4, 1, 3])
    shuffled = {k: v[order] for k, v in seq.items()}
    with torch.no_grad():
        a, b = model(pad([seq])), model(pad([shuffled]))
        per_event = model.seq_encoder.mlp(model.event_encoder(pad([seq])))[0]
    h = model.seq_encoder.pooling.output_size // 3
    assert torch.allclose(a[0, h:], b[0, h:], atol=1e-5) and not torch.allclose(a[0, :h], b[0, :h])
    assert torch.allclose(a[0, h:2 * h], per_event.mean(0), atol=1e-5)
    assert torch.allclose(a[0, 2 * h:], per_event.max(0).values, atol=1e-5)


def test_conv_encoder_sees_exactly_its_causal_receptive_field():
    """A change at event t moves the states of events t .. t+rf-1 and no others: causal
    (the past never depends on the future) and local (order within the window matters)."""
    torch.manual_seed(5)
    encoder = build_embedder(CATEGORICAL, NUMERIC, encoder="conv", hidden_size=8, num_layers=3).seq_encoder.eval()
    rf = encoder.receptive_field
    assert rf == 1 + 2 * (1 + 2 + 4)
    x = torch.randn(1, 40, encoder.input.in_features)
    lengths = torch.tensor([40])
    with torch.no_grad():
        _, seq = encoder(x, lengths, return_sequence=True)
        x2 = x.clone()
        x2[0, 10] += 1.0
        _, seq2 = encoder(x2, lengths, return_sequence=True)
    changed = (seq - seq2).abs().amax(dim=-1)[0] > 1e-6
    assert not changed[:10].any()
    assert changed[10 : 10 + rf].any() and changed[10 + rf - 1]
    assert not changed[10 + rf :].any()
    # swapping two neighbouring events changes the pooled mean (a bag's mean would not move)
    swapped = x.clone()
    swapped[0, [4, 5]] = x[0, [5, 4]]
    with torch.no_grad():
        h = encoder.pooling.size
        assert not torch.allclose(encoder(x, lengths)[0, h : 2 * h], encoder(swapped, lengths)[0, h : 2 * h])
