"""Draw data/synthetic_mechanisms.png: one client's timeline and mechanism statistics per label.

Example: python data/make_synthetic_figure.py --out data/synthetic_mechanisms.png --clients 2000 --seed 0

Every statistic is computed from the generated events (what a model could see), not from
the hidden parameters, and plotted per label to show which label each mechanism carries.
"""
from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ptls_meles.datasets import synthetic  # noqa: E402
from ptls_meles.datasets.synthetic import SECONDS_PER_DAY, calendar_fields, client_parameters, generate  # noqa: E402


def per_client(events: pd.DataFrame, values: np.ndarray, n: int) -> np.ndarray:
    client = events["client_id"].to_numpy()
    return np.bincount(client, weights=values, minlength=n) / np.maximum(np.bincount(client, minlength=n), 1)


def recurring_payments(events: pd.DataFrame) -> pd.Series:
    """Which events look like recurring payments: the same category and amount (to 1%)
    at least 6 times in one client's history; the key of each event otherwise NaN."""
    key = pd.DataFrame({"client_id": events["client_id"], "group": events["small_group"],
                        "amount": np.round(np.log(events["amount_rur"].to_numpy()), 2)})
    size = key.groupby(["client_id", "group", "amount"])["group"].transform("size")
    return size >= 6


def recurring_day_spread(events: pd.DataFrame) -> pd.Series:
    """Per client: median over its recurring payments of the std of their day of month."""
    recurring = events[recurring_payments(events).to_numpy()]
    day = synthetic.DAY_OF_MONTH[recurring["trans_date"].to_numpy()]
    key = [recurring["client_id"], recurring["small_group"], np.round(np.log(recurring["amount_rur"].to_numpy()), 2)]
    return pd.Series(day, index=recurring.index).groupby(key).std().groupby(level=0).median()


def statistics(events: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """Per-client statistic of four mechanisms; ``events`` sorted by client and time."""
    client = events["client_id"].to_numpy()
    t = events["trans_datetime"].to_numpy()
    group = events["small_group"].to_numpy()
    same = np.r_[False, client[1:] == client[:-1]]
    gap = np.r_[np.inf, np.diff(t)]
    quick = same & (gap < 1800)
    hour = calendar_fields(t)["hour"].to_numpy()
    evening = ((hour >= 18) & (hour < 22)).astype(float) - ((hour >= 7) & (hour < 11))

    links = synthetic._make_world(seed).links
    prev = np.r_[0, group[:-1]]
    in_session = same & (gap < 3600) & (links[0, prev] != links[1, prev])
    old_vs_young = in_session * ((group == links[1, prev]).astype(float) - (group == links[0, prev]))

    spread = recurring_day_spread(events).reindex(range(n))
    return pd.DataFrame({
        "recurring: day-of-month spread (days)": spread.to_numpy(),
        "links: old minus young map, per event": per_client(events, old_vs_young, n),
        "sessions: share < 30 min after previous": per_client(events, quick, n),
        "time of day: evening − morning share": per_client(events, evening, n),
    })


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/synthetic_mechanisms.png")
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--mean-events", type=float, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--client", type=int, default=None, help="client of the timeline (default: one with a life change)")
    args = parser.parse_args(argv)

    events, targets = generate(args.clients, seed=args.seed, mean_events=args.mean_events)
    events = events.sort_values(["client_id", "trans_datetime"], kind="stable", ignore_index=True)
    hidden = client_parameters(args.clients, seed=args.seed, mean_events=args.mean_events)
    stats = statistics(events, args.clients, args.seed)

    fig = plt.figure(figsize=(13, 8.5))
    grid = fig.add_gridspec(2, 4, height_ratios=[1.15, 1.0], hspace=0.42, wspace=0.32)
    ax = fig.add_subplot(grid[0, :])
    chosen = args.client
    if chosen is None:
        candidates = hidden[hidden["has_change"] & (hidden["n_events"].between(250, 400)) & (hidden["n_recurring"] >= 2)]
        chosen = int(candidates["client_id"].iloc[0]) if len(candidates) else 0
    one = events[events["client_id"] == chosen]
    row = hidden.set_index("client_id").loc[chosen]
    seconds = one["trans_datetime"].to_numpy()
    day, hour = seconds / SECONDS_PER_DAY, seconds % SECONDS_PER_DAY / 3600
    codes = one["small_group"].to_numpy()
    colour = np.where(recurring_payments(one).to_numpy(), "black", "tab:blue")
    ax.scatter(day, hour, s=6 + 4 * np.log1p(one["amount_rur"].to_numpy()), c=colour, alpha=0.6, linewidths=0)
    if row["has_change"]:
        ax.axvline(row["change_day"], color="tab:red", lw=1.5, label="life change")
    paydays = synthetic.MONTH_START + int(row["payday"]) - 1
    ax.vlines(paydays, 0, 1.2, color="tab:green", lw=2, label=f"payday (day {int(row['payday'])} of the month)")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_xlim(day.min() - 15, day.max() + 15)
    ax.set_xlabel("day (0 = Monday 2018-01-01)")
    ax.set_ylabel("hour of day")
    ax.set_ylim(0, 24)
    ax.set_title(
        f"client {chosen}: age group {int(row['bins'])}, gender {int(row['gender'])}; {len(one)} events "
        f"in {len(set(codes))} categories (black: recurring payments, same category and amount monthly; dot size: log amount)"
        + ("; life change mid-history" if row["has_change"] else ""),
        fontsize=9,
    )

    panels = [
        ("recurring: day-of-month spread (days)", "bins", "age group"),
        ("links: old minus young map, per event", "bins", "age group"),
        ("sessions: share < 30 min after previous", "gender", "gender"),
        ("time of day: evening − morning share", "gender", "gender"),
    ]
    for i, (name, label, label_name) in enumerate(panels):
        axis = fig.add_subplot(grid[1, i])
        values = [stats[name][targets[label] == v].dropna().to_numpy() for v in sorted(targets[label].unique())]
        axis.boxplot(values, showfliers=False)
        axis.set_xticks(range(1, len(values) + 1), [str(v) for v in sorted(targets[label].unique())])
        axis.set_xlabel(label_name)
        axis.set_title(name, fontsize=9)
    fig.suptitle(f"synthetic card transactions (seed {args.seed}, {args.clients} clients): mechanisms and the labels they carry", fontsize=11)
    fig.savefig(args.out, dpi=110, bbox_inches="tight")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
