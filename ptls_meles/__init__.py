"""ptls-meles: client embeddings from event sequences by metric learning (MeLES / CoLES)."""
from .config import MeLESConfig
from .encoding import Encoding
from .prepare import prepare  # the function; bound here so the submodule never shadows it
from .schema import EventSchema, SchemaError
from .store import SequenceStore

__version__ = "0.1.0"


def __getattr__(name):  # the heavy (torch) parts load on first use
    if name in ("MeLES", "MeLESEnsemble"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)


__all__ = ["MeLES", "MeLESEnsemble", "MeLESConfig", "Encoding", "EventSchema", "SchemaError", "SequenceStore", "prepare"]
