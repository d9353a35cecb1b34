"""Self-supervised MeLES training: the LightningModule and the ``fit`` function."""
from __future__ import annotations

import logging
import math
import os
import signal
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import pytorch_lightning as pl
import torch
from torch.nn.functional import normalize

from .allocator import reuse_freed_memory
from .config import MeLESConfig
from .datamodule import MeLESDataModule, trainer_epoch
from .encoding import Encoding
from .io_utils import read_json
from .losses import make_loss
from .metrics import recall_at_k
from .nn import build_embedder
from .schedule import BudgetCosine
from .store import ENCODING_FILE, SequenceStore

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"  # the weights of a saved model directory (MeLES.save)


def saved_model_dir(path: Path) -> Path:
    """The saved model directory of ``path``: ``path/model`` for a run directory of ``fit``."""
    return path / "model" if (path / "model" / MODEL_FILE).exists() else path


def embedder_from_config(config: MeLESConfig, encoding: Encoding):
    """The embedder a config describes, sized by the encoding's vocabularies."""
    categorical = {c: (v.size, config.embedding_dim_of(c)) for c, v in encoding.categorical.items()}
    kwargs = dict(config.encoder_kwargs)
    if config.num_layers is not None:  # None: the encoder class's own depth
        kwargs["num_layers"] = config.num_layers
    if config.encoder == "transformer":
        # for the Transformer, "last" (the default) is its learned summary (CLS) token
        kwargs.setdefault("pooling", "cls" if config.pooling == "last" else config.pooling)
    else:
        kwargs.setdefault("pooling", config.pooling)
    if "daytime" in config.parts("time_features") and encoding.time_format not in ("timestamp", "day_hms"):
        raise ValueError(
            f"time_features 'daytime' needs event times in seconds (time format 'timestamp' or 'day_hms'); "
            f"this store's time column {encoding.time_col!r} has format {encoding.time_format!r}"
        )
    if config.category_pooling and not categorical and "category_pooling" in getattr(config, "_given", ()):
        raise ValueError(
            f"category_pooling={config.category_pooling} pools the events of each value of the first categorical "
            f"field apart, but this store has no categorical field (numeric: {', '.join(encoding.numeric) or 'none'}): "
            "set category_pooling=0, or leave it at the default, which is off for such data"
        )
    return build_embedder(
        categorical,
        list(encoding.numeric),
        config.encoder,
        config.hidden_size,
        time_features=config.parts("time_features"),
        numeric_encoding=config.parts("numeric_encoding"),
        category_pooling=config.category_pooling,
        category_width=config.category_width,
        category_statistics=config.parts("category_statistics"),
        category_inputs=config.parts("category_inputs"),
        category_share_pooling=config.category_share_pooling,
        event_bag=config.event_bag,
        **kwargs,
    )


#: the auxiliary losses training_step may add, in a fixed order (``aux_reference``'s slots)
AUX_LOSSES = ("next_event_loss", "view_stats_loss")
#: training steps whose mean auxiliary loss becomes its reference (``aux_relative``)
AUX_REFERENCE_STEPS = 100


