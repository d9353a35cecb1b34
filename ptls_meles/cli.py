"""``ptls-meles``: a thin command-line shell over the Python API.

    ptls-meles data synthetic|age|gender|physionet --out DIR [--raw PATH]
    ptls-meles prepare INPUT --out DIR --client-col C --time-col T --cat A,B --num X [--engine spark]
    ptls-meles fit STORE --out RUN [--set key=value ...] [--resume]
    ptls-meles embed STORE|RAW --model RUN --out TABLE.parquet
    ptls-meles evaluate --features TABLE [TABLE|handcrafted[+shares]:STORE|shares:STORE ...] --targets FILE --target-col COL
    ptls-meles demo --out DIR
    ptls-meles bench speed|profile|quality|parts|memory|spark ...
"""
from __future__ import annotations

import argparse
import logging
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


def _config(args) -> "MeLESConfig":
    from .config import MeLESConfig, parse_settings
    from .io_utils import read_json

    params = read_json(args.config, "config") if getattr(args, "config", None) else {}
    if not isinstance(params, dict):
        raise ValueError(f"{args.config}: not a config file (expected a JSON object of settings, e.g. {{\"hidden_size\": 256}})")
    params.update(parse_settings(getattr(args, "set", [])))
    return MeLESConfig.from_dict(params)


# ---------------------------------------------------------------- commands
def cmd_data(args) -> None:
    from .datasets.recipes import RECIPES
    from .io_utils import check_output_dir

    check_output_dir(args.out)
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
    from .io_utils import check_output_dir, read_table
    from .prepare import prepare
    from .schema import EventSchema

    check_output_dir(args.out)
    if args.schema:
        schema = EventSchema.load(args.schema)
    else:
        if not (args.client_col and args.time_col):
            raise ValueError("prepare needs --schema FILE or both --client-col and --time-col (e.g. --client-col client_id --time-col trans_date)")
        split = lambda s: [c for c in (s or "").split(",") if c]
        schema = EventSchema(args.client_col, args.time_col, split(args.cat), split(args.num), args.time_format, args.num_transform)
    encoding = Encoding.load(args.encoding) if args.encoding else None
    targets = read_table(args.targets, "target table") if args.targets else None  # a bad target table fails before the work
    if args.engine == "spark":
        from .spark import get_session, parse_conf, prepare_spark

        if args.drop_duplicates:
            raise ValueError("--drop-duplicates is available with --engine local only; drop duplicate rows before the Spark prepare")
        report = prepare_spark(args.input, schema, args.out, encoding=encoding, on_error=args.on_error, min_count=args.min_count,
                               max_vocab=args.max_vocab, spark=get_session(args.spark_master, parse_conf(args.spark_conf)))
    else:
        _, report = prepare(args.input, schema, out=args.out, encoding=encoding, on_error=args.on_error, min_count=args.min_count,
                            max_vocab=args.max_vocab, show_progress=not args.quiet, drop_duplicates=args.drop_duplicates)
    if targets is not None:
        from .datasets.recipes import write_targets

        write_targets(targets, Path(args.out), args.target_id_col or schema.client_col)
    print(report.summary())


def cmd_fit(args) -> None:
    from .api import MeLES
    from .io_utils import check_output_dir
    from .store import SequenceStore

    check_output_dir(args.out)
    _threads(args.threads)
    config = _config(args)
    store = SequenceStore.load(args.store)
    t0 = time.perf_counter()
    model = MeLES(**config.to_dict())
    model.fit(store, out_dir=args.out, show_progress=not args.quiet, resume=args.resume, accelerator=args.accelerator)
    model.save(Path(args.out) / "model")
    print(f"trained on {store.n_clients:,} clients in {time.perf_counter() - t0:.0f} s; model saved to {Path(args.out) / 'model'}")


