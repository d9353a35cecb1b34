"""The scikit-learn compatible Python API: ``MeLES(...).fit(events).transform(events)``."""
from __future__ import annotations

import inspect
from dataclasses import MISSING, fields
from pathlib import Path

import pandas as pd
import torch
from sklearn.base import BaseEstimator, TransformerMixin

from .config import MeLESConfig
from .embed import embed_frame, write_embeddings
from .encoding import Encoding
from .nn.side_by_side import SideBySide
from .prepare import prepare
from .schema import EventSchema
from .sources import Source
from .store import ENCODING_FILE, STORE_FILE, SequenceStore
from .train import MODEL_FILE, fit as fit_module, load_model, saved_model_dir

#: MeLES's parameters besides ``schema``: every MeLESConfig field, with its default (a field
#: whose default is a fresh dict defaults to None here, "the config's default", as
#: scikit-learn wants immutable defaults)
_CONFIG_DEFAULTS = {f.name: (f.default if f.default is not MISSING else None) for f in fields(MeLESConfig)}
_FACTORY_FIELDS = {f.name for f in fields(MeLESConfig) if f.default is MISSING}


class MeLES(TransformerMixin, BaseEstimator):
    """Self-supervised client embeddings from event sequences, a scikit-learn transformer.

    Parameters are the fields of :class:`MeLESConfig` (``encoder``, ``hidden_size``,
    ``loss``, ``split``, ``max_epochs``, ...) plus an optional ``schema`` naming the raw
    columns (needed when fitting raw events rather than a prepared store). They are stored
    as given and checked when fitting (scikit-learn's contract, so ``clone``,
    ``set_params`` and ``GridSearchCV`` work). Learned state: ``module_`` (which owns the
    config it was trained with), ``encoding_``, ``schema_``.

    ``X`` (``events``) is one of:

    * raw events (a DataFrame, Arrow table or file path; one row per event, with the
      schema's client column) or a prepared store: ``transform`` returns one row per client,
      ``client_id, emb_000, ...``, clients in store order (sorted by client id). Align labels
      on the ``client_id`` column;
    * a list of DataFrames, one per client, each holding that client's events: one sample
      is one client, so ``transform`` returns row ``i`` for ``X[i]``: only the embedding
      columns (indexed by client id), a feature matrix for the next step of a ``Pipeline``,
      and ``y[i]`` is ``X[i]``'s label in ``Pipeline.fit(X, y)`` and ``GridSearchCV``.
    """

    def __init__(self, schema: EventSchema | None = None, **params) -> None:
        self.schema = schema
        unknown = sorted(set(params) - set(_CONFIG_DEFAULTS))
        if unknown:
            raise TypeError(f"unknown MeLES setting(s) {unknown}; known settings: {sorted(_CONFIG_DEFAULTS)}")
        for name, default in _CONFIG_DEFAULTS.items():
            setattr(self, name, params.get(name, default))

    @property
    def config(self) -> MeLESConfig:
        """The :class:`MeLESConfig` the current parameters describe (validated here)."""
        params = {name: getattr(self, name) for name in _CONFIG_DEFAULTS}
        # an estimator holds every parameter, so "given" means "not the default" here (scikit-learn's
        # clone passes them all back); a preset fills the rest
        return MeLESConfig.from_dict({k: v for k, v in params.items()
                                      if not (v is None and k in _FACTORY_FIELDS) and (k == "preset" or v != _CONFIG_DEFAULTS[k])})

    # ------------------------------------------------------------------ data
    def _store(self, events, encoding: Encoding | None, show_progress: bool) -> tuple[SequenceStore, list | None]:
        """The store of ``events`` and, for a list of per-client frames, the client id of each."""
        if isinstance(events, SequenceStore):
            return events, None
        if isinstance(events, (str, Path)) and (Path(events) / STORE_FILE).exists():
            return SequenceStore.load(events), None
        schema = getattr(self, "schema_", None) or self.schema
        if schema is None:
            raise ValueError("raw events need a schema: MeLES(schema=EventSchema(client_col=..., time_col=..., categorical=[...], numeric=[...]))")
        ids = None
        if isinstance(events, (list, tuple)):
            ids = [_single_client(frame, schema.client_col, i) for i, frame in enumerate(events)]
            events = pd.concat(events, ignore_index=True)
        store, _ = prepare(events, schema, encoding=encoding, show_progress=show_progress)
        return store, ids

    # ------------------------------------------------------------------ fit / transform
    def fit(self, X, y=None, out_dir: str | Path | None = None, show_progress: bool = True, **trainer_kwargs) -> "MeLES":
        """Prepare (if raw) and train; ``out_dir`` keeps checkpoints and CSV logs. ``y`` is
        not used (MeLES is self-supervised); it is accepted so a ``Pipeline`` can pass it."""
        self._fit_store(self._store(X, None, show_progress)[0], out_dir, show_progress, **trainer_kwargs)
        return self

    def _fit_store(self, store: SequenceStore, out_dir, show_progress: bool, **trainer_kwargs) -> None:
        config = self.config
        self.schema_ = self.schema or (EventSchema(**store.meta["schema"]) if "schema" in store.meta else None)
        self.encoding_ = store.encoding
        self.module_ = fit_module(store, config, out_dir=out_dir, show_progress=show_progress, **trainer_kwargs)
        self.module_.eval()

    def _check_fitted(self) -> None:
        if not hasattr(self, "module_"):
            raise RuntimeError("this MeLES instance is not fitted yet: call .fit(events) or MeLES.load(path)")

    def transform(self, X, show_progress: bool = False) -> pd.DataFrame:
        """Embeddings, one row per client (see the class docstring for the row order); new
        data is encoded with the training encoding (unseen categories → the reserved id)."""
        self._check_fitted()
        store, ids = self._store(X, self.encoding_, show_progress)
        return self._embed(store, ids, show_progress)

    def fit_transform(self, X, y=None, **fit_params) -> pd.DataFrame:
        """``fit(X).transform(X)``, preparing raw events once."""
        show_progress = fit_params.pop("show_progress", True)
        store, ids = self._store(X, None, show_progress)
        self._fit_store(store, fit_params.pop("out_dir", None), show_progress, **fit_params)
        return self._embed(store, ids, False)

    def _embed(self, store: SequenceStore, ids: list | None, show_progress: bool) -> pd.DataFrame:
        return _embed_store(self.module_.embedder, self.module_.inference_settings, self.encoding_, store, ids, show_progress)

    def write_embeddings(self, events: Source | SequenceStore, path: str | Path, show_progress: bool = True) -> dict:
        """Stream the embedding table to Parquet (config and encoding in its metadata)."""
        self._check_fitted()
        store, _ = self._store(events, self.encoding_, show_progress)
        meta = {"config": self.module_.config.to_dict()}
        return _write_store(self.module_.embedder, self.module_.inference_settings, self.encoding_, store, path, meta, show_progress)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """A directory with ``model.pt`` (weights only), ``config.json``, ``encoding.json``, ``schema.json``."""
        self._check_fitted()
        from .io_utils import atomic_path, write_json

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with atomic_path(path / MODEL_FILE) as tmp:  # a killed save never leaves a truncated model.pt
            torch.save(self.module_.state_dict(), tmp)
        write_json(path / "config.json", self.module_.config.to_dict())
        self.encoding_.save(path / ENCODING_FILE)
        if self.schema_ is not None:
            self.schema_.save(path / "schema.json")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "MeLES":
        """Load a saved model, a run directory holding one (``model/``) or a training
        checkpoint (``.ckpt``) with :func:`~ptls_meles.train.load_model`; never unpickles code."""
        path = Path(path)
        module = load_model(path)
        model_dir = saved_model_dir(path)
        schema = EventSchema.load(model_dir / "schema.json") if (model_dir / "schema.json").exists() else None
        obj = cls(schema=schema, **module.config.to_dict())
        obj.module_, obj.encoding_, obj.schema_ = module, module.encoding, schema
        return obj


