"""Where a training step's time goes: data, event encoder, GRU, pooling, miner, loss, optimizer, Lightning.

    ptls-meles bench profile [--clients 3000] [--steps 40] [--threads 1] [--set hidden_size=128 ...]

Builds (once, cached under ``--work``) the speed benchmark's synthetic log, then times the
same ``--steps`` batches of epoch 0 three ways, one after the other:

1. *staged*: one step cut at the module boundaries (the tensor between two stages is
   detached and its gradient passed back by hand, so the gradients are the same as in
   training); each stage timed forward and backward;
2. *plain loop*: the whole step without cuts and without Lightning (data built in-process);
3. *Lightning*: the real ``Trainer`` set-up of ``fit`` with its batch-building worker(s);
   per-step wall time from a callback.

Lightning's per-step overhead is (3) minus the model part of (2); with a worker, the data
time is hidden as long as the worker keeps ahead of the model. Figures are milliseconds
of CPU time per step (mean over the steps after ``--warmup``; one thread, so CPU time is the
work whatever else loads the machine) and real events (in views) per CPU second.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from collections import defaultdict
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np


class _Timers:
    """CPU seconds of this process per named stage: with one thread that is the work done,
    whatever else keeps the machine busy (wall time on a shared machine is not)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str):
        t0 = time.process_time()
        yield
        self.total[name] += time.process_time() - t0


def _store(work: Path, clients: int, mean_events: float):
    from ..datasets.synthetic import write
    from ..prepare import prepare
    from ..schema import EventSchema
    from ..store import SequenceStore

    path = work / f"store_{clients}_{mean_events:g}"
    if (path / "sequences.parquet").exists():
        return SequenceStore.load(path)
    files = write(work / "raw", n_clients=clients, seed=0, mean_events=mean_events, with_type=True, fmt="parquet")
    schema = EventSchema("client_id", "trans_date", ["small_group", "trans_type"], ["amount_rur"], time_format="number")
    store, _ = prepare(files["transactions"], schema, out=path, show_progress=False)
    return store


def _staged_step(module, padded, labels, opt, t: _Timers) -> None:
    """One training step cut at the stage boundaries (see the module docstring)."""
    import torch

    embedder = module.embedder
    event_encoder, seq_encoder = embedder.event_encoder, embedder.seq_encoder
    with t("event encoder fwd"):
        events = event_encoder(padded)
    x = events.detach().requires_grad_()
    lengths = padded.lengths.clamp(min=1)
    name = type(seq_encoder).__name__
    core = seq_encoder.kind.upper() if hasattr(seq_encoder, "rnn") else {"BagSeqEncoder": "bag MLP", "ConvSeqEncoder": "convolutions"}.get(name, name)
    bucketed = hasattr(seq_encoder, "length_groups")
    groups = (seq_encoder.length_groups(lengths) if bucketed else None) or [torch.arange(len(lengths))]
    with t(f"{core} fwd"):
        outs = []
        for idx in groups:
            outs.append(seq_encoder.event_states(x[idx][:, : int(lengths[idx].max())]))
    cut = [o.detach().requires_grad_() for o in outs]
    with t("pooling fwd"):
        order = torch.cat(groups)
        pooled = torch.cat([seq_encoder.pooling(o, lengths[idx]) for o, idx in zip(cut, groups)])
        if embedder.category_pooling is not None:  # per-category pooling is part of this stage
            ids = padded.payload[embedder.category_field]
            by_category = torch.cat([embedder.pool_by_category(o, x[idx], ids[idx], lengths[idx]) for o, idx in zip(cut, groups)])
            pooled = torch.cat([pooled, by_category.to(pooled.dtype)], dim=-1)
        pooled = pooled[torch.argsort(order)]
        if embedder.event_bag is not None:  # the bag of events is a read-out of the event encodings, here too
            pooled = torch.cat([pooled, embedder.event_bag(x, lengths).to(pooled.dtype)], dim=-1)
    p = pooled.detach().requires_grad_()
    loss_fn = module.loss_fn
    full_precision = torch.autocast(p.device.type, enabled=False)  # as in training: head, miner, loss in float32
    with t("normalise + miner fwd"), full_precision:
        emb = module.metric_space(p)  # the projection head, if any, then L2-normalise
        indices = loss_fn.miner(emb, labels) if getattr(loss_fn, "miner", None) is not None else None
    with t("loss fwd"), full_precision:
        loss = loss_fn.loss(emb, labels, indices) if hasattr(loss_fn, "loss") else loss_fn(emb, labels)
    with t("normalise + miner + loss bwd"):
        loss.backward()
    with t("pooling bwd"):
        torch.autograd.backward(pooled, p.grad)
    with t(f"{core} bwd"):
        torch.autograd.backward(outs, [c.grad for c in cut])
    with t("event encoder bwd"):
        events.backward(x.grad)
    with t("optimizer (Adam step + zero_grad)"):
        opt.step()
        opt.zero_grad(set_to_none=True)


