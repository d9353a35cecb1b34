"""The embedder: padded batch -> one vector per client (event encoder + sequence encoder)."""
from __future__ import annotations

from typing import Any

from torch import nn

from ptls_meles.batch import PaddedBatch
from ptls_meles.nn.event_encoder import TIME_FIELD, EventEncoder
from ptls_meles.nn.seq_encoder import BagSeqEncoder, ConvSeqEncoder, RnnSeqEncoder, TransformerSeqEncoder

from ptls_meles.config import CHOICES

ENCODERS = CHOICES["encoder"]


class Embedder(nn.Module):
    """``forward(batch) -> [B, D]``, raw (not L2-normalised): downstream models get the full
    information; the metric-learning head (``MeLESModule``) normalises where it needs to."""

    def __init__(self, event_encoder: EventEncoder, seq_encoder: nn.Module):
        super().__init__()
        self.event_encoder = event_encoder
        self.seq_encoder = seq_encoder

    @property
    def output_size(self) -> int:
        return self.seq_encoder.output_size

    def forward(self, batch: PaddedBatch, return_sequence: bool = False):
        """``[B, D]``; with ``return_sequence`` (causal encoders: gru, lstm, conv) also ``[B, T, H]`` per-event states."""
        events = self.event_encoder(batch)
        time = batch.payload.get(TIME_FIELD)
        if return_sequence:
            return self.seq_encoder(events, batch.lengths, time, return_sequence=True)
        return self.seq_encoder(events, batch.lengths, time)


def build_embedder(
    categorical: dict[str, tuple[int, int]],
    numeric: list[str],
    encoder: str = "gru",
    hidden_size: int = 256,
    time_features: bool | tuple[str, ...] = (),
    numeric_encoding: tuple[str, ...] = ("scalar",),
    **encoder_kwargs: Any,
) -> Embedder:
    """Event encoder + ``encoder`` in ("gru", "lstm", "transformer", "bag", "conv").

    ``hidden_size`` is the RNN hidden size, the Transformer's ``d_model``, the bag's MLP width or
    the convolutions' channels; other keyword
    arguments go to the sequence encoder (e.g. ``pooling``).
    """
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; expected one of {ENCODERS}, e.g. 'gru'")
    event_encoder = EventEncoder(categorical, numeric, time_features=time_features, numeric_encoding=numeric_encoding)
    if encoder == "bag":
        seq_encoder: nn.Module = BagSeqEncoder(event_encoder.output_size, hidden_size, **encoder_kwargs)
    elif encoder == "conv":
        seq_encoder = ConvSeqEncoder(event_encoder.output_size, hidden_size, **encoder_kwargs)
    elif encoder == "transformer":
        seq_encoder = TransformerSeqEncoder(
            event_encoder.output_size, d_model=hidden_size, **encoder_kwargs
        )
    else:
        seq_encoder = RnnSeqEncoder(event_encoder.output_size, hidden_size, kind=encoder, **encoder_kwargs)
    return Embedder(event_encoder, seq_encoder)
