"""Plain dataclass configuration, saved beside every checkpoint and embedding table."""
from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass, field, fields


@dataclass
class MeLESConfig:
    """Everything that defines a MeLES run. Defaults follow the paper's age-group recipe,
    scaled to run on a laptop CPU (hidden 256 instead of 800, fewer epochs)."""

    # event encoder
    cat_embedding_dim: int = 16
    cat_embedding_dims: dict[str, int] = field(default_factory=dict)  # per-field override
    time_features: bool = False
    # sequence encoder
    encoder: str = "gru"  # gru | lstm | transformer
    hidden_size: int = 256
    num_layers: int = 1
    encoder_kwargs: dict = field(default_factory=dict)  # e.g. {"nhead": 4, "pooling": "cls"}
    # pair generation
    split: str = "slices"  # slices | samples | disjoint
    split_count: int = 5
    cnt_min: int = 25
    cnt_max: int = 200
    # loss and mining
    loss: str = "contrastive"  # contrastive | triplet | margin | binomial_deviance | histogram
    miner: str = "hard"  # hard | random | distance_weighted | all
    margin: float | None = None  # None: the loss's own default (contrastive 0.5, triplet/margin 0.2)
    neg_count: int = 5
    # optimisation
    batch_size: int = 64  # clients per batch (× split_count views)
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_step_size: int = 10  # epochs
    lr_gamma: float = 0.9
    max_epochs: int = 20
    patience: int | None = 5  # early stopping on validation recall; None disables
    val_fraction: float = 0.05
    max_val_clients: int = 1000
    num_workers: int = 1
    seed: int = 42
    # embedding
    max_events: int | None = 1600  # embed from the last N events of each client
    embed_batch_size: int = 256

    def __post_init__(self) -> None:
        # a wrong type (e.g. ``--set hidden_size=abc``) fails here, naming the setting,
        # rather than deep inside torch
        for f in fields(self):
            value = getattr(self, f.name)
            allowed = _ALLOWED_TYPES.get(f.type)
            if allowed is None:
                continue
            if value is None and "None" in f.type:
                continue
            if f.type == "bool" and isinstance(value, numbers.Integral) and value in (0, 1):
                continue
            if isinstance(value, bool) and f.type != "bool" or not isinstance(value, allowed):
                raise ValueError(f"setting {f.name!r} must be {f.type}, got {value!r} ({type(value).__name__})")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> "MeLESConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MeLES setting(s) {unknown}; known settings: {sorted(known)}")
        return cls(**d)

    def embedding_dim_of(self, column: str) -> int:
        return self.cat_embedding_dims.get(column, self.cat_embedding_dim)


# declared type (as written in the class) → accepted Python types
_ALLOWED_TYPES: dict[str, tuple[type, ...]] = {
    "int": (numbers.Integral,),
    "int | None": (numbers.Integral,),
    "float": (numbers.Real,),
    "float | None": (numbers.Real,),
    "str": (str,),
    "bool": (bool,),
    "dict": (dict,),
    "dict[str, int]": (dict,),
}