def plain_loss(module, padded, labels):
    """The training loss as ``training_step`` computes it (embed, project and L2-normalise, mine, score)."""
    return module._metric_loss(module.metric_space(module.embedder(padded)), labels)


def _plain_step(module, padded, labels, opt) -> None:
    loss = plain_loss(module, padded, labels)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def profile(store, config, steps: int, warmup: int, lightning: bool = True) -> dict:
    """Milliseconds per step by stage, plain-loop and Lightning step times, real events/s."""
    import pytorch_lightning as pl
    import torch

    from .. import datamodule as data_module
    from ..batch import pad_segments
    from ..views import make_views
    from ..train import MeLESModule, build_trainer, lightning_precision

    # the model's forward and backward under the arithmetic training would use ("precision")
    mixed = lightning_precision(config.precision, "cpu") == "bf16-mixed"
    arithmetic = partial(torch.autocast, "cpu", dtype=torch.bfloat16, enabled=mixed)
    pl.seed_everything(config.seed, verbose=False)
    dm = data_module.MeLESDataModule(store, config)
    ds = data_module.ViewBatches(store, dm.train_clients, config)
    n = min(steps + warmup, len(ds))
    keys = [(0, b) for b in range(n)]
    module = MeLESModule(config, store.encoding)
    module.embedder.event_encoder.fit_value_moments(store.columns)
    module.train()
    opt = module.configure_optimizers()["optimizer"]

    t = _Timers()
    batches, events = [], 0
    for i, (epoch, b) in enumerate(keys):  # data: the worker's work, in-process here
        clients = ds._epoch_plan(epoch)[b]
        rng = np.random.default_rng([config.seed, epoch, b, 11])
        tt = t if i >= warmup else _Timers()
        with tt("data: slicing (make_views)"):
            views = make_views(ds.offsets, clients, config.split, config.split_count, config.cnt_min, config.cnt_max, rng,
                                config.long_view)
        with tt("data: padding (pad_segments)"):
            padded = pad_segments(ds.columns, views.index, views.offsets)
            labels = torch.from_numpy(views.label.astype(np.int64))
        batches.append((padded, labels))
        if i >= warmup:
            events += int(padded.lengths.sum())
    for i, (padded, labels) in enumerate(batches):
        with arithmetic():
            _staged_step(module, padded, labels, opt, t if i >= warmup else _Timers())
    measured = n - warmup
    stage_ms = {k: 1000 * v / measured for k, v in t.total.items()}

    module = MeLESModule(config, store.encoding)  # fresh weights for the plain loop
    module.embedder.event_encoder.fit_value_moments(store.columns)
    module.train()
    opt = module.configure_optimizers()["optimizer"]
    for padded, labels in batches[:warmup]:
        with arithmetic():
            _plain_step(module, padded, labels, opt)
    t0 = time.process_time()
    for padded, labels in batches[warmup:]:
        with arithmetic():
            _plain_step(module, padded, labels, opt)
    plain_ms = 1000 * (time.process_time() - t0) / measured
    res = {"steps": measured, "events_per_step": events / measured, "stages_ms": stage_ms, "plain_model_ms": plain_ms}

    if lightning:  # in-process data (num_workers=0), so the main process's CPU time is the whole step
        ends: list[tuple[float, float]] = []

        class StepClock(pl.Callback):
            def on_train_batch_end(self, *args) -> None:
                ends.append((time.process_time(), time.perf_counter()))

        module = MeLESModule(config, store.encoding)
        module.embedder.event_encoder.fit_value_moments(store.columns)
        trainer = build_trainer(1, [StepClock()], n, False, config.precision, accelerator="cpu", devices=1,
                                limit_train_batches=n, limit_val_batches=0)
        trainer.fit(module, datamodule=data_module.MeLESDataModule(store, replace(config, num_workers=0)))
        steps_done = len(ends) - warmup
        res["lightning_ms"] = 1000 * (ends[-1][0] - ends[warmup - 1][0]) / steps_done
        res["lightning_wall_ms"] = 1000 * (ends[-1][1] - ends[warmup - 1][1]) / steps_done
    return res