def cmd_embed(args) -> None:
    from .api import MeLES, MeLESEnsemble
    from .io_utils import check_output_file

    check_output_file(args.out)
    _threads(args.threads)
    if args.engine == "spark" and len(args.model) > 1:
        raise SystemExit("embed --engine spark reads one model; embed each with Spark, or several side by side with --engine local")
    # a run directory or a saved model directory; several: their embeddings side by side
    model = MeLES.load(args.model[0]) if len(args.model) == 1 else MeLESEnsemble.load(args.model)
    if args.schema:
        from .schema import EventSchema

        schema = EventSchema.load(args.schema)
        for member in getattr(model, "models", [model]):
            member.schema_ = schema
    if args.engine == "spark":
        from .spark import get_session, parse_conf
        from .spark.embed import embed_input

        stats = embed_input(model, args.input, args.out, get_session(args.spark_master, parse_conf(args.spark_conf)))
    else:
        stats = model.write_embeddings(args.input, args.out, show_progress=not args.quiet)
    print(f"embedded {stats['clients']:,} clients ({stats['dim']} dims) in {stats['seconds']:.1f} s "
          f"({stats['clients_per_s']:,.0f} clients/s) → {args.out}")
    unseen = {c: share for c, share in stats.get("unseen_shares", {}).items() if share > 0}
    if unseen:
        print("events with categories the model did not learn (unseen id): " + ", ".join(f"{c} {v:.1%}" for c, v in unseen.items()))


#: --features SOURCE:STORE: aggregate tables built from a sequence store (the yardsticks of ``bench quality``)
STORE_FEATURES = ("handcrafted", "handcrafted+shares", "shares")


def _feature_table(spec: str):
    from .downstream.evaluate import load_feature_table

    source, _, store_dir = spec.partition(":")
    if store_dir and source in STORE_FEATURES:
        from .downstream.features import FeatureError, handcrafted_features, share_features
        from .store import SequenceStore

        store = SequenceStore.load(store_dir)
        try:
            return share_features(store) if source == "shares" else handcrafted_features(store, shares=source != "handcrafted")
        except FeatureError as exc:
            raise FeatureError(f"--features {spec}: {exc}") from None
    return load_feature_table(spec)


def _blend_weight(text: str) -> float | None:
    if text == "validation":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share in [0, 1] or 'validation', e.g. 0.3, got {text!r}") from None


def cmd_evaluate(args) -> None:
    from .downstream.evaluate import LGBM_PRESETS, components_summary, evaluate, evaluate_splits
    from .downstream.protocol import SplitsResult
    from .io_utils import check_output_file, read_table, write_json

    if args.out:
        check_output_file(args.out)  # before the CV folds, not after them
    tables = [_feature_table(s) for s in args.features]
    targets = read_table(args.targets, "target table")
    if args.target_id_col != "client_id":
        if args.target_id_col not in targets.columns:
            raise ValueError(f"{args.targets}: no id column {args.target_id_col!r}; it has columns {list(targets.columns)}")
        targets = targets.drop(columns=["client_id"], errors="ignore").rename(columns={args.target_id_col: "client_id"})
    results = []
    for col in args.target_col:
        protocol = dict(n_folds=args.folds, test_size=args.test_size, n_jobs=args.jobs, lgbm_params=LGBM_PRESETS[args.lgbm],
                        early_stopping_rounds=args.early_stopping_rounds, model=args.model,
                        blend_weight=args.blend_weight)
        if len(args.seed) == 1:
            r = evaluate(tables, targets, col, seed=args.seed[0], **protocol)
            print(r.summary() + components_summary(r))
        else:
            done: list = []

            def on_split(split) -> None:
                print(f"  split seed {split.seed}: {split.summary()}{components_summary(split)}", flush=True)
                done.append(split)
                if args.out:  # the seeds finished so far, which compare joins with a file of the others
                    left = [s for s in args.seed if s not in {d.seed for d in done}]
                    write_json(args.out, [*results, SplitsResult(done).to_dict() | ({"seeds_left": left} if left else {})])

            r = evaluate_splits(tables, targets, col, seeds=args.seed, **protocol, on_split=on_split)
            print(r.summary())
        results.append(r.to_dict())
        if args.out:  # after each target too, so a run cut short (hours on real data) keeps what it finished
            write_json(args.out, results)


def cmd_compare(args) -> None:
    from .downstream.compare import load_result_files, paired_difference
    from .downstream.protocol import EvaluationError
    from .io_utils import check_output_file, write_json

    if args.out:
        check_output_file(args.out)
    results, baselines = load_result_files(args.results, args.part), load_result_files(args.against, args.against_part)
    shared = [t for t in results if t in baselines]
    if not shared:
        raise EvaluationError(f"{' '.join(args.results)} (targets {sorted(results)}) and {' '.join(args.against)} "
                              f"(targets {sorted(baselines)}) share no target")
    differences = [paired_difference(results[t], baselines[t]) for t in shared]
    for d in differences:
        print(d.summary())
    if args.out:
        write_json(args.out, [d.to_dict() for d in differences])


