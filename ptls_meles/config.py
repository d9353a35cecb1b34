"""Plain dataclass configuration, saved beside every checkpoint and embedding table.

``CHOICES`` is the one table of the named options; a bad value is refused when the
config is built, naming the valid choices. Options marked "set" take a comma-separated
combination (e.g. ``pooling="last,mean,max"``).
"""
from __future__ import annotations

import numbers
import typing
from dataclasses import asdict, dataclass, field, fields

#: name -> valid values. One place: the encoder factory, the loss factory, the split and
#: the CLI all read this table.
CHOICES: dict[str, tuple[str, ...]] = {
    "encoder": ("gru", "lstm", "transformer", "bag", "conv"),
    "split": ("slices", "samples", "disjoint"),
    "loss": ("contrastive", "triplet", "margin", "binomial_deviance", "histogram", "infonce"),
    "miner": ("hard", "random", "distance_weighted", "all"),
    "lr_schedule": ("step", "cosine"),
    "precision": ("auto", "32", "bf16"),
}
#: name -> valid parts of a comma-separated set ("" = none of them, where allowed)
SET_CHOICES: dict[str, tuple[str, ...]] = {
    "numeric_encoding": ("scalar", "by_category", "periodic", "piecewise"),
    "time_features": ("gap", "elapsed", "absolute", "daytime"),
    "pooling": ("last", "mean", "max", "attention"),
    "aux_objective": ("next_event", "view_stats"),
    "view_statistics": ("shares", "values", "deviations", "rate", "gaps"),
    "category_statistics": ("mean", "last", "share", "max"),
    "category_inputs": ("states", "events"),
}
_SETS_THAT_MAY_BE_EMPTY = ("time_features", "aux_objective")
#: encoders that return per-event states, each summarising the events up to it (next-event, category pooling)
CAUSAL_ENCODERS = ("gru", "lstm", "conv")

#: The MeLES paper's recipe (age-group dataset, scaled to hidden 256 for a CPU): kept as a
#: named preset so the original result stays reproducible whatever the defaults become.
PRESETS: dict[str, dict] = {
    "paper": dict(
        numeric_encoding="scalar",
        time_features="",
        pooling="last",
        loss="contrastive",
        miner="hard",
        lr_schedule="step",
        grad_clip=None,
        aux_objective="",
        category_pooling=0,
        aux_weight=1.0,
        aux_relative=False,
        view_statistics="shares,values,rate",
        projection_head=0,
        encoder="gru",
        precision="32",
        cnt_min=25,
        cnt_max=200,
    ),
}


#: what the lever settings meant for configs saved before the levers existed (those
#: models were built this way; today's defaults would not fit their weights)
SAVED_BEFORE_LEVERS: dict = dict(numeric_encoding="scalar", time_features="", pooling="last", aux_objective="",
                                 lr_schedule="step", grad_clip=None, projection_head=0, aux_relative=False)
#: settings added after the levers, with the value that every model saved before them was trained with
SAVED_BEFORE_ADDED: dict = dict(aux_relative=False, view_statistics="shares,values,rate", category_pooling=0,
                                category_statistics="mean,last", event_bag=0, category_share_pooling=0,
                                head_width=0)