class MeLESEnsemble(TransformerMixin, BaseEstimator):
    """Fitted MeLES models of one encoding, read side by side: each client's embedding is every
    model's, concatenated (``emb_000`` on through all of them), in model order.

    Why: on several cores, models trained at once (``fit --threads 1`` each, side by side) cost
    the wall time of one, and models of other settings can be read together. Two seeds of the
    default read on PhysioNet like the better of the two, not better (docs/results/history.md,
    2026-12-08): a tool, not a default. ``fit`` trains the members in turn on one prepared
    store; ``load`` reads saved models or run directories.
    """

    def __init__(self, models: list[MeLES]) -> None:
        self.models = models

    @classmethod
    def load(cls, paths: list[str | Path]) -> "MeLESEnsemble":
        """Saved models, run directories or checkpoints (as :meth:`MeLES.load`), in this order."""
        return cls([MeLES.load(p) for p in paths])

    def fit(self, X, y=None, show_progress: bool = True) -> "MeLESEnsemble":
        """Prepare ``X`` once (if raw) and train every member on it, one after the other."""
        members = self._members()
        store, _ = members[0]._store(X, None, show_progress)
        for model in members:
            model._fit_store(store, None, show_progress)
        return self

    def transform(self, X, show_progress: bool = False) -> pd.DataFrame:
        """The members' embeddings side by side, rows as :meth:`MeLES.transform` gives them."""
        first, embedder, settings = self._side_by_side()
        store, ids = first._store(X, first.encoding_, show_progress)
        return _embed_store(embedder, settings, first.encoding_, store, ids, show_progress)

    def write_embeddings(self, events: Source | SequenceStore, path: str | Path, show_progress: bool = True) -> dict:
        """Stream the side-by-side table to Parquet (every member's config, and the encoding, in its metadata)."""
        first, embedder, settings = self._side_by_side()
        store, _ = first._store(events, first.encoding_, show_progress)
        meta = {"configs": [m.module_.config.to_dict() for m in self.models]}
        return _write_store(embedder, settings, first.encoding_, store, path, meta, show_progress)

    def _members(self) -> list[MeLES]:
        members = list(self.models)
        if len(members) < 2 or not all(isinstance(m, MeLES) for m in members):
            raise ValueError(f"an ensemble needs two or more MeLES models, got {[type(m).__name__ for m in members]}")
        return members

    def _side_by_side(self) -> tuple[MeLES, SideBySide, dict]:
        """The first member (its encoding and schema read the data), the members' embedders side
        by side, and their shared inference settings; refused when the members disagree."""
        members = self._members()
        for model in members:
            model._check_fitted()
        first = members[0]
        for i, model in enumerate(members[1:], start=1):
            why = first.encoding_.mismatch(model.encoding_)
            if why is not None:
                raise ValueError(f"ensemble model {i} was trained on another encoding than model 0 ({why}): "
                                 "side by side, every model must be trained on one prepared store")
            if model.module_.inference_settings != first.module_.inference_settings:
                raise ValueError(f"ensemble model {i} embeds with {model.module_.inference_settings}, model 0 with "
                                 f"{first.module_.inference_settings}: give them the same max_events, embed_chunk and embed_batch_size")
        return first, SideBySide([m.module_.embedder for m in members]), first.module_.inference_settings


