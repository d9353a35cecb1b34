"""The paper's two neural baselines, scored with the same protocol as the LightGBM rows.

* **supervised encoder** (``pretrained=None``): the architecture of ``config``, freshly
  initialised and trained on the labels alone;
* **MeLES fine-tuned** (``pretrained``: a ``MeLESModule`` or anything
  :func:`~ptls_meles.train.load_model` reads): a copy of the pretrained embedder plus a new
  head, trained on the labels; the encoder gets ``lr / 10`` (it already knows the data,
  the head does not). The pretrained module itself is never modified.

Model: :class:`SequenceClassifier`, a LightningModule: embedder (raw, un-normalised
output) → ``BatchNorm1d`` without affine weights → dropout → ``Linear(output_size,
n_classes)``, cross-entropy (binary targets are two classes; AUROC is scored on
``softmax[:, 1]``). The normalisation is there for the fine-tuned model: the parts of a
pretrained embedding differ in spread by ~6× (a mean pools to small spreads, a max to
large values), which one linear head at one learning rate fits badly. Each fold is trained by the package's
one Trainer set-up (:func:`~ptls_meles.train.build_trainer`), as MeLES is:

* batches: :class:`ClientSlices`, the length-bucketed batch plan of
  :class:`~ptls_meles.datamodule.ViewBatches` with one view per client, cut every epoch by
  :func:`~ptls_meles.views.random_slices`: a contiguous slice of length uniform in
  ``[ceil(L/2), L]`` (clients longer than ``config.max_events``: a random window of
  ``max_events`` events), the reference fine-tuning's random-slice augmentation;
* after every epoch the fold's validation part is scored through the shared inference
  path (:func:`~ptls_meles.embed.iter_embeddings`: each client's last ``max_events``
  events) and logged as ``val_score``; ``EarlyStopping`` (``patience``) ends the fold and
  ``ModelCheckpoint`` keeps the best epoch, which then scores the validation and test
  parts; ``max_epochs`` is the cap. ``EvalResult.best_epochs`` reports the kept epochs;
* ``freeze_epochs``: a ``BaseFinetuning`` callback keeps the encoder frozen (weights and
  BatchNorm statistics) for that many first epochs.

Protocol: :mod:`~ptls_meles.downstream.protocol` on the labelled clients in store order (as
``embed_frame`` and ``handcrafted_features`` write them), so every row of a comparison
table is scored on the same clients, test part and folds. Because the validation fold also
picks the epoch, cv scores are slightly optimistic; test scores are not. Everything random
is seeded by ``(seed, fold, epoch)``; the caller's torch RNG state is left as it was.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BaseFinetuning, EarlyStopping, ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from ..batch import PaddedBatch, pad_segments
from ..config import MeLESConfig
from ..datamodule import EpochBatchSampler, ViewBatches
from ..embed import iter_embeddings, window_lengths
from ..views import random_slices
from ..store import SequenceStore
from .protocol import CVPlan, EvalResult, EvaluationError, JoinReport, Task, join_features_and_targets, plan_cv

logger = logging.getLogger(__name__)

ENCODER_LR_FACTOR = 0.1  # pretrained encoder parameters learn at lr × this
_POSITION_COLUMN = "__store_position__"


def labelled_clients(
    store: SequenceStore, targets: pd.DataFrame, target_col: str, id_col: str = "client_id"
) -> tuple[np.ndarray, np.ndarray, JoinReport]:
    """``(store positions, raw labels, join report)`` of the labelled clients, in the order
    ``evaluate`` sees them (by client id), so both draw the same test part and folds."""
    frame = pd.DataFrame({id_col: store.client_ids, _POSITION_COLUMN: np.arange(store.n_clients, dtype=np.int64)})
    X, y_raw, report = join_features_and_targets(frame, targets, target_col, id_col)
    return X[_POSITION_COLUMN].to_numpy(np.int64), y_raw, report


# --------------------------------------------------------------------------- data
class ClientSlices(ViewBatches):
    """Batch ``(epoch, b)`` of :class:`ViewBatches`'s plan as one random slice per client
    (see the module docstring) with the client's class; ``labels[i]`` is ``clients[i]``'s."""

    def __init__(self, store: SequenceStore, clients: np.ndarray, labels: np.ndarray, config: MeLESConfig) -> None:
        super().__init__(store, clients, config)
        self.label_of = np.zeros(store.n_clients, np.int64)
        self.label_of[self.clients] = labels

    def __getitem__(self, key) -> tuple[PaddedBatch, torch.Tensor]:
        epoch, b = key
        clients = self._epoch_plan(epoch)[b]
        starts, lengths = self.offsets[clients], self.offsets[clients + 1] - self.offsets[clients]
        cap = int(window_lengths(lengths, self.config.max_events).max())  # the inference window's size
        # cnt_min = cap + 1: clients within the cap take the split's short-client rule (length uniform
        # in [ceil(L/2), L]); longer clients get a random window of cap events (inference: the last cap)
        rng = np.random.default_rng([self.config.seed, epoch, b, 13])
        views = random_slices(starts, lengths, 1, cap + 1, cap, rng)
        return pad_segments(self.columns, views.index, views.offsets), torch.from_numpy(self.label_of[clients])


# --------------------------------------------------------------------------- model
class SequenceClassifier(pl.LightningModule):
    """Embedder (raw, un-normalised output) → feature standardisation → dropout → linear head; step logic only."""

    def __init__(self, embedder: nn.Module, n_classes: int, dropout: float = 0.0, *, head_lr: float = 1e-3,
                 encoder_lr: float = 1e-3, weight_decay: float = 0.0, max_events: int | None = None, seed: int = 0) -> None:
        super().__init__()
        self.embedder = embedder.train()  # a pretrained copy comes in eval mode; Lightning does not switch it
        self.norm = nn.BatchNorm1d(embedder.output_size, affine=False)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(embedder.output_size, n_classes)
        self.head_lr, self.encoder_lr, self.weight_decay = head_lr, encoder_lr, weight_decay
        self.max_events, self.seed = max_events, seed

    def forward(self, batch: PaddedBatch) -> torch.Tensor:
        return self.head(self.dropout(self.norm(self.embedder(batch))))

    def on_train_epoch_start(self) -> None:
        torch.manual_seed(self.seed * 100 + self.current_epoch)  # dropout depends only on (seed, fold, epoch)

    def training_step(self, batch, batch_idx):
        padded, labels = batch
        loss = F.cross_entropy(self(padded).float(), labels)
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(labels))
        return loss

    def configure_optimizers(self):
        groups = [{"params": list(self.embedder.parameters()), "lr": self.encoder_lr},
                  {"params": list(self.head.parameters()), "lr": self.head_lr}]  # the norm has no parameters
        return torch.optim.Adam(groups, weight_decay=self.weight_decay)

    @torch.no_grad()
    def predict_proba(self, store: SequenceStore, batch_size: int = 256) -> np.ndarray:
        """Class probabilities ``[n_clients, C]`` of every client of ``store``, in store order,
        from each client's last ``max_events`` events (the shared inference path)."""
        out = np.zeros((store.n_clients, self.head.out_features), np.float32)
        was_training = self.norm.training
        self.norm.eval()  # its running statistics; scoring must not move them
        for clients, emb in iter_embeddings(self.embedder, store, self.max_events, batch_size, show_progress=False):
            logits = self.head(self.norm(torch.from_numpy(emb).to(self.head.weight.device)))
            out[clients] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        self.norm.train(was_training)
        return out