@dataclass
class MeLESConfig:
    """Everything that defines a MeLES run. ``preset`` (e.g. ``"paper"``) fills every
    setting left at its default with the preset's value, then is cleared.

    Defaults (chosen on PhysioNet 2012 and the synthetic banking data, docs/results/
    quality_*.md): numbers also read within their event's category, time gaps / elapsed /
    absolute time as inputs, three causal dilated convolution layers pooled last + mean +
    max and, apart, per each of the 32 most frequent categories of the first categorical
    field (mean and last) and per each of up to 256 (share), and a 128-wide projection head
    for the loss; the MeLES paper's contrastive loss with hard negatives on random slices,
    shorter than the paper's (15-100 events, not 25-200), plus the view-statistics objective
    at weight 0.3 of its starting loss: each view's embedding predicts its client's other
    views' category shares, value levels and timing."""

    preset: str | None = None

    # event encoder
    cat_embedding_dim: int = 16
    cat_embedding_dims: dict[str, int] = field(default_factory=dict)  # per-field override
    numeric_encoding: str = "scalar,by_category"  # set of scalar | by_category | periodic | piecewise
    time_features: str = "gap,elapsed,absolute"  # set of gap | elapsed | absolute | daytime ("" = none)
    # sequence encoder
    encoder: str = "conv"
    hidden_size: int = 256
    num_layers: int | None = None  # None: the encoder's own depth (gru/lstm 1, bag 2, transformer 2, conv 3)
    pooling: str = "last,mean,max"  # set of last | mean | max | attention
    # N > 0: also pool apart the states of the N most frequent values of the first categorical field
    # (and of the others together): a category_width-wide projection each, pooled by category_statistics.
    # Causal encoders (gru, lstm, conv): left at the default, it is off for the others; off for data
    # without a categorical field
    category_pooling: int = 32
    category_width: int = 8
    # what each category's projected states are pooled by: mean, last, and share (their sum over
    # the sequence's length, which keeps how often the category occurs), max (the elementwise largest)
    category_statistics: str = "mean,last,share"
    # what each event's projection reads: the sequence encoder's state at it (its context) and / or
    # its own event encoding (its exact values)
    category_inputs: str = "states"
    # S > 0: the share statistic pools the S most frequent values apart (0: category_pooling's N),
    # so how often a rare value occurs is kept without a mean and last state for it; 256 keeps
    # every value of a field such as a bank's merchant codes (hundreds of values)
    category_share_pooling: int = 256
    # W > 0: also a bag of events W wide (a per-event MLP of the event encodings, averaged over the
    # events): the mix of event kinds and values, which one recurrent or convolutional state blurs
    event_bag: int = 0
    encoder_kwargs: dict = field(default_factory=dict)  # e.g. {"nhead": 4}
    # pair generation
    split: str = "slices"
    split_count: int = 5
    cnt_min: int = 15  # views are slices of 15-100 events (the paper: 25-200); shorter views are
    cnt_max: int = 100  # harder to match and made better features on both datasets, two seeds
    # N > 0: the last of each client's split_count views is a slice of up to N events instead, so
    # short views are also paired with a long one, nearer the history that embed reads (multi-crop)
    long_view: int = 0
    # loss and mining
    loss: str = "contrastive"
    miner: str = "hard"
    margin: float | None = None  # None: the loss's own default (contrastive 0.5, triplet/margin 0.2)
    neg_count: int = 5
    temperature: float = 0.1  # infonce only
    # set of next_event (causal encoders: gru, lstm, conv) | view_stats ("" = none): view_stats asks the
    # embedding of each view for its client's other views' category mix, value levels and timing
    aux_objective: str = "view_stats"
    aux_weight: float = 0.3
    # what view_stats predicts of the other views: category shares, per-category mean values,
    # "deviations" (per-category mean absolute standardised value), mean log gap, and "gaps"
    # (log-gap bin shares, mean log gap per category: timing; dropped from the default, not
    # refused, when time_features is empty)
    view_statistics: str = "shares,values,rate,gaps"
    # True: each auxiliary loss is divided by its mean over the first training steps, so aux_weight
    # weighs a loss that starts at 1 whatever the vocabulary (raw view_stats losses start ~2.5x
    # higher with 200 categories than with 42); no effect, and off, without an aux_objective
    aux_relative: bool = True
    # 0: the loss reads the embedding itself; N: it reads an MLP head's N outputs (SimCLR), so the
    # embedding (what embed writes) need not drop what the views of one client do not share
    projection_head: int = 128
    # H > 0: the hidden layer of the projection head and of the view-statistics head is at most H
    # wide (0: as wide as the embedding); their E x E layers grow with the square of the embedding
    head_width: int = 0
    # optimisation
    batch_size: int = 64  # clients per batch (× split_count views)
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: str = "step"
    lr_step_size: int = 10  # epochs (step schedule)
    lr_gamma: float = 0.9
    grad_clip: float | None = None
    # training arithmetic: "32" (float32), "bf16" (bfloat16 mixed precision: matrix products in
    # bfloat16, loss and weights in float32), "auto" (bf16 where the device computes it natively:
    # a CPU with AVX512-BF16 or AMX, a GPU with bf16; else 32). Embedding always runs in float32.
    precision: str = "32"
    max_epochs: int = 20
    max_minutes: float | None = None  # wall-clock budget for training; None: epochs only
    patience: int | None = 5  # early stopping on validation recall; None disables
    val_fraction: float = 0.05
    max_val_clients: int = 1000
    num_workers: int = 1
    seed: int = 42
    # embedding
    max_events: int | None = 1600  # embed from the last N events of each client
    embed_batch_size: int = 256
    # None: one pass over the window; N: the mean of its contiguous chunks of at most N events
    embed_chunk: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.time_features, bool):  # configs saved before time_features was a set
            self.time_features = "gap" if self.time_features else ""
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ValueError(f"unknown preset {self.preset!r}; presets: {', '.join(PRESETS)}")
            given = getattr(self, "_given", frozenset())
            for name, value in PRESETS[self.preset].items():
                if name not in given:  # a setting passed explicitly wins, even when it equals the default
                    setattr(self, name, value)
            self.preset = None
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        for name, valid in CHOICES.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"setting {name}={getattr(self, name)!r} is not one of {', '.join(valid)}")
        for name, valid in SET_CHOICES.items():
            setattr(self, name, _normalise_set(name, getattr(self, name), valid, name in _SETS_THAT_MAY_BE_EMPTY))
        if not 1 <= self.cnt_min <= self.cnt_max:
            raise ValueError(f"need 1 <= cnt_min <= cnt_max, got cnt_min={self.cnt_min}, cnt_max={self.cnt_max}")
        if self.long_view < 0:
            raise ValueError(f"long_view must be 0 (off) or the long view's largest length in events, got {self.long_view}")
        if self.split_count < 2:
            raise ValueError(f"split_count must be >= 2 (views per client make the positive pairs), got {self.split_count}")
        if "next_event" in self.parts("aux_objective") and self.encoder not in CAUSAL_ENCODERS:
            raise ValueError(f"aux_objective 'next_event' needs a causal encoder (gru, lstm, conv), not {self.encoder!r}: "
                             "its per-event states must summarise the history")
        if self.category_pooling < 0:
            raise ValueError(f"category_pooling must be 0 (off) or the number of categories pooled apart, got {self.category_pooling}")
        if self.category_share_pooling < 0:
            raise ValueError("category_share_pooling must be 0 (as many as category_pooling) or the number of "
                             f"categories the share statistic pools apart, got {self.category_share_pooling}")
        if (self.category_share_pooling and "share" not in self.parts("category_statistics")
                and "category_share_pooling" not in getattr(self, "_given", ())):
            self.category_share_pooling = 0  # the default sets the share's categories; without a share, none
        if self.category_share_pooling and "share" not in self.parts("category_statistics"):
            raise ValueError(f"category_share_pooling={self.category_share_pooling} sets the share statistic's "
                             f"categories, but category_statistics={self.category_statistics!r} has no share "
                             "(example: category_statistics=mean,last,share)")
        if self.category_width < 1:
            raise ValueError(f"category_width is the per-category projection's width and must be >= 1, got {self.category_width}")
        if self.event_bag < 0:
            raise ValueError(f"event_bag must be 0 (off) or the bag of events' width, got {self.event_bag}")
        if (self.category_pooling and self.encoder not in CAUSAL_ENCODERS
                and "category_pooling" not in getattr(self, "_given", ())):
            self.category_pooling = 0  # the default pools the per-event states that only causal encoders return
        if self.category_pooling and self.encoder not in CAUSAL_ENCODERS:
            raise ValueError(f"category_pooling needs a causal encoder (gru, lstm, conv), not {self.encoder!r}: "
                             "it pools the per-event states those encoders return")
        if self.aux_relative and not self.parts("aux_objective") and "aux_relative" not in getattr(self, "_given", ()):
            self.aux_relative = False  # the default scales an auxiliary loss; with none there is nothing to scale
        if self.aux_relative and not self.parts("aux_objective"):
            raise ValueError("aux_relative=True scales an auxiliary loss, but aux_objective is empty: set one, "
                             "e.g. aux_objective=view_stats, or leave aux_relative=False")
        if ("gaps" in self.parts("view_statistics") and not self.parts("time_features")
                and "view_statistics" not in getattr(self, "_given", ())):
            # the default reads the event times; without time features it keeps the other statistics
            self.view_statistics = ",".join(p for p in self.parts("view_statistics") if p != "gaps")
        if ("view_stats" in self.parts("aux_objective") and "gaps" in self.parts("view_statistics")
                and not self.parts("time_features")):
            raise ValueError("view_statistics 'gaps' reads the event times, which time_features='' leaves out: "
                             "set time_features (e.g. gap) or drop gaps")
        if self.embed_chunk is not None and self.embed_chunk < 1:
            raise ValueError(f"embed_chunk must be >= 1 events (or None for the whole window), got {self.embed_chunk}")
        if self.projection_head < 0:
            raise ValueError(f"projection_head must be 0 (none) or the head's output size, got {self.projection_head}")
        if self.head_width < 0:
            raise ValueError(f"head_width must be 0 (as wide as the embedding) or the heads' hidden width, got {self.head_width}")
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1 (or None for the encoder's own depth), got {self.num_layers}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def parts(self, name: str) -> tuple[str, ...]:
        """The chosen parts of a set option, e.g. ``parts("pooling") == ("last", "mean")``."""
        value = getattr(self, name)
        return tuple(p for p in value.split(",") if p)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, saved: bool = False) -> "MeLESConfig":
        """``saved=True`` for a config read from a checkpoint or model directory: one saved
        before the quality levers existed gets the settings it was trained with."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MeLES setting(s) {unknown}; known settings: {sorted(known)}")
        if saved and "numeric_encoding" not in d:  # saved before the quality levers: their settings then
            d = {**SAVED_BEFORE_LEVERS, **d}
        if saved:
            d = {**SAVED_BEFORE_ADDED, **d}
        config = cls(**d)
        if saved:  # its values were resolved when it was made; none of them was asked for now
            object.__setattr__(config, "_given", frozenset())
        return config

    def embedding_dim_of(self, column: str) -> int:
        return self.cat_embedding_dims.get(column, self.cat_embedding_dim)


_FLAG_WORDS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}


def parse_settings(pairs: list[str] | None) -> dict:
    """``KEY=VALUE`` strings (``--set``, ``--define``) -> settings; values are Python
    literals when they parse (``8``, ``None``, ``True``), else strings (``last,mean``);
    a text setting stays text (``precision=32`` is ``"32"``), a yes/no setting also reads
    ``true`` / ``false``."""
    import ast

    text_settings = {f.name for f in fields(MeLESConfig) if f.type in ("str", str)}
    flag_settings = {f.name for f in fields(MeLESConfig) if f.type in ("bool", bool)}
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected KEY=VALUE, e.g. hidden_size=128, got {pair!r}")
        if key.strip() in text_settings:
            out[key.strip()] = value
            continue
        if key.strip() in flag_settings and value.strip().lower() in _FLAG_WORDS:  # a shell user types true
            out[key.strip()] = _FLAG_WORDS[value.strip().lower()]
            continue
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


_generated_init = MeLESConfig.__init__


def _init_remembering_given(self, *args, **kwargs) -> None:
    """The dataclass ``__init__``, remembering which settings were passed, so that a preset
    fills only the others: comparing with the defaults would let ``preset="paper"`` overwrite
    an explicit ``encoder="conv"`` because it equals today's default."""
    object.__setattr__(self, "_given", frozenset(kwargs) | {f.name for f in fields(MeLESConfig)[: len(args)]})
    _generated_init(self, *args, **kwargs)


MeLESConfig.__init__ = _init_remembering_given

def _normalise_set(name: str, value: str, valid: tuple[str, ...], may_be_empty: bool) -> str:
    parts = [p.strip() for p in value.split(",") if p.strip()]
    bad = [p for p in parts if p not in valid]
    if bad:
        raise ValueError(f"setting {name}={value!r}: {bad[0]!r} is not one of {', '.join(valid)} (combine with commas)")
    if not parts and not may_be_empty:
        raise ValueError(f"setting {name} needs at least one of {', '.join(valid)}")
    return ",".join(p for p in valid if p in parts)  # canonical order, no repeats


def _check_type(name: str, value, hint) -> None:
    """A wrong type (e.g. ``--set hidden_size=abc``) fails here, naming the setting."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        if value is None:
            return
        hint = next(a for a in args if a is not type(None))
    base = typing.get_origin(hint) or hint
    if base is bool:
        ok = isinstance(value, bool) or (isinstance(value, numbers.Integral) and value in (0, 1))
    elif base is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    else:
        ok = isinstance(value, base)
    if not ok:
        shown = getattr(hint, "__name__", str(hint)) + (" or None" if optional else "")
        raise ValueError(f"setting {name!r} must be {shown}, got {value!r} ({type(value).__name__})")