def _embed_store(embedder: torch.nn.Module, settings: dict, encoding: Encoding, store: SequenceStore, ids: list | None,
                 show_progress: bool) -> pd.DataFrame:
    """The embedding frame of ``store`` (checked against the model's ``encoding``); for a list
    ``X`` of per-client frames, its rows in the order of ``ids``."""
    check_store_encoding(encoding, store)
    table = embed_frame(embedder, store, **settings, show_progress=show_progress)
    if ids is None:
        return table
    table = table.set_index("client_id")
    missing = [c for c in ids if c not in table.index]
    if missing:
        raise ValueError(f"{len(missing)} client(s) of X have no valid events after preparing, e.g. {missing[:3]}")
    return table.loc[ids]


def _write_store(embedder: torch.nn.Module, settings: dict, encoding: Encoding, store: SequenceStore, path: str | Path,
                 meta: dict, show_progress: bool) -> dict:
    """Stream the embedding table of ``store`` (checked against ``encoding``) to ``path``, with
    ``meta`` and the encoding in its metadata."""
    check_store_encoding(encoding, store)
    return write_embeddings(embedder, store, path, metadata={**meta, "encoding": encoding.to_dict()}, **settings,
                            show_progress=show_progress)


def check_store_encoding(encoding: Encoding, store: SequenceStore) -> None:
    """A store prepared with another encoding than a model's maps values to other ids (or to
    ids past the embedding tables): refuse it, naming the column, instead of embedding garbage."""
    for kind, names in (("categorical", encoding.categorical), ("numeric", encoding.numeric)):
        for c in names:
            if c not in store.columns:
                raise ValueError(f"the store has no {kind} column {c!r} that the model was trained on; "
                                 f"it has {sorted(store.columns)}")
    why = encoding.mismatch(store.encoding)
    if why is not None:
        raise ValueError(
            f"the store was encoded differently from the model: {why}; pass raw events, or prepare the store with "
            "the model's encoding (prepare(..., encoding=model.encoding_) / `ptls-meles prepare --encoding MODEL/encoding.json`)"
        )


def _single_client(frame: pd.DataFrame, client_col: str, i: int):
    """The one client id of ``X[i]`` when ``X`` is a list of per-client event frames."""
    if not isinstance(frame, pd.DataFrame) or client_col not in frame.columns:
        raise ValueError(f"X[{i}]: a list X must hold one events DataFrame per client, with the column {client_col!r}")
    ids = frame[client_col].dropna().unique()
    if len(ids) != 1:
        raise ValueError(f"X[{i}]: a list X must hold one client per DataFrame; column {client_col!r} has "
                         f"{len(ids)} distinct ids, e.g. {list(ids[:3])}")
    return ids[0].item() if hasattr(ids[0], "item") else ids[0]


# scikit-learn reads an estimator's parameters from its __init__ signature: name every
# MeLESConfig field there, so the config stays the one list of settings
MeLES.__init__.__signature__ = inspect.Signature(
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
     inspect.Parameter("schema", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)]
    + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default) for name, default in _CONFIG_DEFAULTS.items()]
)
