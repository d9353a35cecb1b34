"""Write the synthetic card-transaction dataset (the shipped demo data) to a folder.

Example: python data/make_synthetic.py --out data/demo --clients 3000 --seed 0
"""
from __future__ import annotations

import argparse

from ptls_meles.datasets.synthetic import write


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder, e.g. data/demo")
    parser.add_argument("--clients", type=int, default=3000, help="number of clients (default 3000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--mean-events", type=float, default=300, help="median events per client (default 300)")
    parser.add_argument("--with-type", action="store_true", help="add the trans_type column (~50 codes)")
    parser.add_argument("--format", choices=["csv", "parquet"], default="csv", help="transactions file format")
    args = parser.parse_args(argv)
    paths = write(
        args.out,
        n_clients=args.clients,
        seed=args.seed,
        mean_events=args.mean_events,
        with_type=args.with_type,
        fmt=args.format,
    )
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
