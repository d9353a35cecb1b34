"""Training data: batches of clients → views → padded batches, in a Lightning DataModule.

A batch is built whole inside a worker process (clients → views → one padded tensor
per field), seeded by (seed, epoch, batch number) so every run — with any number of
workers, resumed or not — sees exactly the same batches.
"""
from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .batch import PaddedBatch, pad_segments
from .config import MeLESConfig
from .views import make_views
from .store import SequenceStore


def trainer_epoch(trainer: pl.Trainer) -> int:
    """The training epoch now running, by Lightning's own progress counter: the one reading
    behind both the batch plan and the per-epoch seed, so they agree after a resume too."""
    return trainer.fit_loop.epoch_progress.current.processed


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # two busy cores: oversubscribed threads slow everything down


class EpochBatchSampler(Sampler):
    """Yields ``(epoch, batch_number)`` keys; Lightning calls ``set_epoch`` every epoch.

    With ``num_replicas > 1`` (DDP) each process takes every ``num_replicas``-th batch, so
    all views of a client stay inside one process's batch. Every process must run the same
    number of steps (a process with one batch more waits forever in the gradient
    all-reduce), so each takes ``n_batches // num_replicas`` batches: the last
    ``n_batches % num_replicas`` batches of the epoch's shuffled order are left out (other
    clients each epoch, as the order is reshuffled). With fewer batches than processes,
    each process takes one batch and some processes share a batch.
    """

    def __init__(self, n_batches: int, num_replicas: int = 1, rank: int = 0, epoch_fn=None) -> None:
        self.n_batches, self.num_replicas, self.rank, self.epoch = n_batches, num_replicas, rank, 0
        # Lightning does not call set_epoch on the first epoch after a resume, so the
        # trainer's own epoch counter (trainer_epoch), when given, is the source of truth
        self.epoch_fn = epoch_fn

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batch_numbers(self) -> list[int]:
        """This process's batch numbers: as many for every rank (see the class docstring)."""
        if self.num_replicas == 1 or self.n_batches == 0:
            return list(range(self.n_batches))
        per_rank = max(1, self.n_batches // self.num_replicas)
        return [(self.rank + i * self.num_replicas) % self.n_batches for i in range(per_rank)]

    def __len__(self) -> int:
        return len(self.batch_numbers())

    def __iter__(self):
        if self.epoch_fn is not None:
            self.epoch = int(self.epoch_fn())
        return iter([(self.epoch, b) for b in self.batch_numbers()])


class ViewBatches(Dataset):
    """Item ``(epoch, b)`` = batch ``b`` of that epoch's client permutation, as views.

    Returns ``(PaddedBatch, labels)`` with labels = client position within the batch.
    Clients are length-bucketed: the epoch's permutation is sorted by length within
    windows of 50 batches, so clients of similar length (hence similar view lengths)
    share a batch, then batch order is shuffled. A lone client left over joins the last batch.
    """

    def __init__(self, store: SequenceStore, clients: np.ndarray, config: MeLESConfig, fixed_epoch: int | None = None) -> None:
        self.offsets = store.offsets
        self.columns = store.columns
        self.clients = np.asarray(clients, dtype=np.int64)
        self.config = config
        self.fixed_epoch = fixed_epoch
        n, size = len(self.clients), config.batch_size
        # a lone client in the last batch has no negatives (and breaks a BatchNorm over clients):
        # it joins the batch before instead
        self.n_batches = -(-n // size) - (1 if n > size and n % size == 1 else 0)
        self._plan: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.n_batches

    def _epoch_plan(self, epoch: int) -> np.ndarray:
        if self._plan is None or self._plan[0] != epoch:
            rng = np.random.default_rng([self.config.seed, epoch, 7])
            perm = rng.permutation(self.clients)
            window = self.config.batch_size * 50
            lens = self.offsets[perm + 1] - self.offsets[perm]
            for s in range(0, len(perm), window):
                seg = slice(s, s + window)
                perm[seg] = perm[seg][np.argsort(lens[seg], kind="stable")]
            starts = np.arange(self.n_batches) * self.config.batch_size
            batches = np.split(perm, starts[1:])  # the last batch takes what is left
            order = rng.permutation(len(batches))
            self._plan = (epoch, [batches[i] for i in order])
        return self._plan[1]

    def __getitem__(self, key) -> tuple[PaddedBatch, torch.Tensor]:
        epoch, b = key if isinstance(key, tuple) else (0, key)
        if self.fixed_epoch is not None:
            epoch = self.fixed_epoch
        clients = self._epoch_plan(epoch)[b]
        rng = np.random.default_rng([self.config.seed, epoch, b, 11])
        c = self.config
        views = make_views(self.offsets, clients, c.split, c.split_count, c.cnt_min, c.cnt_max, rng, c.long_view)
        batch = pad_segments(self.columns, views.index, views.offsets)
        return batch, torch.from_numpy(views.label.astype(np.int64))


def train_val_clients(n_clients: int, val_fraction: float, max_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train / validation split of client positions."""
    rng = np.random.default_rng([seed, 3])
    perm = rng.permutation(n_clients)
    n_val = min(int(round(n_clients * val_fraction)), max_val)
    if n_clients - n_val < 2:
        raise ValueError(f"need at least 2 training clients, got {n_clients} clients with {n_val} held out for validation")
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class MeLESDataModule(pl.LightningDataModule):
    """Train batches of views from the training clients; fixed validation views of held-out clients."""

    def __init__(self, store: SequenceStore, config: MeLESConfig) -> None:
        super().__init__()
        self.store, self.config = store, config
        self.train_clients, self.val_clients = train_val_clients(store.n_clients, config.val_fraction, config.max_val_clients, config.seed)

    def _loader(self, dataset: ViewBatches, sampler) -> DataLoader:
        workers = self.config.num_workers
        return DataLoader(
            dataset,
            batch_size=None,
            sampler=sampler,
            num_workers=workers,
            worker_init_fn=_worker_init if workers else None,
            persistent_workers=bool(workers),  # safe: batch keys carry the epoch
            prefetch_factor=4 if workers else None,
            collate_fn=None,
        )

    def train_dataloader(self) -> DataLoader:
        ds = ViewBatches(self.store, self.train_clients, self.config)
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        epoch_fn = (lambda: trainer_epoch(trainer)) if trainer is not None else None
        return self._loader(ds, EpochBatchSampler(len(ds), world, rank, epoch_fn))

    def val_dataloader(self) -> DataLoader | list:
        if len(self.val_clients) < 2:
            return []
        ds = ViewBatches(self.store, self.val_clients, self.config, fixed_epoch=-1 % 2**31)
        return self._loader(ds, EpochBatchSampler(len(ds)))