def report(res: dict, title: str) -> str:
    ms = res["stages_ms"]
    data_ms = sum(v for k, v in ms.items() if k.startswith("data"))
    model_ms = sum(v for k, v in ms.items() if not k.startswith("data"))
    lines = [f"### {title}", "",
             f"{res['steps']} steps, {res['events_per_step']:,.0f} real events per step.", "",
             "| stage | CPU ms / step | share of the model step |", "|---|---:|---:|"]
    for k, v in ms.items():
        share = "(worker)" if k.startswith("data") else f"{100 * v / model_ms:.0f}%"
        lines.append(f"| {k} | {v:.1f} | {share} |")
    lines.append(f"| **model step, staged (sum)** | **{model_ms:.1f}** | |")
    lines.append(f"| model step, plain loop (no cuts, no Lightning) | {res['plain_model_ms']:.1f} | |")
    if "lightning_ms" in res:
        overhead = res["lightning_ms"] - res["plain_model_ms"] - data_ms
        lines.append(f"| whole step in Lightning, data in-process | {res['lightning_ms']:.1f} | |")
        lines.append(f"| Lightning per-step overhead (Lightning − plain − data) | {overhead:.1f} | {100 * overhead / res['plain_model_ms']:.0f}% |")
        lines.append(f"| real events / CPU-s in Lightning | {1000 * res['events_per_step'] / res['lightning_ms']:,.0f} | |")
        lines.append(f"| (wall ms / step in Lightning, machine load dependent) | {res['lightning_wall_ms']:.1f} | |")
    lines.append(f"| real events / CPU-s, plain loop | {1000 * res['events_per_step'] / res['plain_model_ms']:,.0f} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="ptls-meles bench profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=3000)
    ap.add_argument("--mean-events", type=float, default=320)
    ap.add_argument("--steps", type=int, default=20, help="measured steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-lightning", action="store_true", help="skip the Lightning run")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="MeLESConfig settings, e.g. hidden_size=128")
    ap.add_argument("--malloc", choices=("reuse", "default"), default="reuse",
                    help="reuse: keep freed memory in the process as fit does (allocator.py); default: glibc's own (the Lightning run always reuses, as fit)")
    ap.add_argument("--work", default="runs/bench_profile", help="scratch directory (the generated store is cached here)")
    a = ap.parse_args(argv)
    import torch

    from ..config import MeLESConfig, parse_settings

    torch.set_num_threads(a.threads)
    if a.malloc == "reuse":
        from ..allocator import reuse_freed_memory

        reuse_freed_memory()
    config = MeLESConfig(**{"val_fraction": 0.0, **parse_settings(a.set)})
    store = _store(Path(a.work), a.clients, a.mean_events)
    res = profile(store, config, a.steps, a.warmup, lightning=not a.no_lightning)
    title = f"hidden {config.hidden_size}, {a.threads} thread(s), torch {torch.__version__}, settings: {' '.join(a.set) or 'defaults'}, malloc {a.malloc}"
    print(report(res, title))
    return res
