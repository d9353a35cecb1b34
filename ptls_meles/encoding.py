"""Encoding state: how raw categorical and numeric values become model inputs.

Fitted once by ``prepare`` and saved as JSON beside every store, checkpoint and
embedding table, so new data is encoded exactly as the training data was.
Categorical ids: ``0`` is padding, ``1`` is "unseen or rare", ``2..`` are the kept
values in order of decreasing frequency.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

PAD_ID = 0
UNSEEN_ID = 1
N_RESERVED = 2

from .schema import FLOAT32_MAX

NUMERIC_TRANSFORMS = ("identity", "log", "standardize", "log_standardize")


@dataclass
class CategoryVocab:
    """Kept values of one categorical field, most frequent first (as strings)."""

    values: list[str]
    counts: list[int] = field(default_factory=list)
    n_rare: int = 0  # distinct values folded into UNSEEN_ID by min_count / max_size

    @property
    def size(self) -> int:
        """Number of ids including the reserved ones: the embedding table size."""
        return len(self.values) + N_RESERVED

    def encode(self, raw) -> np.ndarray:
        """Map raw values (any dtype) to int32 ids; unknown values → ``UNSEEN_ID``."""
        keys = as_category_strings(raw)
        index = pd.Index(self.values)
        ids = index.get_indexer(keys)
        out = np.where(ids >= 0, ids + N_RESERVED, UNSEEN_ID).astype(np.int32)
        return out

    @classmethod
    def fit(cls, uniques: np.ndarray, counts: np.ndarray, min_count: int = 1, max_size: int | None = None) -> "CategoryVocab":
        order = np.lexsort((np.asarray(uniques, dtype=str), -np.asarray(counts)))
        uniques, counts = np.asarray(uniques, dtype=str)[order], np.asarray(counts)[order]
        keep = counts >= min_count
        if max_size is not None:
            keep &= np.arange(len(counts)) < max_size
        return cls(values=uniques[keep].tolist(), counts=counts[keep].astype(int).tolist(), n_rare=int((~keep).sum()))


@dataclass
class NumericTransform:
    """``log``: sign(x)·log1p(|x|); ``standardize``: (x − mean)/std after the optional log.

    :meth:`apply` = :meth:`standardize` ∘ :meth:`base` is what ``prepare`` stores (float32);
    :meth:`inverse` maps stored values back to raw numbers."""

    kind: str = "log"
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in NUMERIC_TRANSFORMS:
            raise ValueError(f"numeric transform {self.kind!r} is not one of {NUMERIC_TRANSFORMS}")
        if not self.std > 0:
            raise ValueError(f"numeric transform std must be positive, got {self.std}")

    @property
    def logged(self) -> bool:
        return self.kind in ("log", "log_standardize")

    @property
    def standardized(self) -> bool:
        return self.kind in ("standardize", "log_standardize")

    def base(self, x) -> np.ndarray:
        """The value before standardising: ``x`` or sign(x)·log1p|x|, as float64."""
        x = np.asarray(x, dtype=np.float64)
        return np.sign(x) * np.log1p(np.abs(x)) if self.logged else x

    def standardize(self, base) -> np.ndarray:
        """``(base − mean) / std`` in float32 arithmetic, the store's (Spark's prepare does the
        same in float32 column arithmetic); ``base`` itself as float32 when not standardising."""
        base = np.asarray(base, dtype=np.float32)
        if not self.standardized:
            return base
        return ((base - np.float32(self.mean)) / np.float32(self.std)).astype(np.float32)

    def apply(self, x) -> np.ndarray:
        """Raw numbers → the float32 values ``prepare`` stores."""
        return self.standardize(self.base(x))

    def inverse(self, y) -> np.ndarray:
        """Stored values → raw numbers (float64; exact up to the store's float32 rounding)."""
        y = np.asarray(y, dtype=np.float64)
        if self.standardized:
            y = y * self.std + self.mean
        return np.sign(y) * np.expm1(np.abs(y)) if self.logged else y

    def check_range(self, parsed):
        """Mark finite values whose transformed value overflows float32, the store's type, as
        bad (1e300 with ``identity`` would become inf and poison training): ``parsed`` with
        those rows added to ``bad`` and their own problem text."""
        if self.logged:
            return parsed  # log1p of any finite float64 is below 710
        over = np.isfinite(parsed.values) & ~(np.abs(parsed.values) <= FLOAT32_MAX)
        if over.any():
            parsed.bad = parsed.bad | over
            parsed.overflow = over
            parsed.overflow_problem = (f"a value beyond the float32 range (±3.4e38) after the {self.kind!r} transform "
                                       "(use the 'log' transform, --num-transform log)")
        return parsed

    def fit_moments(self, total: float, total_sq: float, n: int) -> None:
        """Set mean/std (standardising kinds only) from running sums of the base values (float64
        arithmetic, so large sums give inf rather than an OverflowError; inf moments are refused)."""
        if n == 0 or not self.standardized:
            return
        mean = np.float64(total) / n
        with np.errstate(over="ignore", invalid="ignore"):
            var = np.float64(total_sq) / n - mean * mean
        if not (np.isfinite(mean) and np.isfinite(var)):
            raise ValueError(f"cannot standardize: the values are too large (mean {mean}, variance {var}); use the 'log_standardize' transform")
        self.mean = float(mean)
        self.std = float(np.sqrt(max(var, 0.0))) or 1.0


@dataclass
class Encoding:
    """Everything needed to re-encode raw events identically."""

    client_col: str
    time_col: str
    time_format: str
    categorical: dict[str, CategoryVocab] = field(default_factory=dict)
    numeric: dict[str, NumericTransform] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Encoding":
        return cls(
            client_col=d["client_col"],
            time_col=d["time_col"],
            time_format=d["time_format"],
            categorical={k: CategoryVocab(**v) for k, v in d.get("categorical", {}).items()},
            numeric={k: NumericTransform(**v) for k, v in d.get("numeric", {}).items()},
        )

    def save(self, path: str | os.PathLike) -> None:
        from .io_utils import write_json

        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Encoding":
        from .io_utils import read_json

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no encoding state at {path}: it is written by `ptls-meles prepare`")
        d = read_json(path, "encoding")
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not an encoding file ({type(exc).__name__}: {exc}); "
                             "it is written by `ptls-meles prepare`, prepare again to rebuild it") from None

    def mismatch(self, other: "Encoding") -> str | None:
        """Why data encoded with ``other`` cannot feed a model built for this encoding
        (other fields, another vocabulary, another transform), or None when it can."""
        for kind, mine, theirs in (("categorical", self.categorical, other.categorical), ("numeric", self.numeric, other.numeric)):
            if list(mine) != list(theirs):
                return f"{kind} fields {list(theirs)} instead of {list(mine)}"
        for c, vocab in self.categorical.items():
            o = other.categorical[c]
            if o.values != vocab.values:
                return (f"another vocabulary for {c!r} ({len(o.values)} vs {len(vocab.values)} values, "
                        f"e.g. {o.values[:3]} vs {vocab.values[:3]})")
        for c, t in self.numeric.items():
            if other.numeric[c] != t:
                return f"another transform for {c!r} ({other.numeric[c]} vs {t})"
        return None


def as_category_strings(raw) -> np.ndarray:
    """Canonical string keys for categorical values: ``5``, ``5.0`` and ``"5"`` all become ``"5"``."""
    s = pd.Series(raw)
    if pd.api.types.is_float_dtype(s.dtype):
        # element-wise, so a key never depends on the other values in the same chunk
        x = s.to_numpy(np.float64)
        integral = np.isfinite(x) & (np.mod(x, 1) == 0)
        out = s.astype(str).to_numpy(dtype=object)
        out[integral] = x[integral].astype(np.int64).astype(str)
        return out
    if pd.api.types.is_bool_dtype(s.dtype):
        s = s.astype(np.int64)
    return s.astype(str).to_numpy()
