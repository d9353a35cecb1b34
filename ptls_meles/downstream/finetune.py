"""The paper's two neural baselines, scored with the same protocol as the LightGBM rows.

* **supervised encoder** (``pretrained=None``): the architecture of ``config``, freshly
  initialised and trained on the labels alone;
* **MeLES fine-tuned** (``pretrained`` given): a copy of the pretrained embedder plus a
  new head, trained on the labels; the encoder gets ``lr / 10`` (it already knows the
  data, the head does not). The pretrained module itself is never modified.

Model: embedder (``normalize=False``) → dropout → ``Linear(output_size, n_classes)``,
cross-entropy (binary targets are two classes; AUROC is scored on ``softmax[:, 1]``).

Protocol: the labelled clients, their label encoding, the stratified test part and the
K folds are exactly those of :func:`~ptls_meles.downstream.evaluate.evaluate` on a
feature table in store order (as ``embed_frame`` and ``handcrafted_features`` write
them), so every row of a comparison table is scored on the same clients. Per fold the
model trains on the fold's train part, keeps the epoch with the best validation-fold
score (stopping after ``patience`` epochs without improvement), and scores the
validation fold and the fixed test part. Because the validation fold also picks the
epoch, cv scores are slightly optimistic; test scores are not.

Inputs: each client's last ``config.max_events`` events, as in ``embed.py``. Training
adds one augmentation, as the reference fine-tuning does with random slices: every
epoch each client is cut to a random contiguous slice of that window, of length uniform
in ``[ceil(min_slice_fraction · L), L]`` (``min_slice_fraction=None`` or ``1`` turns it off).
Batches are length-bucketed (sorted by length within windows of 50 batches, then the
batch order shuffled). Everything random is seeded by ``(seed, fold, epoch)``; the
caller's torch RNG state is left as it was.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..batch import PaddedBatch, pad_segments
from ..config import MeLESConfig
from ..store import SequenceStore, ragged_arange
from .evaluate import (
    EvalResult,
    EvaluationError,
    JoinReport,
    _check_enough_labels,
    check_protocol,
    _encode_labels,
    _resolve_task,
    join_features_and_targets,
)

logger = logging.getLogger(__name__)

ENCODER_LR_FACTOR = 0.1  # pretrained encoder parameters learn at lr × this
BUCKET_WINDOW_BATCHES = 50
_POSITION_COLUMN = "__store_position__"


class FineTuneError(EvaluationError):
    """Bad input for the neural baselines: mismatched encoding, bad settings."""


# --------------------------------------------------------------------------- the split
@dataclass
class CVSplit:
    """Row positions (into the labelled clients) of the protocol's parts.

    ``folds[k] = (fit_rows, val_rows)``; all arrays index the same ``y`` they were made from.
    """

    train_idx: np.ndarray
    test_idx: np.ndarray
    folds: list[tuple[np.ndarray, np.ndarray]]


def cv_split(y: np.ndarray, n_folds: int = 5, test_size: float = 0.1, seed: int = 42) -> CVSplit:
    """The test part and folds that :func:`evaluate` uses for encoded labels ``y`` (same calls, same seed).

    ``y`` must be in the order of ``evaluate``'s join (features table order).
    """
    from sklearn.model_selection import StratifiedKFold, train_test_split

    y = np.asarray(y)
    index = np.arange(len(y))
    if test_size > 0:
        train_idx, test_idx = train_test_split(index, test_size=test_size, stratify=y, random_state=seed)
    else:
        train_idx, test_idx = index, index[:0]
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    pairs = [(train_idx[f], train_idx[v]) for f, v in folds.split(train_idx, y[train_idx])]
    return CVSplit(train_idx, test_idx, pairs)


def labelled_clients(
    store: SequenceStore, targets: pd.DataFrame, target_col: str, id_col: str = "client_id"
) -> tuple[np.ndarray, np.ndarray, JoinReport]:
    """``(store positions, raw labels, join report)`` of the labelled clients, in the order
    ``evaluate`` would see them for a feature table in store order."""
    frame = pd.DataFrame({id_col: store.client_ids, _POSITION_COLUMN: np.arange(store.n_clients, dtype=np.int64)})
    X, y_raw, report = join_features_and_targets(frame, targets, target_col, id_col)
    return X[_POSITION_COLUMN].to_numpy(np.int64), y_raw, report


# --------------------------------------------------------------------------- model
class SequenceClassifier(nn.Module):
    """Embedder (raw, un-normalised output) → dropout → linear head."""

    def __init__(self, embedder: nn.Module, n_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.embedder = embedder
        self.embedder.normalize = False
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(embedder.output_size, n_classes)

    def forward(self, batch: PaddedBatch) -> torch.Tensor:
        return self.head(self.dropout(self.embedder(batch)))


def _check_encoding(pretrained, store: SequenceStore) -> None:
    """The pretrained embedder's ids must mean what the store's ids mean."""
    mine, theirs = store.encoding, pretrained.encoding
    for name in set(mine.categorical) | set(theirs.categorical):
        if name not in mine.categorical or name not in theirs.categorical:
            raise FineTuneError(
                f"categorical field {name!r} is in only one of the store ({sorted(mine.categorical)}) and "
                f"the pretrained model ({sorted(theirs.categorical)}); prepare the data with the model's encoding"
            )
        a, b = mine.categorical[name].values, theirs.categorical[name].values
        if list(a) != list(b):
            diff = next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), min(len(a), len(b)))
            raise FineTuneError(
                f"categorical field {name!r}: the store's vocabulary ({len(a)} values) differs from the pretrained "
                f"model's ({len(b)} values) at position {diff}, e.g. {a[diff] if diff < len(a) else None!r} vs "
                f"{b[diff] if diff < len(b) else None!r}; prepare the data with the model's encoding"
            )
    if sorted(mine.numeric) != sorted(theirs.numeric):
        raise FineTuneError(
            f"numeric fields differ: store {sorted(mine.numeric)}, pretrained model {sorted(theirs.numeric)}"
        )


# --------------------------------------------------------------------------- batches
def _window(store: SequenceStore, clients: np.ndarray, max_events: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``(start, length)`` of each client's last ``max_events`` events."""
    lengths = store.lengths[clients]
    take = lengths if max_events is None else np.minimum(lengths, max_events)
    return store.offsets[clients + 1] - take, take


