"""Neural network parts: event encoder, sequence encoders, the embedder."""
from ptls_meles.nn.embedder import ENCODERS, Embedder, build_embedder
from ptls_meles.nn.event_encoder import BatchFieldError, EventEncoder, MaskedBatchNorm, time_deltas
from ptls_meles.nn.seq_encoder import RnnSeqEncoder, TransformerSeqEncoder

__all__ = [
    "ENCODERS",
    "BatchFieldError",
    "Embedder",
    "EventEncoder",
    "MaskedBatchNorm",
    "RnnSeqEncoder",
    "TransformerSeqEncoder",
    "build_embedder",
    "time_deltas",
]