class FreezeEncoder(BaseFinetuning):
    """The encoder stays frozen for the first ``epochs`` epochs: no gradients, and in eval
    mode, so its (masked) BatchNorm statistics do not drift either. Its parameters are in
    the optimizer from the start, at the encoder lr."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs

    def freeze_before_training(self, pl_module: SequenceClassifier) -> None:
        if self.epochs > 0:
            self.freeze(pl_module.embedder, train_bn=False)

    def finetune_function(self, pl_module: SequenceClassifier, epoch: int, optimizer) -> None:
        if epoch < self.epochs:
            pl_module.embedder.eval()
        elif epoch == self.epochs > 0:
            self.make_trainable(pl_module.embedder)
            pl_module.embedder.train()


class ValidationScore(pl.Callback):
    """Scores the fold's validation part after every training epoch and logs it as
    ``val_score`` (listed before EarlyStopping and ModelCheckpoint, which read it)."""

    def __init__(self, plan: CVPlan, rows: np.ndarray, store: SequenceStore, batch_size: int) -> None:
        self.plan, self.rows, self.store, self.batch_size = plan, rows, store, batch_size
        self.scores: list[float] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: SequenceClassifier) -> None:
        self.scores.append(self.plan.score(self.rows, pl_module.predict_proba(self.store, self.batch_size)))
        pl_module.log("val_score", self.scores[-1], prog_bar=True)


# --------------------------------------------------------------------------- one fold
def train_fold(
    model: SequenceClassifier,
    data: ClientSlices,
    validation: ValidationScore,
    *,
    max_epochs: int,
    patience: int | None,
    freeze_epochs: int,
    show_progress: bool,
    accelerator: str,
    precision: str = "32",
) -> int:
    """Train ``model`` on one fold; it ends in its best epoch's state, returned (0-based)."""
    from ..train import build_trainer, load_weights, quiet_lightning

    loader = DataLoader(data, batch_size=None, sampler=EpochBatchSampler(len(data)), num_workers=0)
    with tempfile.TemporaryDirectory(prefix="ptls-meles-fold-") as tmp:
        best = ModelCheckpoint(dirpath=tmp, filename="best", monitor="val_score", mode="max", save_top_k=1,
                               save_weights_only=True, save_on_train_epoch_end=True)
        callbacks: list[pl.Callback] = [validation, FreezeEncoder(freeze_epochs), best]
        if patience is not None:
            callbacks.insert(2, EarlyStopping("val_score", mode="max", patience=patience, check_on_train_epoch_end=True))
        with quiet_lightning():
            trainer = build_trainer(max_epochs, callbacks, len(data), show_progress, precision, accelerator=accelerator, devices=1,
                                    min_epochs=max(freeze_epochs, 1), default_root_dir=tmp)
            trainer.fit(model, train_dataloaders=loader)
        checkpoint = load_weights(best.best_model_path)
    model.load_state_dict(checkpoint["state_dict"])
    return int(checkpoint["epoch"])