class MeLESModule(pl.LightningModule):
    """Step logic only: embed views, L2-normalise them, mine pairs, compute the loss;
    validation recall@(k−1). The embedder itself stays raw (what ``embed`` writes)."""

    def __init__(self, config: MeLESConfig | dict, encoding: Encoding | dict) -> None:
        super().__init__()
        # a dict is a saved config (checkpoint, model directory)
        self.config = config if isinstance(config, MeLESConfig) else MeLESConfig.from_dict(config, saved=True)
        self.encoding = encoding if isinstance(encoding, Encoding) else Encoding.from_dict(encoding)
        # plain dicts travel inside every checkpoint (loadable with weights_only)
        self.save_hyperparameters({"config": self.config.to_dict(), "encoding": self.encoding.to_dict()})
        self.embedder = embedder_from_config(self.config, self.encoding)
        self.loss_fn = make_loss(
            self.config.loss, miner=self.config.miner, margin=self.config.margin, neg_count=self.config.neg_count,
            **({"temperature": self.config.temperature} if self.config.loss == "infonce" else {}),
        )
        self.next_event = None
        if "next_event" in self.config.parts("aux_objective"):
            from .nn.next_event import NextEventHead

            first = next(iter(self.encoding.categorical), None)
            self.next_event = NextEventHead(
                self.config.hidden_size, first, self.encoding.categorical[first].size if first else 0,
                list(self.encoding.numeric), predict_gap=bool(self.config.parts("time_features")),
            )
        self.view_stats = None
        if "view_stats" in self.config.parts("aux_objective"):
            from .nn.view_stats import ViewStatsHead

            self.view_stats = ViewStatsHead(
                self.embedder.output_size, {c: v.size for c, v in self.encoding.categorical.items()},
                list(self.encoding.numeric), use_time=bool(self.config.parts("time_features")),
                statistics=self.config.parts("view_statistics"), hidden_size=self.head_hidden_size,
            )
        if self.config.aux_relative and (self.next_event is not None or self.view_stats is not None):
            # each auxiliary loss's mean over its first AUX_REFERENCE_STEPS steps (saved with the weights)
            self.register_buffer("aux_reference", torch.zeros(len(AUX_LOSSES)))
            self.register_buffer("aux_reference_steps", torch.zeros((), dtype=torch.long))
        self.projection = None
        if self.config.projection_head:
            hidden = self.head_hidden_size
            self.projection = torch.nn.Sequential(torch.nn.Linear(self.embedder.output_size, hidden), torch.nn.ReLU(),
                                                  torch.nn.Linear(hidden, self.config.projection_head))
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, batch):
        return self.embedder(batch)

    @property
    def head_hidden_size(self) -> int:
        """The training heads' hidden width: the embedding's, capped at ``head_width`` when set."""
        width = self.embedder.output_size
        return min(width, self.config.head_width) if self.config.head_width else width

    @property
    def inference_settings(self) -> dict:
        """How this model embeds clients (``embed.iter_embeddings``'s settings): each client's
        last ``max_events`` events (in chunks of ``embed_chunk``), ``embed_batch_size`` clients per batch."""
        return {"max_events": self.config.max_events, "batch_size": self.config.embed_batch_size, "chunk": self.config.embed_chunk}

    def on_train_epoch_start(self) -> None:
        # dropout etc. depend only on (seed, epoch): resumed runs repeat uninterrupted ones
        torch.manual_seed(self.config.seed * 1000 + trainer_epoch(self.trainer))

    def metric_space(self, emb: torch.Tensor) -> torch.Tensor:
        """Where the loss compares views: the L2-normalised embedding, or projection head output.
        Always float32, also under bf16 mixed precision: cosine similarities of ~0.99 and the
        margins between them need more than bfloat16's 8 bits of mantissa."""
        with torch.autocast(emb.device.type, enabled=False):
            emb = emb.float()
            return normalize(emb if self.projection is None else self.projection(emb), dim=-1)

    def _metric_loss(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(emb.device.type, enabled=False):  # the miner's distances in float32 too
            return self.loss_fn(emb, labels)

    def training_step(self, batch, batch_idx):
        padded, labels = batch
        if self.next_event is None:
            raw = self.embedder(padded)
        else:
            raw, sequence = self.embedder(padded, return_sequence=True)
        loss = self._metric_loss(self.metric_space(raw), labels)
        n_clients = int(labels.max()) + 1
        aux = {}
        if self.next_event is not None:
            aux["next_event_loss"] = self.next_event(sequence, padded)
        if self.view_stats is not None:
            # the embedding itself (not the head's output), on the unit sphere
            aux["view_stats_loss"] = self.view_stats(normalize(raw.float(), dim=-1), padded, labels)
        for name, value in self.relative_to_start(aux).items():
            loss = loss + self.config.aux_weight * value
            self.log(name, aux[name], on_step=False, on_epoch=True, batch_size=n_clients)
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n_clients)
        return loss

    def relative_to_start(self, aux: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """With ``aux_relative``: each auxiliary loss over its running mean of the first
        ``AUX_REFERENCE_STEPS`` training steps (then frozen), so its size starts at 1
        whatever the data's vocabulary; otherwise the losses as they are."""
        if not self.config.aux_relative:
            return aux
        steps = int(self.aux_reference_steps)
        if steps < AUX_REFERENCE_STEPS:
            for name, value in aux.items():
                i = AUX_LOSSES.index(name)
                self.aux_reference[i] += (value.detach().float() - self.aux_reference[i]) / (steps + 1)
            self.aux_reference_steps += 1
        return {name: value / self.aux_reference[AUX_LOSSES.index(name)].clamp(min=1e-8) for name, value in aux.items()}

    def validation_step(self, batch, batch_idx):
        padded, labels = batch
        emb = self.metric_space(self.embedder(padded))
        self._val.append((emb.detach().cpu(), labels.cpu() + batch_idx * (10**6)))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        emb = torch.cat([e for e, _ in self._val])
        labels = torch.cat([l for _, l in self._val])
        self._val.clear()
        r = recall_at_k(emb, labels, self.config.split_count - 1)
        self.log("val_recall", r, prog_bar=True)

    def configure_optimizers(self):
        c = self.config
        if c.weight_decay:
            opt = torch.optim.AdamW(self.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        else:
            opt = torch.optim.Adam(self.parameters(), lr=c.lr)
        if c.lr_schedule == "cosine":  # over max_epochs or max_minutes, whichever ends training first
            budget = c.max_minutes * 60 if c.max_minutes is not None else None
            sched = BudgetCosine(opt, total_steps=self.trainer.estimated_stepping_batches, budget_seconds=budget)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=c.lr_step_size, gamma=c.lr_gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class NonFiniteLossError(ValueError):
    """Training diverged: the loss became NaN or infinite."""


class StopOnNonFiniteLoss(pl.Callback):
    """Stop training with a clear error at the first NaN or infinite loss, instead of training
    on and saving a model whose every embedding is NaN."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLossError(
                f"training stopped: the loss became {float(loss)} at epoch {trainer.current_epoch}, batch {batch_idx}. "
                "Inputs with very large values (e.g. amounts with --num-transform identity) or too high a learning rate "
                "make the network diverge: use --num-transform log or standardize, or a lower lr (--set lr=...)"
            )


class AtomicModelCheckpoint(pl.callbacks.ModelCheckpoint):
    """A ModelCheckpoint whose files appear whole: written under a temporary name, then
    renamed, so a kill during the write never destroys the previous ``last.ckpt``."""

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        tmp = str(Path(filepath).with_name(f".{Path(filepath).name}.tmp"))
        super()._save_checkpoint(trainer, tmp)
        if trainer.is_global_zero:
            os.replace(tmp, filepath)
        self._last_checkpoint_saved = filepath


# settings that define the network's parameters: a checkpoint can only be resumed with the same
ARCHITECTURE_SETTINGS = ("cat_embedding_dim", "cat_embedding_dims", "time_features", "encoder", "hidden_size", "num_layers", "encoder_kwargs")


def check_resumable(ckpt: dict, path: Path, store: SequenceStore, config: MeLESConfig) -> None:
    """Refuse to resume from a checkpoint made for another store encoding (its category ids
    would mean other values) or another network shape, naming the difference."""
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or "config" not in hp or "encoding" not in hp:
        raise UnsafeOrCorruptModelError(f"{path}: not a ptls-meles training checkpoint (no config and encoding inside)")
    why = Encoding.from_dict(hp["encoding"]).mismatch(store.encoding)
    if why is not None:
        raise ValueError(f"cannot resume from {path}: the store was encoded differently from the checkpoint's training data "
                         f"({why}); resume with the store the run was trained on, or start a new run with another --out")
    saved = MeLESConfig.from_dict(hp["config"], saved=True).to_dict()
    wanted = config.to_dict()
    changed = [f"{k}={saved[k]!r} in the checkpoint, {wanted[k]!r} now" for k in ARCHITECTURE_SETTINGS if saved[k] != wanted[k]]
    if changed:
        raise ValueError(f"cannot resume from {path}: the network differs ({'; '.join(changed)}); "
                         "resume with the checkpoint's settings, or start a new run with another --out")


def _ignore_child_exit(signum, frame) -> None:
    """SIGCHLD during a SIGTERM shutdown: the DataLoader workers die of the same signal."""


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a job scheduler, ``kill``, ``timeout``) stops training as Ctrl-C does: Lightning's
    graceful shutdown, which keeps the last checkpoint, instead of a traceback. DataLoader
    workers die of the same signal (torch's worker handler re-raises it), so their exit is
    no longer reported as an error once the shutdown has begun."""
    def interrupt(signum, frame):
        # torch's "worker killed by signal" check off. A no-op handler, not SIG_DFL: a SIGCHLD that
        # already arrived would otherwise surface as "OSError: Signal 17 ignored due to race condition"
        signal.signal(signal.SIGCHLD, _ignore_child_exit)
        raise KeyboardInterrupt(f"received signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    previous_chld = signal.getsignal(signal.SIGCHLD)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if signal.getsignal(signal.SIGCHLD) is _ignore_child_exit and previous_chld is not None:
            signal.signal(signal.SIGCHLD, previous_chld)


def fit(
    store: SequenceStore,
    config: MeLESConfig,
    out_dir: str | Path | None = None,
    resume: bool | str | Path = False,
    accelerator: str = "auto",
    devices: int | str = 1,
    show_progress: bool = True,
    **trainer_kwargs,
) -> MeLESModule:
    """Train a MeLES encoder on a store; returns the module with the best validation recall.

    ``out_dir`` receives ``checkpoints/`` (last + best, each carrying config and encoding)
    and ``logs/`` (CSV metrics). ``resume=True`` continues from ``checkpoints/last.ckpt``.
    """
    pl.seed_everything(config.seed, workers=True, verbose=False)
    if store.n_clients < 2:
        raise ValueError(f"training needs at least 2 clients, the store has {store.n_clients}")
    out_dir = Path(out_dir) if out_dir is not None else None
    dm = MeLESDataModule(store, config)
    module = MeLESModule(config, store.encoding)
    module.embedder.event_encoder.fit_value_moments(store.columns)  # no labels: all clients may inform the scale
    if module.view_stats is not None:
        module.view_stats.fit_value_moments(store.columns, store.offsets)
    if module.next_event is not None:
        module.next_event.fit_value_moments(store.columns)
    has_val = len(dm.val_clients) >= 2
    callbacks: list[pl.Callback] = [StopOnNonFiniteLoss()]
    ckpt_cb = None
    if out_dir is not None:
        if has_val:
            ckpt_cb = AtomicModelCheckpoint(
                dirpath=out_dir / "checkpoints", filename="best", monitor="val_recall", mode="max", save_top_k=1, save_weights_only=False,
            )
            callbacks.append(ckpt_cb)
        # last.ckpt every epoch, whatever the monitored metric does (a ModelCheckpoint with a
        # monitor writes save_last only when it improves): a killed run resumes where it stopped.
        # With validation it is written after validation, so early stopping and best-score state are current.
        callbacks.append(AtomicModelCheckpoint(
            dirpath=out_dir / "checkpoints", filename="last", monitor=None, save_top_k=1, save_weights_only=False,
            enable_version_counter=False, save_on_train_epoch_end=not has_val,
        ))
    if has_val and config.patience:
        callbacks.append(pl.callbacks.EarlyStopping("val_recall", mode="max", patience=config.patience))
    if not has_val:
        trainer_kwargs.setdefault("limit_val_batches", 0)
    # a resumed run logs beside the original run's metrics.csv instead of overwriting it
    version = time.strftime("resumed-%Y%m%d-%H%M%S") if resume else ""
    logger = pl.loggers.CSVLogger(str(out_dir), name="logs", version=version) if out_dir is not None else False
    n_batches = -(-len(dm.train_clients) // config.batch_size)
    if config.max_minutes is not None:
        trainer_kwargs.setdefault("max_time", {"seconds": int(round(config.max_minutes * 60))})
    if config.grad_clip is not None:
        trainer_kwargs.setdefault("gradient_clip_val", config.grad_clip)
    ckpt_path = None
    if resume:
        ckpt_path = Path(resume) if not isinstance(resume, bool) else (out_dir / "checkpoints" / "last.ckpt" if out_dir else None)
        if ckpt_path is None or not ckpt_path.exists():
            raise FileNotFoundError(f"cannot resume: no checkpoint at {ckpt_path}")
        # a corrupt or code-carrying checkpoint, or one made for another store or network, fails here with a clear error
        check_resumable(load_weights(ckpt_path), ckpt_path, store, config)
    with quiet_lightning(), sigterm_as_interrupt():
        trainer = build_trainer(config.max_epochs, callbacks, n_batches, show_progress, config.precision, logger=logger,
                                accelerator=accelerator, devices=devices, default_root_dir=str(out_dir) if out_dir else None, **trainer_kwargs)
        trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    if ckpt_cb is not None and ckpt_cb.best_model_path and has_val:
        best = load_model(ckpt_cb.best_model_path)
        return best
    return module


@contextmanager
def quiet_lightning():
    """Lightning's advertising tip (at Trainer construction) and a deprecation inside Lightning
    itself (during fit) are noise to our users: silenced while our Trainer is built and runs,
    not for the whole process."""
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")

    def no_tip(record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
        rank_zero.addFilter(no_tip)
        try:
            yield
        finally:
            rank_zero.removeFilter(no_tip)


def native_bf16(accelerator: str = "auto") -> bool:
    """Whether the device that ``accelerator`` trains on computes bfloat16 natively: a GPU
    with bf16, or a CPU with AVX512-BF16 or AMX tiles. Elsewhere bf16 is emulated and slower
    than float32, so ``precision="auto"`` stays at 32."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return any(getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def lightning_precision(precision: str, accelerator: str = "auto") -> str:
    """A config's ``precision`` ("auto", "32", "bf16") as Lightning's Trainer argument."""
    if precision == "auto":
        precision = "bf16" if native_bf16(accelerator) else "32"
    return {"32": "32-true", "bf16": "bf16-mixed"}[precision]


def build_trainer(max_epochs: int, callbacks: list[pl.Callback], n_batches: int, show_progress: bool = True,
                  precision: str = "32", **trainer_kwargs) -> pl.Trainer:
    """The one Trainer set-up of every network the package trains (MeLES and the neural
    baselines): no sanity steps, no model summary, our own batch samplers, checkpointing
    exactly when a ``ModelCheckpoint`` is among ``callbacks``; ``precision`` as in
    :class:`~ptls_meles.config.MeLESConfig`."""
    reuse_freed_memory()
    trainer_kwargs.setdefault("logger", False)
    trainer_kwargs["precision"] = lightning_precision(precision, trainer_kwargs.get("accelerator", "auto"))
    checkpointing = any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks)
    return pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, enable_checkpointing=checkpointing,
                      enable_progress_bar=show_progress, enable_model_summary=False, use_distributed_sampler=False,
                      num_sanity_val_steps=0, deterministic=False, log_every_n_steps=max(1, min(10, n_batches)),
                      **trainer_kwargs)


class UnsafeOrCorruptModelError(ValueError):
    """A model file that holds pickled code (refused) or is not a readable torch file."""


def load_weights(path: str | os.PathLike | BinaryIO):
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only, so a
    crafted file cannot run code; refusals and corrupt files raise a clear error."""
    import pickle

    if isinstance(path, (str, os.PathLike)) and Path(path).is_file() and Path(path).stat().st_size == 0:
        raise UnsafeOrCorruptModelError(f"{path}: not a readable model file (the file is empty); save or train the model again")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:
        detail = str(exc).split("WeightsUnpickler error:")[-1].strip().split(". Please use")[0].split("\n")[0]
        if "Unsupported global" not in detail:
            raise UnsafeOrCorruptModelError(f"{path}: not a readable model file ({detail})") from None
        raise UnsafeOrCorruptModelError(
            f"{path}: refused to load, the file holds objects other than weights (loaded with weights_only=True): {detail}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]  # an EOFError can have no message
        raise UnsafeOrCorruptModelError(f"{path}: not a readable model file ({first_line}); the file is truncated or not a model") from None


def load_model(source: str | os.PathLike | BinaryIO) -> MeLESModule:
    """The one way a trained MeLES module is rebuilt from disk, weights only (never unpickles code).

    ``source``: a saved model directory (``model.pt``, ``config.json``, ``encoding.json``,
    as ``MeLES.save`` writes it), a run directory holding one in ``model/``, a training
    checkpoint (``.ckpt``), or an open binary file holding a checkpoint-shaped dict
    ``{"hyper_parameters": {"config", "encoding"}, "state_dict"}`` (what Spark broadcasts).
    """
    path = Path(source) if isinstance(source, (str, os.PathLike)) else None
    if path is not None and path.suffix != ".ckpt":
        path = saved_model_dir(path)
        if not (path / MODEL_FILE).exists():
            raise FileNotFoundError(f"no saved MeLES model in {path} (expected {MODEL_FILE}, config.json, encoding.json)")
        state = load_weights(path / MODEL_FILE)
        hp = {"config": read_json(path / "config.json", "config"), "encoding": Encoding.load(path / ENCODING_FILE).to_dict()}
    else:
        if path is not None and not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}")
        ckpt = load_weights(source)
        hp, state = ckpt["hyper_parameters"], ckpt["state_dict"]
    try:
        module = MeLESModule(hp["config"], hp["encoding"])
        module.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError) as exc:
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UnsafeOrCorruptModelError(f"{path or 'checkpoint'}: not a ptls-meles model of this version ({first_line})") from None
    module.eval()
    return module