def _padded(store: SequenceStore, starts: np.ndarray, lengths: np.ndarray) -> PaddedBatch:
    offsets = np.zeros(len(starts) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return pad_segments(store.columns, ragged_arange(starts, lengths), offsets)


def _random_slices(
    starts: np.ndarray, lengths: np.ndarray, min_fraction: float | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random contiguous slices of length uniform in ``[ceil(min_fraction·L), L]`` (≥ 1 event if L ≥ 1)."""
    if min_fraction is None or min_fraction >= 1:
        return starts, lengths
    lo = np.minimum(np.maximum(np.ceil(lengths * min_fraction).astype(np.int64), 1), lengths)
    n = lo + np.floor(rng.random(len(lengths)) * (lengths - lo + 1)).astype(np.int64)
    n = np.minimum(n, lengths)
    begin = np.floor(rng.random(len(lengths)) * (lengths - n + 1)).astype(np.int64)
    return starts + np.minimum(begin, lengths - n), n


def _train_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Positions into ``lengths``: shuffled, sorted by length within windows, batch order shuffled."""
    perm = rng.permutation(len(lengths))
    window = batch_size * BUCKET_WINDOW_BATCHES
    for s in range(0, len(perm), window):
        seg = perm[s : s + window]
        perm[s : s + window] = seg[np.argsort(lengths[seg], kind="stable")]
    batches = [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


@torch.no_grad()
def _predict_proba(
    model: SequenceClassifier, store: SequenceStore, clients: np.ndarray, max_events: int | None, batch_size: int, device
) -> np.ndarray:
    """Class probabilities ``[n, C]`` in the order of ``clients`` (processed in length order)."""
    model.eval()
    starts, lengths = _window(store, clients, max_events)
    order = np.argsort(lengths, kind="stable")
    out = np.zeros((len(clients), model.head.out_features), np.float32)
    for s in range(0, len(order), batch_size):
        rows = order[s : s + batch_size]
        logits = model(_padded(store, starts[rows], lengths[rows]).to(device))
        out[rows] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
    return out


def _score(task: str, y: np.ndarray, proba: np.ndarray) -> float:
    from sklearn.metrics import accuracy_score, roc_auc_score

    if task == "binary":
        return float(roc_auc_score(y, proba[:, 1]))
    return float(accuracy_score(y, proba.argmax(axis=1)))


# --------------------------------------------------------------------------- one fold
@dataclass
class _FoldResult:
    cv_score: float
    test_score: float | None
    best_epoch: int
    seconds: float
    output_size: int


def _train_fold(
    make_model,
    store: SequenceStore,
    clients: np.ndarray,
    y: np.ndarray,
    fit_rows: np.ndarray,
    val_rows: np.ndarray,
    test_rows: np.ndarray,
    *,
    task: str,
    fold: int,
    seed: int,
    config: MeLESConfig,
    head_lr: float,
    encoder_lr: float,
    max_epochs: int,
    batch_size: int,
    freeze_epochs: int,
    patience: int | None,
    min_slice_fraction: float | None,
    device: torch.device,
    bar,
) -> _FoldResult:
    t0 = time.perf_counter()
    torch.manual_seed(seed * 1000 + fold)
    model: SequenceClassifier = make_model().to(device)
    opt = torch.optim.Adam(
        [
            {"params": list(model.embedder.parameters()), "lr": encoder_lr},
            {"params": list(model.head.parameters()), "lr": head_lr},
        ],
        weight_decay=config.weight_decay,
    )
    fit_clients, fit_y = clients[fit_rows], torch.from_numpy(y[fit_rows])
    starts, lengths = _window(store, fit_clients, config.max_events)
    eval_bs = config.embed_batch_size
    best_score, best_epoch, best_state, stale = -math.inf, -1, None, 0
    for epoch in range(max_epochs):
        frozen = epoch < freeze_epochs
        for p in model.embedder.parameters():
            p.requires_grad_(not frozen)
        rng = np.random.default_rng([seed, fold, epoch, 17])
        torch.manual_seed(seed * 1000 + fold * 100 + epoch)  # dropout
        s, n = _random_slices(starts, lengths, min_slice_fraction, rng)
        model.train()
        if frozen:
            model.embedder.eval()  # frozen encoder: no BatchNorm statistics drift either
        for rows in _train_batches(n, batch_size, rng):
            logits = model(_padded(store, s[rows], n[rows]).to(device))
            loss = F.cross_entropy(logits.float(), fit_y[rows].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        proba = _predict_proba(model, store, clients[val_rows], config.max_events, eval_bs, device)
        score = _score(task, y[val_rows], proba)
        bar.update(1)
        bar.set_postfix(fold=fold + 1, epoch=epoch + 1, val=f"{score:.4f}", loss=f"{loss.item():.4f}")
        if score > best_score:
            best_score, best_epoch, stale = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if patience is not None and stale >= patience and epoch + 1 >= freeze_epochs:
                bar.update(max_epochs - epoch - 1)
                break
    model.load_state_dict(best_state)
    test_score = None
    if len(test_rows):
        proba = _predict_proba(model, store, clients[test_rows], config.max_events, eval_bs, device)
        test_score = _score(task, y[test_rows], proba)
    return _FoldResult(best_score, test_score, best_epoch, time.perf_counter() - t0, model.embedder.output_size)


# --------------------------------------------------------------------------- public
def supervised_eval(
    store: SequenceStore,
    targets: pd.DataFrame,
    target_col: str,
    config: MeLESConfig,
    pretrained=None,
    task: Literal["auto", "binary", "multiclass"] = "auto",
    n_folds: int = 5,
    test_size: float = 0.1,
    seed: int = 42,
    max_epochs: int = 10,
    lr: float | None = None,
    batch_size: int = 64,
    freeze_epochs: int = 0,
    show_progress: bool = True,
    *,
    patience: int | None = 3,
    head_dropout: float = 0.1,
    min_slice_fraction: float | None = 0.5,
    id_col: str = "client_id",
    device: str | torch.device | None = None,
) -> EvalResult:
    """Score a supervised encoder (``pretrained=None``) or a fine-tuned MeLES encoder
    (``pretrained``: a ``MeLESModule``) on ``target_col`` with ``evaluate``'s protocol.

    ``config`` gives the architecture (supervised), ``max_events``, ``weight_decay``,
    the inference batch size, and the default ``lr``. Head lr = ``lr``; encoder lr =
    ``lr`` (supervised) or ``lr × 0.1`` (fine-tuned). ``freeze_epochs``: the encoder is
    frozen (head only) for that many first epochs. ``device``: default CUDA when present.
    Returns an :class:`EvalResult` like LightGBM's; ``lgbm_params`` holds the training settings.
    """
    check_protocol(n_folds, test_size, task, FineTuneError)
    if max_epochs < 1 or batch_size < 1 or freeze_epochs < 0:
        raise FineTuneError(
            f"need max_epochs >= 1, batch_size >= 1, freeze_epochs >= 0; got {max_epochs}, {batch_size}, {freeze_epochs}"
        )
    if pretrained is not None:
        _check_encoding(pretrained, store)

    clients, y_raw, report = labelled_clients(store, targets, target_col, id_col)
    classes, y = _encode_labels(y_raw, target_col)
    task = _resolve_task(task, len(classes), target_col)
    _check_enough_labels(y, classes, n_folds, test_size, target_col)
    split = cv_split(y, n_folds, test_size, seed)
    per_class = np.bincount(y[split.train_idx], minlength=len(classes))
    if per_class.min() < n_folds:
        raise FineTuneError(
            f"target {target_col!r}: class {classes[int(per_class.argmin())]!r} has only {int(per_class.min())} "
            f"clients outside the test part, fewer than n_folds={n_folds}"
        )

    from ..train import embedder_from_config

    kind = "meles_finetuned" if pretrained is not None else "supervised_encoder"
    head_lr = float(config.lr if lr is None else lr)
    encoder_lr = head_lr * ENCODER_LR_FACTOR if pretrained is not None else head_lr
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))

    def make_model() -> SequenceClassifier:
        if pretrained is not None:
            embedder = copy.deepcopy(pretrained.embedder).cpu()
        else:
            embedder = embedder_from_config(config, store.encoding)
        return SequenceClassifier(embedder, len(classes), head_dropout)

    folds: list[_FoldResult] = []
    bar = tqdm(total=n_folds * max_epochs, unit="epoch", desc=f"{kind} {target_col}", disable=not show_progress)
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices):
            for fold, (fit_rows, val_rows) in enumerate(split.folds):
                r = _train_fold(
                    make_model, store, clients, y, fit_rows, val_rows, split.test_idx,
                    task=task, fold=fold, seed=seed, config=config, head_lr=head_lr, encoder_lr=encoder_lr,
                    max_epochs=max_epochs, batch_size=batch_size, freeze_epochs=freeze_epochs, patience=patience,
                    min_slice_fraction=min_slice_fraction, device=device, bar=bar,
                )
                folds.append(r)
                output_size = r.output_size
                logger.info("%s %s fold %d/%d: cv %.4f%s (best epoch %d, %.1f s)", kind, target_col, fold + 1,
                            n_folds, r.cv_score, "" if r.test_score is None else f", test {r.test_score:.4f}",
                            r.best_epoch + 1, r.seconds)
    finally:
        bar.close()

    params = {
        "model": kind,
        "encoder": config.encoder if pretrained is None else pretrained.cfg.encoder,
        "hidden_size": config.hidden_size if pretrained is None else pretrained.cfg.hidden_size,
        "max_epochs": max_epochs,
        "best_epochs": [r.best_epoch + 1 for r in folds],
        "lr": head_lr,
        "encoder_lr": encoder_lr,
        "weight_decay": config.weight_decay,
        "batch_size": batch_size,
        "freeze_epochs": freeze_epochs,
        "patience": patience,
        "head_dropout": head_dropout,
        "min_slice_fraction": min_slice_fraction,
        "max_events": config.max_events,
        "fold_seconds": [round(r.seconds, 3) for r in folds],
    }
    result = EvalResult(
        target=target_col,
        task=task,
        metric="auroc" if task == "binary" else "accuracy",
        n_folds=n_folds,
        cv_scores=[r.cv_score for r in folds],
        test_scores=[r.test_score for r in folds if r.test_score is not None],
        n_train=len(split.train_idx),
        n_test=len(split.test_idx),
        n_features=output_size,
        classes=list(classes),
        join=report,
        lgbm_params=params,
        seed=seed,
    )
    logger.info("%s: %s", kind, result.summary())
    return result