# --------------------------------------------------------------------------- public
def supervised_eval(
    store: SequenceStore,
    targets: pd.DataFrame,
    target_col: str,
    config: MeLESConfig,
    pretrained=None,
    task: Task = "auto",
    n_folds: int = 5,
    test_size: float = 0.1,
    seed: int = 42,
    max_epochs: int = 50,
    lr: float | None = None,
    batch_size: int = 64,
    freeze_epochs: int = 0,
    show_progress: bool = True,
    *,
    patience: int | None = 5,
    head_dropout: float = 0.1,
    id_col: str = "client_id",
    accelerator: str = "auto",
) -> EvalResult:
    """Score a supervised encoder (``pretrained=None``) or a fine-tuned MeLES encoder
    (``pretrained``: a ``MeLESModule``, or a saved model / run directory / checkpoint) on
    ``target_col`` with ``evaluate``'s protocol.

    ``config`` gives the architecture (supervised), ``max_events``, ``weight_decay``,
    ``precision``, the inference batch size, and the default ``lr``. Head lr = ``lr``; encoder lr =
    ``lr`` (supervised) or ``lr × 0.1`` (fine-tuned). Each fold trains until its
    validation score has not improved for ``patience`` epochs (``None``: never stops
    early), at most ``max_epochs``; ``freeze_epochs``: the encoder is frozen (head only)
    for that many first epochs. Returns an :class:`EvalResult` like LightGBM's, with the
    training settings in ``params`` and the kept epoch of each fold in ``best_epochs``.
    """
    if max_epochs < 1 or batch_size < 1 or freeze_epochs < 0 or (patience is not None and patience < 1):
        raise EvaluationError(f"need max_epochs >= 1, batch_size >= 1, freeze_epochs >= 0, patience >= 1 or None; "
                              f"got {max_epochs}, {batch_size}, {freeze_epochs}, {patience}")
    if isinstance(pretrained, (str, os.PathLike)):
        from ..train import load_model

        pretrained = load_model(Path(pretrained))
    if pretrained is not None:
        from ..api import check_store_encoding

        check_store_encoding(pretrained.encoding, store)  # its ids must mean what the store's ids mean

    clients, y_raw, report = labelled_clients(store, targets, target_col, id_col)
    plan = plan_cv(y_raw, report, target_col, task, n_folds, test_size, seed)
    from ..train import embedder_from_config

    kind = "meles_finetuned" if pretrained is not None else "supervised_encoder"
    head_lr = float(config.lr if lr is None else lr)
    encoder_lr = head_lr * ENCODER_LR_FACTOR if pretrained is not None else head_lr
    test_store = store.take(clients[plan.test_idx])

    cv_scores, test_scores, best_epochs, seconds = [], [], [], []
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        for fold, (fit_rows, val_rows) in enumerate(plan.folds):
            t0 = time.perf_counter()
            fold_seed = seed * 1000 + fold
            torch.manual_seed(fold_seed)
            embedder = copy.deepcopy(pretrained.embedder).cpu() if pretrained is not None else embedder_from_config(config, store.encoding)
            model = SequenceClassifier(embedder, len(plan.classes), head_dropout, head_lr=head_lr, encoder_lr=encoder_lr,
                                       weight_decay=config.weight_decay, max_events=config.max_events, seed=fold_seed)
            data = ClientSlices(store, clients[fit_rows], plan.y[fit_rows],
                                dataclasses.replace(config, batch_size=batch_size, seed=fold_seed))
            validation = ValidationScore(plan, val_rows, store.take(clients[val_rows]), config.embed_batch_size)
            best = train_fold(model, data, validation, max_epochs=max_epochs, patience=patience, freeze_epochs=freeze_epochs,
                              show_progress=show_progress, accelerator=accelerator, precision=config.precision)
            cv_scores.append(validation.scores[best])
            if len(plan.test_idx):
                test_scores.append(plan.score(plan.test_idx, model.predict_proba(test_store, config.embed_batch_size)))
            best_epochs.append(best + 1)
            seconds.append(round(time.perf_counter() - t0, 3))
            logger.info("%s %s fold %d/%d: cv %.4f%s (best epoch %d of %d, %.1f s)", kind, target_col, fold + 1, n_folds,
                        cv_scores[-1], f", test {test_scores[-1]:.4f}" if test_scores else "", best + 1,
                        len(validation.scores), seconds[-1])

    params = {
        "encoder": (pretrained.config if pretrained is not None else config).encoder,
        "hidden_size": (pretrained.config if pretrained is not None else config).hidden_size,
        "max_epochs": max_epochs, "patience": patience, "freeze_epochs": freeze_epochs,
        "lr": head_lr, "encoder_lr": encoder_lr, "weight_decay": config.weight_decay, "batch_size": batch_size,
        "head_dropout": head_dropout, "max_events": config.max_events, "fold_seconds": seconds,
    }
    return plan.result(cv_scores, test_scores, embedder.output_size, kind, params, best_epochs)
