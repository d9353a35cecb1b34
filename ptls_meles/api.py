"""The scikit-learn shaped Python API: ``MeLES(...).fit(events).transform(events)``."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from .config import MeLESConfig
from .embed import embed_frame, write_embeddings
from .encoding import Encoding
from .prepare import prepare
from .schema import EventSchema
from .sources import Source
from .store import SequenceStore
from .train import MeLESModule, fit as fit_module

MODEL_FILE = "model.pt"


class MeLES:
    """Self-supervised client embeddings from event sequences.

    Parameters are the fields of :class:`MeLESConfig` (``encoder``, ``hidden_size``,
    ``loss``, ``split``, ``max_epochs``, ...) plus an optional ``schema`` naming the raw
    columns (needed when fitting raw events rather than a prepared store).
    Learned state: ``encoding_``, ``module_``, ``schema_``.
    """

    def __init__(self, schema: EventSchema | None = None, **params) -> None:
        self.schema = schema
        self.config = MeLESConfig.from_dict(params)

    def get_params(self) -> dict:
        return {"schema": self.schema, **self.config.to_dict()}

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.config.to_dict().items() if v != getattr(MeLESConfig(), k)}
        return f"MeLES({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    # ------------------------------------------------------------------ data
    def _store(self, events: Source | SequenceStore, encoding: Encoding | None, show_progress: bool) -> SequenceStore:
        if isinstance(events, SequenceStore):
            return events
        if isinstance(events, (str, Path)) and (Path(events) / "sequences.parquet").exists():
            return SequenceStore.load(events)
        schema = getattr(self, "schema_", None) or self.schema
        if schema is None:
            raise ValueError("raw events need a schema: MeLES(schema=EventSchema(client_col=..., time_col=..., categorical=[...], numeric=[...]))")
        store, _ = prepare(events, schema, encoding=encoding, show_progress=show_progress)
        return store

    # ------------------------------------------------------------------ fit / transform
    def fit(self, events: Source | SequenceStore, out_dir: str | Path | None = None, show_progress: bool = True, **trainer_kwargs) -> "MeLES":
        """Prepare (if raw) and train; ``out_dir`` keeps checkpoints and CSV logs."""
        store = self._store(events, None, show_progress)
        self.schema_ = self.schema or (EventSchema(**store.meta["schema"]) if "schema" in store.meta else None)
        self.encoding_ = store.encoding
        self.module_ = fit_module(store, self.config, out_dir=out_dir, show_progress=show_progress, **trainer_kwargs)
        self.module_.eval()
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "module_"):
            raise RuntimeError("this MeLES instance is not fitted yet: call .fit(events) or MeLES.load(path)")

    def _check_store_encoding(self, store: SequenceStore) -> None:
        """A store prepared with another encoding maps values to other ids (or to ids past the
        embedding tables): refuse it, naming the column, instead of embedding garbage."""
        for c, vocab in self.encoding_.categorical.items():
            other = store.encoding.categorical.get(c)
            if other is None or c not in store.columns:
                raise ValueError(f"the store has no categorical column {c!r} that the model was trained on; "
                                 f"it has {sorted(store.columns)}")
            if other.values != vocab.values:
                raise ValueError(
                    f"the store's column {c!r} was encoded with another vocabulary than the model's "
                    f"({len(other.values)} vs {len(vocab.values)} values, e.g. {other.values[:3]} vs {vocab.values[:3]}); "
                    "pass raw events, or prepare the store with the model's encoding (prepare(..., encoding=model.encoding_) / "
                    "`ptls-meles prepare --encoding MODEL/encoding.json`)"
                )
        for c, transform in self.encoding_.numeric.items():
            other = store.encoding.numeric.get(c)
            if other is None or c not in store.columns:
                raise ValueError(f"the store has no numeric column {c!r} that the model was trained on; it has {sorted(store.columns)}")
            if other != transform:
                raise ValueError(f"the store's column {c!r} was transformed as {other}, the model expects {transform}; "
                                 "prepare the store with the model's encoding")

    def transform(self, events: Source | SequenceStore, show_progress: bool = False) -> pd.DataFrame:
        """Embeddings as a DataFrame ``client_id, emb_000, ..., emb_{D-1}``; new data is
        encoded with the training encoding (unseen categories → the reserved id)."""
        self._check_fitted()
        store = self._store(events, self.encoding_, show_progress)
        self._check_store_encoding(store)
        return embed_frame(
            self.module_.embedder, store, max_events=self.config.max_events, batch_size=self.config.embed_batch_size, show_progress=show_progress
        )

    def fit_transform(self, events: Source | SequenceStore, **kwargs) -> pd.DataFrame:
        store = self._store(events, None, kwargs.get("show_progress", True))
        return self.fit(store, **kwargs).transform(store)

    def write_embeddings(self, events: Source | SequenceStore, path: str | Path, show_progress: bool = True) -> dict:
        """Stream the embedding table to Parquet (config and encoding in its metadata)."""
        self._check_fitted()
        store = self._store(events, self.encoding_, show_progress)
        self._check_store_encoding(store)
        meta = {"config": self.config.to_dict(), "encoding": self.encoding_.to_dict()}
        return write_embeddings(
            self.module_.embedder, store, path, metadata=meta, max_events=self.config.max_events,
            batch_size=self.config.embed_batch_size, show_progress=show_progress,
        )

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """A directory with ``model.pt`` (weights only), ``config.json``, ``encoding.json``, ``schema.json``."""
        self._check_fitted()
        from .io_utils import atomic_path

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with atomic_path(path / MODEL_FILE) as tmp:  # a killed save never leaves a truncated model.pt
            torch.save(self.module_.state_dict(), tmp)
        with atomic_path(path / "config.json") as tmp:
            tmp.write_text(self.config.to_json())
        self.encoding_.save(path / "encoding.json")
        if self.schema_ is not None:
            self.schema_.save(path / "schema.json")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "MeLES":
        """Load a saved model or a training checkpoint (``.ckpt``); never unpickles code."""
        path = Path(path)
        if path.suffix == ".ckpt":
            from .train import load_checkpoint

            module = load_checkpoint(path)
            obj = cls(**module.cfg.to_dict())
            obj.module_, obj.encoding_, obj.schema_ = module, module.encoding, None
            return obj
        if not (path / MODEL_FILE).exists():
            raise FileNotFoundError(f"no saved MeLES model in {path} (expected {MODEL_FILE}, config.json, encoding.json)")
        from .io_utils import read_json

        config = read_json(path / "config.json", "config")
        encoding = Encoding.load(path / "encoding.json")
        schema = EventSchema.load(path / "schema.json") if (path / "schema.json").exists() else None
        obj = cls(schema=schema, **config)
        module = MeLESModule(config, encoding.to_dict())
        from .train import load_weights

        module.load_state_dict(load_weights(path / MODEL_FILE))
        module.eval()
        obj.module_, obj.encoding_, obj.schema_ = module, encoding, schema
        return obj
