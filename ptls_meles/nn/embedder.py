"""The embedder: padded batch -> one vector per client (event encoder + sequence encoder)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ptls_meles.batch import PaddedBatch
from ptls_meles.nn.event_encoder import TIME_FIELD, EventEncoder
from ptls_meles.nn.seq_encoder import RnnSeqEncoder, TransformerSeqEncoder

from ptls_meles.config import CHOICES

ENCODERS = CHOICES["encoder"]


class Embedder(nn.Module):
    """``forward(batch) -> [B, D]``; L2-normalised when ``normalize`` (metric learning works
    on the unit sphere), raw when False (e.g. features for downstream models)."""

    def __init__(self, event_encoder: EventEncoder, seq_encoder: nn.Module, normalize: bool = True):
        super().__init__()
        self.event_encoder = event_encoder
        self.seq_encoder = seq_encoder
        self.normalize = normalize

    @property
    def output_size(self) -> int:
        return self.seq_encoder.output_size

    def forward(self, batch: PaddedBatch, return_sequence: bool = False):
        """``[B, D]``; with ``return_sequence`` (recurrent encoders) also ``[B, T, H]`` per-event states."""
        events = self.event_encoder(batch)
        if return_sequence:
            vectors, sequence = self.seq_encoder(events, batch.lengths, batch.payload.get(TIME_FIELD), return_sequence=True)
        else:
            vectors = self.seq_encoder(events, batch.lengths, batch.payload.get(TIME_FIELD))
        vectors = F.normalize(vectors, dim=-1) if self.normalize else vectors
        return (vectors, sequence) if return_sequence else vectors


def build_embedder(
    categorical: dict[str, tuple[int, int]],
    numeric: list[str],
    encoder: str = "gru",
    hidden_size: int = 256,
    time_features: bool | tuple[str, ...] = (),
    numeric_encoding: tuple[str, ...] = ("scalar",),
    **encoder_kwargs: Any,
) -> Embedder:
    """Event encoder + ``encoder`` in ("gru", "lstm", "transformer").

    ``hidden_size`` is the RNN hidden size or the Transformer's ``d_model``; other keyword
    arguments go to the sequence encoder (e.g. ``pooling``; ``normalize`` goes to the Embedder).
    """
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; expected one of {ENCODERS}, e.g. 'gru'")
    normalize = encoder_kwargs.pop("normalize", True)
    event_encoder = EventEncoder(categorical, numeric, time_features=time_features, numeric_encoding=numeric_encoding)
    if encoder == "transformer":
        seq_encoder: nn.Module = TransformerSeqEncoder(
            event_encoder.output_size, d_model=hidden_size, **encoder_kwargs
        )
    else:
        seq_encoder = RnnSeqEncoder(event_encoder.output_size, hidden_size, kind=encoder, **encoder_kwargs)
    return Embedder(event_encoder, seq_encoder, normalize=normalize)
