"""The embedder: padded batch -> one vector per client (event encoder + sequence encoder)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ptls_meles.batch import PaddedBatch
from ptls_meles.nn.category_pooling import CategoryPooling
from ptls_meles.nn.event_encoder import TIME_FIELD, EventEncoder
from ptls_meles.nn.seq_encoder import BagSeqEncoder, ConvSeqEncoder, RnnSeqEncoder, TransformerSeqEncoder

from ptls_meles.config import CHOICES

ENCODERS = CHOICES["encoder"]


class Embedder(nn.Module):
    """``forward(batch) -> [B, D]``, raw (not L2-normalised): downstream models get the full
    information; the metric-learning head (``MeLESModule``) normalises where it needs to."""

    def __init__(self, event_encoder: EventEncoder, seq_encoder: nn.Module,
                 category_pooling: CategoryPooling | None = None, category_field: str | None = None,
                 category_inputs: tuple[str, ...] = ("states",), event_bag: BagSeqEncoder | None = None):
        super().__init__()
        self.event_encoder = event_encoder
        self.seq_encoder = seq_encoder
        self.category_pooling = category_pooling  # appended after the sequence encoder's pooling
        self.category_field = category_field
        # what category pooling projects: the sequence encoder's per-event states, the event encodings, or both
        self.category_inputs = tuple(category_inputs)
        self.event_bag = event_bag  # appended last: a per-event MLP of the event encodings, averaged

    @property
    def output_size(self) -> int:
        extra = self.category_pooling.output_size if self.category_pooling is not None else 0
        bag = self.event_bag.output_size if self.event_bag is not None else 0
        return self.seq_encoder.output_size + extra + bag

    def forward(self, batch: PaddedBatch, return_sequence: bool = False):
        """``[B, D]``; with ``return_sequence`` (causal encoders: gru, lstm, conv) also ``[B, T, H]`` per-event states."""
        events = self.event_encoder(batch)
        time = batch.payload.get(TIME_FIELD)
        if self.category_pooling is None:
            # only causal encoders take return_sequence; the others are asked for the pooled vector alone
            out = (self.seq_encoder(events, batch.lengths, time, return_sequence=True) if return_sequence
                   else self.seq_encoder(events, batch.lengths, time))
        else:
            ids = batch.payload[self.category_field]

            def by_category(rows, states, lengths):  # per length group, where the states are made
                return self.pool_by_category(states, events[rows], ids[rows], lengths)

            out = self.seq_encoder(events, batch.lengths, time, return_sequence=return_sequence, readout=by_category)
        if self.event_bag is None:
            return out
        pooled, sequence = out if return_sequence else (out, None)
        bag = self.event_bag(events, batch.lengths.to(events.device)).to(pooled.dtype)
        pooled = torch.cat([pooled, bag], dim=1)
        return (pooled, sequence) if return_sequence else pooled

    def pool_by_category(self, states: torch.Tensor, events: torch.Tensor, ids: torch.Tensor,
                         lengths: torch.Tensor) -> torch.Tensor:
        """Category pooling of ``states [B, T, H]`` and / or ``events [B, >= T, E]`` (``category_inputs``)."""
        parts = [states if name == "states" else events[:, : states.shape[1]].to(states.dtype)
                 for name in self.category_inputs]  # the event encodings are cut and cast only when read
        read = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return self.category_pooling(read, ids, lengths.to(states.device))


def build_embedder(
    categorical: dict[str, tuple[int, int]],
    numeric: list[str],
    encoder: str = "gru",
    hidden_size: int = 256,
    time_features: bool | tuple[str, ...] = (),
    numeric_encoding: tuple[str, ...] = ("scalar",),
    category_pooling: int = 0,
    category_width: int = 8,
    category_statistics: tuple[str, ...] = ("mean", "last"),
    category_inputs: tuple[str, ...] = ("states",),
    category_share_pooling: int = 0,
    event_bag: int = 0,
    **encoder_kwargs: Any,
) -> Embedder:
    """Event encoder + ``encoder`` in ("gru", "lstm", "transformer", "bag", "conv").

    ``hidden_size`` is the RNN hidden size, the Transformer's ``d_model``, the bag's MLP width or
    the convolutions' channels; other keyword
    arguments go to the sequence encoder (e.g. ``pooling``). ``category_pooling`` > 0 also
    pools the states of that many most frequent values of the first categorical field apart,
    each projected to ``category_width`` dimensions from ``category_inputs`` (the sequence
    encoder's per-event states and / or the event encodings) and pooled by ``category_statistics``
    (:class:`CategoryPooling`; causal encoders only; nothing for data without a categorical field);
    ``category_share_pooling`` > 0 gives the share statistic that many categories instead.
    ``event_bag`` > 0 appends a bag of events that wide: a two-layer MLP of each event's encoding,
    averaged over the events (:class:`BagSeqEncoder` with mean pooling). A sequence encoder's
    states mix every category into one state; the bag keeps how often each kind of event
    occurs and at what values, the per-client mix that strong aggregates read.
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
    bag = BagSeqEncoder(event_encoder.output_size, event_bag, num_layers=2, pooling="mean") if event_bag else None
    if not category_pooling or not categorical:  # without a categorical field there are no categories to pool apart
        return Embedder(event_encoder, seq_encoder, event_bag=bag)
    first = next(iter(categorical))
    n_values = categorical[first][0] - 2  # a vocabulary's size counts padding and unseen
    n_categories = max(min(category_pooling, n_values), 1)
    n_shared = max(min(category_share_pooling, n_values), 1) if category_share_pooling else n_categories
    read_size = {"states": seq_encoder.state_size, "events": event_encoder.output_size}
    pooling = CategoryPooling(sum(read_size[name] for name in category_inputs), n_categories, category_width,
                              category_statistics, share_categories=n_shared)
    return Embedder(event_encoder, seq_encoder, pooling, first, category_inputs, bag)