def cmd_demo(args) -> None:
    """The whole path on the shipped synthetic data: data → fit → embed → evaluate."""
    from .bench.demo import run_demo
    from .io_utils import check_output_dir

    check_output_dir(args.out)
    _threads(args.threads)
    sizes = {k: v for k, v in (("n_clients", args.clients), ("max_epochs", args.epochs)) if v is not None}
    run_demo(Path(args.out), show_progress=not args.quiet, **sizes)


def cmd_bench(args) -> None:
    from .bench import run_bench

    _threads(args.threads)
    run_bench(args.name, args.rest)


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .bench import BENCHES

    p = argparse.ArgumentParser(prog="ptls-meles", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log details (detected formats, phases, per-fold scores)")
    sub = p.add_subparsers(dest="command", required=True)

    def parser(name: str, help: str, epilog: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, epilog=epilog,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    def common(sp, threads=False):
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        if threads:
            sp.add_argument("--threads", type=int, default=None, metavar="N",
                            help="torch threads, e.g. --threads 2 (default: the usable cores not kept busy by other processes, at most 8)")

    def engine(sp):
        sp.add_argument("--engine", choices=["local", "spark"], default="local",
                        help="local (default): this machine; spark: a Spark cluster or local[N], e.g. --engine spark")
        sp.add_argument("--spark-master", metavar="URL", help="Spark master, e.g. spark://host:7077 or local[8] (default: local[*]; ignored when a session is active)")
        sp.add_argument("--spark-conf", action="append", metavar="KEY=VALUE", help="Spark setting, repeatable, e.g. --spark-conf spark.driver.memory=8g")

    d = parser("data", "build a store from a known dataset format (or the synthetic demo data)",
               "example: ptls-meles data synthetic --out data/synthetic --clients 3000")
    d.add_argument("name", choices=["synthetic", "age", "gender", "physionet"], help="the dataset")
    d.add_argument("--raw", metavar="PATH", help="the dataset's raw files (directory or archive), e.g. --raw downloads/age")
    d.add_argument("--out", required=True, metavar="DIR", help="store directory to write, e.g. --out data/age")
    d.add_argument("--clients", type=int, default=3000, metavar="N", help="synthetic: number of clients (default 3000)")
    d.add_argument("--seed", type=int, default=0, help="synthetic: random seed (default 0)")
    d.add_argument("--mean-events", type=float, default=300, metavar="N", help="synthetic: median events per client (default 300)")
    d.add_argument("--with-type", action="store_true", help="synthetic: add a trans_type column")
    d.add_argument("--on-error", choices=["raise", "drop"], default="raise", help="raise (default): stop at the first bad row; drop: drop bad rows and count them")
    common(d)
    d.set_defaults(func=cmd_data)

    pr = parser("prepare", "raw events (Parquet/CSV file or directory) → sequence store",
                "example:\n  ptls-meles prepare transactions.csv --out store --client-col client_id --time-col trans_date \\\n"
                "      --cat small_group --num amount_rur --time-format number\n"
                "a directory is read in one format (Parquet, else CSV, TSV, TXT); other files in it are skipped and named.")
    pr.add_argument("input", help="a Parquet or CSV file, or a directory of them, e.g. data/transactions.csv")
    pr.add_argument("--out", required=True, metavar="DIR", help="store directory to write (sequences.parquet, which carries the schema, and encoding.json), e.g. --out store")
    pr.add_argument("--schema", metavar="FILE", help='schema JSON instead of the column options, e.g. {"client_col": "client_id", "time_col": "trans_date", '
                    '"categorical": ["small_group"], "numeric": ["amount_rur"], "time_format": "number"}')
    pr.add_argument("--client-col", metavar="COL", help="client id column, e.g. --client-col client_id")
    pr.add_argument("--time-col", metavar="COL", help="event time column, e.g. --time-col trans_date")
    pr.add_argument("--cat", metavar="A,B", help="comma-separated categorical columns, e.g. --cat mcc,channel")
    pr.add_argument("--num", metavar="X,Y", help="comma-separated numeric columns, e.g. --num amount")
    pr.add_argument("--time-format", default="auto", metavar="FORMAT",
                    help="auto (default: detect), number (a day index or seconds), timestamp (e.g. 2024-03-01 12:00), "
                         "day_hms (\"12 10:23:26\"), or a strftime pattern, e.g. --time-format %%y%%m%%d for 960728 "
                         "(patterns and timestamps become seconds since 1970)")
    pr.add_argument("--num-transform", default="log", choices=["identity", "log", "standardize", "log_standardize"],
                    help="for every numeric column: log (default, sign·log1p|x|), identity, standardize, log_standardize, "
                         "e.g. --num-transform standardize")
    pr.add_argument("--encoding", metavar="FILE", help="apply this saved encoding instead of fitting a new one, e.g. --encoding run/model/encoding.json")
    pr.add_argument("--on-error", choices=["raise", "drop"], default="raise",
                    help="raise (default): stop at the first bad value, naming it; drop: drop bad rows and count them per reason")
    pr.add_argument("--drop-duplicates", action="store_true", help="drop rows equal to an earlier row in every column (default: keep them, counted)")
    pr.add_argument("--min-count", type=int, default=1, metavar="N", help="categories seen fewer than N times map to the unseen id, e.g. --min-count 5")
    pr.add_argument("--max-vocab", type=int, default=None, metavar="N", help="keep at most N values per categorical field, e.g. --max-vocab 1000")
    pr.add_argument("--targets", metavar="FILE", help="optional target table (CSV/Parquet) to store beside the sequences, e.g. --targets train_target.csv")
    pr.add_argument("--target-id-col", metavar="COL", help="client id column of the target table (default: the schema's client column)")
    common(pr)
    engine(pr)
    pr.set_defaults(func=cmd_prepare)

    f = parser("fit", "self-supervised MeLES training on a store",
               "example: ptls-meles fit store --out runs/first --set encoder=gru --set max_epochs=20")
    f.add_argument("store", help="a store directory written by prepare, e.g. store")
    f.add_argument("--out", required=True, metavar="DIR", help="run directory: checkpoints/, logs/, model/, e.g. --out runs/first")
    f.add_argument("--config", metavar="FILE", help='MeLESConfig as JSON, e.g. {"hidden_size": 256, "encoder": "gru"}')
    f.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting, repeatable, e.g. --set encoder=lstm --set lr=0.001")
    f.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoints/last.ckpt (written every epoch); the store and network settings must match")
    f.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto (default), cpu, gpu, e.g. --accelerator cpu")
    common(f, threads=True)
    f.set_defaults(func=cmd_fit)

    e = parser("embed", "embedding table (Parquet) from a trained model",
               "example: ptls-meles embed store --model runs/first --out embeddings.parquet")
    e.add_argument("input", help="a store directory, or raw events (then --schema or the model's schema is used)")
    e.add_argument("--model", required=True, nargs="+", metavar="DIR",
                   help="a run directory of `fit`, or a saved model directory, e.g. --model runs/first; several models "
                        "trained on one store (e.g. other seeds, trained side by side): their embeddings side by side, "
                        "e.g. --model runs/seed42 runs/seed2")
    e.add_argument("--out", required=True, metavar="FILE", help="Parquet table to write, e.g. --out embeddings.parquet")
    e.add_argument("--schema", metavar="FILE", help="schema JSON for raw input (default: the model's, model/schema.json), e.g. --schema schema.json")
    common(e, threads=True)
    engine(e)
    e.set_defaults(func=cmd_embed)

    ev = parser("evaluate", "LightGBM (or a linear probe) with stratified K-fold CV on feature tables",
                "example: ptls-meles evaluate --features embeddings.parquet handcrafted:store --targets targets.csv --target-col gender")
    ev.add_argument("--features", nargs="+", required=True, metavar="TABLE",
                    help="tables with a client_id column, e.g. embeddings.parquet; 'handcrafted:STORE' builds the baseline from a "
                         "store, 'handcrafted+shares:STORE' adds every categorical value's share of events, 'shares:STORE' "
                         "gives those shares alone")
    ev.add_argument("--targets", required=True, metavar="FILE", help="target table (CSV/Parquet), e.g. --targets train_target.csv")
    ev.add_argument("--target-col", nargs="+", required=True, metavar="COL", help="one or more target columns, e.g. --target-col bins")
    ev.add_argument("--target-id-col", default="client_id", metavar="COL", help="client id column of the target table (default client_id)")
    ev.add_argument("--folds", type=int, default=5, metavar="K", help="cross-validation folds (default 5)")
    ev.add_argument("--test-size", type=float, default=0.1, metavar="F", help="held-out test share (default 0.1; 0: CV only)")
    ev.add_argument("--seed", type=int, nargs="+", default=[42], metavar="SEED",
                    help="seed of the splits and LightGBM (default 42); several, e.g. --seed 42 1 2: the protocol once "
                         "per seed, each its own test part, and the mean over them")
    ev.add_argument("--jobs", type=int, default=2, metavar="N", help="LightGBM threads (default 2)")
    ev.add_argument("--lgbm", choices=("paper", "fast"), default="paper",
                    help="LightGBM budget: paper (1,000 trees, the default) or fast (200 trees at a higher rate on half "
                         "the columns, ~7x cheaper: for a wide embedding or a many-class target)")
    ev.add_argument("--early-stopping-rounds", type=int, metavar="N",
                    help="stop each fold's LightGBM after N rounds without a better validation-part loss, e.g. 50 (default off)")
    ev.add_argument("--model", choices=("lightgbm", "linear", "stacked", "blended"), default="lightgbm",
                    help="lightgbm (default); linear: a linear probe, standardised logistic regression with its "
                         "strength picked by an inner CV on each fold's training clients; stacked: LightGBM on every "
                         "table but the last plus the last table's out-of-fold probe probabilities "
                         "(e.g. --features handcrafted:STORE embeddings.parquet); blended: the mean of LightGBM's "
                         "probabilities on every table but the last and the probe's on the last (one table: both read it), "
                         "each one's scores kept beside")
    ev.add_argument("--blend-weight", type=_blend_weight, default=0.5, metavar="W|validation",
                    help="--model blended: the probe's share of the blend (default 0.5, the mean); validation: each "
                         "fold picks it from 0, 0.1, ..., 1 by its validation score (test scores stay honest)")
    ev.add_argument("--out", metavar="FILE", help="write the results as JSON, e.g. --out results.json; written "
                    "again as each split seed ends, so a run cut short keeps what it finished and names the seeds "
                    "left (compare warns of them, and joins the file with a run of them)")
    common(ev)
    ev.set_defaults(func=cmd_evaluate)

    cp = parser("compare", "paired differences between two `evaluate --out` results on the same clients and seeds",
                "example: ptls-meles compare both.json --against handcrafted.json")
    cp.add_argument("results", nargs="+", metavar="RESULTS.json",
                    help="an `evaluate --out` file, e.g. both.json; several files of one row join their split seeds "
                         "(e.g. both_42_1.json both_2_3_4.json)")
    cp.add_argument("--against", required=True, nargs="+", metavar="BASELINE.json",
                    help="the `evaluate --out` file(s) to subtract, scored with the same --seed, folds and test size")
    for flag, side in (("--part", "RESULTS.json"), ("--against-part", "BASELINE.json")):
        cp.add_argument(flag, choices=("lightgbm", "linear_probe"),
                        help=f"read one component of a `--model blended` {side} instead of the blend, e.g. {flag} linear_probe")
    cp.add_argument("--out", metavar="FILE", help="write the differences as JSON, e.g. --out both_vs_hand.json")
    common(cp)
    cp.set_defaults(func=cmd_compare)

    dm = parser("demo", "the whole path on the shipped synthetic data", "example: ptls-meles demo --out runs/demo --epochs 5")
    dm.add_argument("--out", default="runs/demo", metavar="DIR", help="working directory (default runs/demo)")
    dm.add_argument("--clients", type=int, default=None, metavar="N",
                    help="synthetic clients, e.g. --clients 5000 (default: the demo's, ~5 minutes on 2 cores)")
    dm.add_argument("--epochs", type=int, default=None, metavar="N", help="self-supervised epochs, e.g. --epochs 20 (default: the demo's)")
    common(dm, threads=True)
    dm.set_defaults(func=cmd_demo)

    b = parser("bench", "benchmarks: speed | profile | quality (the downstream comparison: configurations, baselines, ablations) | parts (each pooling part of a trained embedding scored alone) | memory | spark",
               "example: ptls-meles bench speed -- --help")
    b.add_argument("name", choices=BENCHES, help="the benchmark")
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
    except OSError as exc:  # a disk full, a permission or a path problem met during the work: one line naming the path
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
