"""``ptls-meles``: a thin command-line shell over the Python API.

    ptls-meles data synthetic|age|gender|physionet --out DIR [--raw PATH]
    ptls-meles prepare INPUT --out DIR --client-col C --time-col T --cat A,B --num X [--engine spark]
    ptls-meles fit STORE --out RUN [--set key=value ...] [--resume]
    ptls-meles embed STORE|RAW --model RUN --out TABLE.parquet
    ptls-meles evaluate --features TABLE [TABLE|handcrafted:STORE ...] --targets FILE --target-col COL
    ptls-meles demo --out DIR
    ptls-meles bench speed|paper|memory|spark ...
"""
from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

log = logging.getLogger("ptls_meles")

if TYPE_CHECKING:
    from .config import MeLESConfig


def _threads(n: int | None) -> None:
    from .threads import set_threads

    set_threads(n)


def _parse_sets(pairs: list[str]) -> dict:
    """``--set key=value`` pairs; values are Python literals when they parse, else strings."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def _config(args) -> "MeLESConfig":
    from .config import MeLESConfig

    params = json.loads(Path(args.config).read_text()) if getattr(args, "config", None) else {}
    params.update(_parse_sets(getattr(args, "set", [])))
    return MeLESConfig.from_dict(params)


# ---------------------------------------------------------------- commands
def cmd_data(args) -> None:
    from .datasets.recipes import RECIPES

    kwargs = {"show_progress": not args.quiet, "on_error": args.on_error}
    if args.name == "synthetic":
        _, report = RECIPES["synthetic"](args.out, n_clients=args.clients, seed=args.seed, mean_events=args.mean_events,
                                         with_type=args.with_type, **kwargs)
    else:
        if not args.raw:
            raise SystemExit(f"`data {args.name}` needs --raw PATH (the dataset's raw files)")
        _, report = RECIPES[args.name](args.raw, args.out, **kwargs)
    print(report.summary())
    print(f"store and targets written to {args.out}")


def cmd_prepare(args) -> None:
    from .encoding import Encoding
    from .prepare import prepare
    from .schema import EventSchema

    if args.schema:
        schema = EventSchema.load(args.schema)
    else:
        if not (args.client_col and args.time_col):
            raise ValueError("prepare needs --schema FILE or both --client-col and --time-col (e.g. --client-col client_id --time-col trans_date)")
        split = lambda s: [c for c in (s or "").split(",") if c]
        schema = EventSchema(args.client_col, args.time_col, split(args.cat), split(args.num), args.time_format, args.num_transform)
    encoding = Encoding.load(args.encoding) if args.encoding else None
    if args.engine == "spark":
        from .spark import get_session, parse_conf, prepare_spark

        report = prepare_spark(args.input, schema, args.out, encoding=encoding, on_error=args.on_error, min_count=args.min_count,
                               max_vocab=args.max_vocab, spark=get_session(args.spark_master, parse_conf(args.spark_conf)))
    else:
        _, report = prepare(args.input, schema, out=args.out, encoding=encoding, on_error=args.on_error, min_count=args.min_count,
                            max_vocab=args.max_vocab, show_progress=not args.quiet)
    schema.save(Path(args.out) / "schema.json")
    if args.targets:
        from .datasets.recipes import write_targets

        write_targets(_read_table(args.targets), Path(args.out), args.target_id_col or schema.client_col)
    print(report.summary())


def cmd_fit(args) -> None:
    from .api import MeLES
    from .store import SequenceStore

    _threads(args.threads)
    config = _config(args)
    store = SequenceStore.load(args.store)
    t0 = time.perf_counter()
    model = MeLES(**config.to_dict())
    model.fit(store, out_dir=args.out, show_progress=not args.quiet, resume=args.resume, accelerator=args.accelerator)
    model.save(Path(args.out) / "model")
    print(f"trained on {store.n_clients:,} clients in {time.perf_counter() - t0:.0f} s; model saved to {Path(args.out) / 'model'}")


def cmd_embed(args) -> None:
    from .api import MeLES

    _threads(args.threads)
    model_dir = Path(args.model)
    model = MeLES.load(model_dir / "model" if (model_dir / "model").exists() else model_dir)
    if args.schema:
        from .schema import EventSchema

        model.schema_ = EventSchema.load(args.schema)
    if args.engine == "spark":
        from .spark import get_session, parse_conf
        from .spark.embed import embed_input

        stats = embed_input(model, args.input, args.out, get_session(args.spark_master, parse_conf(args.spark_conf)))
    else:
        stats = model.write_embeddings(args.input, args.out, show_progress=not args.quiet)
    print(f"embedded {stats['clients']:,} clients ({stats['dim']} dims) in {stats['seconds']:.1f} s "
          f"({stats['clients_per_s']:,.0f} clients/s) → {args.out}")


def _read_table(path: str):
    """A target table from CSV or Parquet, with errors that name the file."""
    import pandas as pd

    if not Path(path).exists():
        raise FileNotFoundError(f"target table {path} does not exist")
    try:
        if path.endswith((".parquet", ".pq")) or Path(path).is_dir():
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, OSError) as exc:
        raise ValueError(f"{path}: cannot read the target table ({exc})") from None


def _feature_table(spec: str):
    from .downstream.evaluate import load_feature_table

    if spec.startswith("handcrafted:"):
        from .downstream.features import handcrafted_features
        from .store import SequenceStore

        return handcrafted_features(SequenceStore.load(spec.split(":", 1)[1]))
    return load_feature_table(spec)


def cmd_evaluate(args) -> None:
    from .downstream.evaluate import evaluate

    tables = [_feature_table(s) for s in args.features]
    targets = _read_table(args.targets)
    if args.target_id_col != "client_id":
        if args.target_id_col not in targets.columns:
            raise ValueError(f"{args.targets}: no id column {args.target_id_col!r}; it has columns {list(targets.columns)}")
        targets = targets.drop(columns=["client_id"], errors="ignore").rename(columns={args.target_id_col: "client_id"})
    results = []
    for col in args.target_col:
        r = evaluate(tables, targets, col, n_folds=args.folds, test_size=args.test_size, seed=args.seed, n_jobs=args.jobs,
                     early_stopping_rounds=args.early_stopping_rounds)
        print(r.summary())
        results.append(r.to_dict())
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


def cmd_demo(args) -> None:
    """The whole path on the shipped synthetic data: data → fit → embed → evaluate."""
    from .bench.demo import run_demo

    _threads(args.threads)
    sizes = {k: v for k, v in (("n_clients", args.clients), ("max_epochs", args.epochs)) if v is not None}
    run_demo(Path(args.out), show_progress=not args.quiet, **sizes)


def cmd_bench(args) -> None:
    from .bench import run_bench

    _threads(args.threads)
    run_bench(args.name, args.rest)


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptls-meles", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, threads=False):
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        if threads:
            sp.add_argument("--threads", type=int, default=None, help="torch threads, e.g. 2 (default: the usable cores not kept busy by other processes, at most 8)")

    def engine(sp):
        sp.add_argument("--engine", choices=["local", "spark"], default="local", help="spark: run on a Spark cluster (or local[N])")
        sp.add_argument("--spark-master", help="Spark master URL (default: local[*]; ignored when a session is active)")
        sp.add_argument("--spark-conf", action="append", metavar="KEY=VALUE", help="Spark setting, repeatable")

    d = sub.add_parser("data", help="build a store from a known dataset format (or the synthetic demo data)")
    d.add_argument("name", choices=["synthetic", "age", "gender", "physionet"])
    d.add_argument("--raw", help="the dataset's raw files (directory or archive)")
    d.add_argument("--out", required=True)
    d.add_argument("--clients", type=int, default=3000, help="synthetic: number of clients")
    d.add_argument("--seed", type=int, default=0, help="synthetic: seed")
    d.add_argument("--mean-events", type=float, default=300, help="synthetic: median events per client")
    d.add_argument("--with-type", action="store_true", help="synthetic: add a trans_type column")
    d.add_argument("--on-error", choices=["raise", "drop"], default="raise")
    common(d)
    d.set_defaults(func=cmd_data)

    pr = sub.add_parser("prepare", help="raw events (Parquet/CSV file or directory) → sequence store")
    pr.add_argument("input")
    pr.add_argument("--out", required=True)
    pr.add_argument("--schema", help="schema JSON (client_col, time_col, categorical, numeric, time_format)")
    pr.add_argument("--client-col")
    pr.add_argument("--time-col")
    pr.add_argument("--cat", help="comma-separated categorical columns")
    pr.add_argument("--num", help="comma-separated numeric columns")
    pr.add_argument("--time-format", default="auto", choices=["auto", "number", "timestamp", "day_hms"])
    pr.add_argument("--num-transform", default="log", choices=["identity", "log", "standardize", "log_standardize"])
    pr.add_argument("--encoding", help="apply this saved encoding.json instead of fitting a new one")
    pr.add_argument("--on-error", choices=["raise", "drop"], default="raise", help="drop: drop bad rows and count them")
    pr.add_argument("--min-count", type=int, default=1, help="categories rarer than this map to the unseen id")
    pr.add_argument("--max-vocab", type=int, default=None, help="keep at most this many values per categorical field")
    pr.add_argument("--targets", help="optional target table (CSV/Parquet) to store beside the sequences")
    pr.add_argument("--target-id-col", help="client id column of the target table (default: the schema's)")
    common(pr)
    engine(pr)
    pr.set_defaults(func=cmd_prepare)

    f = sub.add_parser("fit", help="self-supervised MeLES training on a store")
    f.add_argument("store")
    f.add_argument("--out", required=True, help="run directory: checkpoints/, logs/, model/")
    f.add_argument("--config", help="MeLESConfig as JSON")
    f.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting, e.g. --set encoder=lstm")
    f.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.ckpt")
    f.add_argument("--accelerator", default="auto")
    common(f, threads=True)
    f.set_defaults(func=cmd_fit)

    e = sub.add_parser("embed", help="embedding table (Parquet) from a trained model")
    e.add_argument("input", help="a store directory, or raw events (then --schema or the model's schema is used)")
    e.add_argument("--model", required=True, help="a run directory of `fit`, or a saved model directory")
    e.add_argument("--out", required=True)
    e.add_argument("--schema", help="schema JSON for raw input")
    common(e, threads=True)
    engine(e)
    e.set_defaults(func=cmd_embed)

    ev = sub.add_parser("evaluate", help="LightGBM with stratified K-fold CV on feature tables")
    ev.add_argument("--features", nargs="+", required=True, help="tables with client_id; 'handcrafted:STORE' builds the baseline")
    ev.add_argument("--targets", required=True)
    ev.add_argument("--target-col", nargs="+", required=True)
    ev.add_argument("--target-id-col", default="client_id")
    ev.add_argument("--folds", type=int, default=5)
    ev.add_argument("--test-size", type=float, default=0.1)
    ev.add_argument("--seed", type=int, default=42)
    ev.add_argument("--jobs", type=int, default=2)
    ev.add_argument("--early-stopping-rounds", type=int,
                    help="stop each fold's LightGBM after this many rounds without a better validation-part loss (default off)")
    ev.add_argument("--out", help="write the results as JSON")
    common(ev)
    ev.set_defaults(func=cmd_evaluate)

    dm = sub.add_parser("demo", help="the whole path on the shipped synthetic data")
    dm.add_argument("--out", default="runs/demo")
    dm.add_argument("--clients", type=int, default=None, help="synthetic clients (default: the demo's, ~5 minutes on 2 cores)")
    dm.add_argument("--epochs", type=int, default=None, help="self-supervised epochs (default: the demo's)")
    common(dm, threads=True)
    dm.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="benchmarks: speed | paper (ablation tables)")
    b.add_argument("name", choices=["speed", "paper", "quality", "memory", "spark"])
    b.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark (see `ptls-meles bench NAME -- --help`)")
    common(b, threads=True)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .schema import SchemaError

    try:
        args.func(args)
    except (SchemaError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
