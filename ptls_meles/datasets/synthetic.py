"""A seeded synthetic card-transaction generator: the shipped default dataset.

Why it exists: the real benchmark sets (age group, gender) cannot be shipped, yet every
module and the demo need data with the same shape and the same *kind* of signal. Real
card histories carry much of their information in time and order, not only in
per-client shares and means; so does this generator. Each client has lasting habits,
and the hidden age group and gender act on them through several mechanisms
(data/README.md documents each one and its parameters):

* **recurring payments** on fixed days of the month (bills, subscriptions); their
  regularity (day jitter, skipped months) depends on the age group;
* **salary cycles**: spending bursts after a monthly payday, stronger for the young;
* **weekday and time-of-day habits**: a personal hour-of-day profile whose shape
  (morning vs. evening) differs by gender;
* **sessions**: bursts of purchases minutes apart; their size and pace differ by gender;
* **category transitions** inside a session (fuel → café): a Markov link map whose
  mix differs by age group;
* **a life change** in the middle of the history for some clients (more often young
  ones): new category preferences and amount level from that day on;
* **slow drift** of category preferences over the two years (label-free);
* weak shifts of category shares, amounts, activity and weekdays by both labels.

Per-client aggregates therefore keep real but partial signal; a model of timing and
order can find more. :func:`client_parameters` returns the hidden per-client parameters
(for an oracle in tests and for the figure in data/README.md).

Output follows the Sber age-group competition format: ``client_id``, ``trans_date``
(day 0..729), ``small_group`` (~200 category codes, Zipf-like popularity),
``amount_rur`` (heavy-tailed positive), plus ``trans_datetime`` (seconds since the
start of day 0, so ``trans_datetime // 86400 == trans_date``) and optionally
``trans_type`` (~50 codes). Day 0 is Monday 2018-01-01; the calendar (days of the
month) is the real one of 2018-2019.

Generation is vectorised per chunk of :data:`CHUNK_CLIENTS` clients, each chunk seeded
from ``(seed, chunk_index)``, so memory stays bounded and the same seed always gives
the same rows, whether generated in memory (:func:`generate`) or streamed to disk
(:func:`write`). The chunk size is a fixed constant for that reason.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..io_utils import atomic_path

CHUNK_CLIENTS = 2000
N_DAYS = 730
SECONDS_PER_DAY = 86_400
N_SMALL_GROUPS = 200
N_TRANS_TYPES = 50
N_AGE_GROUPS = 4
MIN_EVENTS, MAX_EVENTS = 50, 1500
GENDER_ONE_SHARE = 0.45

TRANSACTIONS_STEM = "transactions_train"
AGE_TARGET_FILE = "train_target.csv"
GENDER_TARGET_FILE = "gender_target.csv"

# ---------------------------------------------------------------- the calendar
ORIGIN = np.datetime64("2018-01-01")  # day 0, a Monday; 2018 and 2019 have 730 days together
_DATES = ORIGIN + np.arange(N_DAYS)
_MONTHS = _DATES.astype("datetime64[M]")
N_MONTHS = 24
MONTH_START = (np.arange(N_MONTHS) + ORIGIN.astype("datetime64[M]")).astype("datetime64[D]") - ORIGIN  # day index
MONTH_START = MONTH_START.astype(np.int64)
DAY_OF_MONTH = (_DATES - _MONTHS.astype("datetime64[D]")).astype(np.int64) + 1  # 1..31
WEEKDAY = np.arange(N_DAYS) % 7  # 0 = Monday
_DAYS_IN_PREVIOUS_MONTH = (_MONTHS.astype("datetime64[D]") - (_MONTHS - 1).astype("datetime64[D]")).astype(np.int64)

# ---------------------------------------------------------------- effect sizes
# Each mechanism's parameters; data/README.md explains them. Label effects are means of
# per-client draws with a wide individual spread, so every label signal is partial.

# category preferences (shares): shared lifestyle prototypes + weak label shifts + noise
_N_LIFESTYLES = 12
_LIFESTYLE_ALPHA = 0.4  # Dirichlet weight of a client over the prototypes
_AGE_SHARE_SCALE = 0.11
_GENDER_SHARE_SCALE = 0.035
_INDIVIDUAL_SCALE = 0.6  # per-client, per-category logit noise
_DRIFT_SCALE = 0.35  # per-client logit change from the first to the last of the drift periods
_N_DRIFT_PERIODS = 4
# amounts
_AGE_AMOUNT = np.array([-0.05, 0.0, 0.03, 0.01])
_GENDER_GROUP_AMOUNT_SCALE = 0.035  # per-category amount shift by gender
_OUTLIER_RATE = 0.003
_MAX_AMOUNT = 1e6
# activity
_AGE_LENGTH = np.array([0.04, 0.0, -0.02, -0.03])
# recurring payments: how many, and how regular by age group
_RECURRING_MEAN = 2.5  # payments per client (Poisson), each monthly on its own day
_RECURRING_MAX_SHARE = 0.3  # at most this share of a client's events are recurring
_N_RECURRING_GROUPS = 15
_AGE_JITTER_DAYS = np.array([2.4, 1.5, 0.9, 0.55])  # median day jitter of a recurring payment
_JITTER_SPREAD = 0.55  # lognormal sigma of a client's jitter around its group's median
_AGE_SKIP = np.array([0.14, 0.09, 0.06, 0.04])  # mean share of skipped months
# salary cycle: day intensity x (1 + burst * exp(-days since payday / decay))
_AGE_BURST = np.array([1.6, 1.0, 0.6, 0.35])  # median burst strength
_BURST_SPREAD = 0.6
_PAYDAYS = np.array([1, 5, 10, 15, 20, 25])
# weekday habits (logits per weekday, Monday first)
_WEEKDAY_NOISE = 0.3
_AGE_WEEKDAY = 0.4 * np.array([
    [-0.10, -0.10, -0.05, 0.00, 0.10, 0.20, 0.15],
    [0.00, 0.00, 0.00, 0.00, 0.05, 0.05, 0.00],
    [0.05, 0.05, 0.05, 0.00, 0.00, -0.05, -0.05],
    [0.10, 0.05, 0.05, 0.05, -0.05, -0.10, -0.10],
])
_GENDER_WEEKEND = 0.04  # gender 1: a little more on weekends
# time of day: base profile shifted by a personal chronotype, plus a gender-loaded shape
_GENDER_HOUR_MEAN = 0.4  # mean loading on the evening-vs-morning shape, + for gender 1, - for 0
_HOUR_LOADING_SPREAD = 0.6
_CHRONOTYPE_HOURS = 1.2  # spread of the personal shift of the profile
_WEEKEND_SHIFT_HOURS = 1.5  # weekends start later
_HOUR_NOISE = 0.2
# sessions: size 1 + geometric, gaps exponential
_GENDER_SESSION_EXTRA = np.array([0.6, 0.9])  # median extra events per session
_SESSION_SPREAD = 0.4
_GENDER_GAP_MINUTES = np.array([3.5, 5.5])  # median mean gap inside a session
_GAP_SPREAD = 0.45
_MAX_SESSION = 12
# category transitions inside a session: follow a link with probability rho; the link
# map is the "young" or the "old" one, the old one with a probability that grows with age
_LINK_RHO = (2.0, 3.0)  # Beta parameters of a client's link-following probability
_AGE_OLD_MAP = np.array([0.25, 0.42, 0.58, 0.75])  # mean probability to use the old map
_OLD_MAP_CONCENTRATION = 5.0
_LINK_BLOCK = 8  # links permute categories of similar popularity, so shares barely move
_LINK_DIFFERENT_BLOCKS = 0.5  # share of blocks whose links differ between the two maps
# life change: from a day in the middle of the history on, new preferences and amounts
_AGE_CHANGE = np.array([0.45, 0.32, 0.22, 0.14])
_CHANGE_SCALE = 0.9  # logit scale of the new preferences
_CHANGE_AMOUNT = 0.25


class SyntheticConfigError(ValueError):
    """A generator argument is out of range (the message names it and the bad value)."""


def _bump(hours: np.ndarray, centre: float, width: float) -> np.ndarray:
    """A Gaussian bump on the 24-hour circle."""
    d = (hours - centre + 12.0) % 24.0 - 12.0
    return np.exp(-0.5 * (d / width) ** 2)


def hour_profile(hours: np.ndarray) -> np.ndarray:
    """Base log-intensity of spending by hour of day: quiet nights, lunch and evening peaks."""
    return np.log(0.04 + 0.8 * _bump(hours, 9.0, 1.5) + 1.2 * _bump(hours, 13.0, 1.5)
                  + 1.5 * _bump(hours, 18.5, 2.0) + 0.4 * _bump(hours, 21.5, 1.2))


def gender_hour_shape(hours: np.ndarray) -> np.ndarray:
    """The shape a gender loading adds to the hour log-intensity: evening up, morning down."""
    return 0.8 * (_bump(hours, 19.5, 2.0) - _bump(hours, 9.5, 2.0)) + 0.4 * (_bump(hours, 13.0, 1.2) - _bump(hours, 22.5, 1.2))


@dataclass(frozen=True)
class _World:
    """Population-level structure shared by all clients of one seed."""

    group_logits: np.ndarray  # [K] log Zipf popularity of each small_group
    lifestyles: np.ndarray  # [J, K] label-free preference prototypes
    age_groups: np.ndarray  # [4, K] age-group preference shifts
    gender_groups: np.ndarray  # [2, K]
    group_amount: np.ndarray  # [K] typical log amount of a category
    gender_group_amount: np.ndarray  # [2, K]
    recurring_groups: np.ndarray  # [R] categories of recurring payments
    links: np.ndarray  # [2, K] next category of a link: the "young" and the "old" map
    type_given_group: np.ndarray  # [K, T] probabilities
    type_logits: np.ndarray  # [T]
    gender_type: np.ndarray  # [2, T]


def _make_links(rng: np.random.Generator, popularity_order: np.ndarray) -> np.ndarray:
    """Two link maps, each a permutation inside blocks of categories of similar popularity
    (so following links barely changes shares); the maps differ in some blocks only."""
    k = len(popularity_order)
    maps = np.empty((2, k), dtype=np.int64)
    for start in range(0, k, _LINK_BLOCK):  # 25 blocks: a loop over blocks, not events
        block = popularity_order[start:start + _LINK_BLOCK]
        young = rng.permutation(block)
        old = rng.permutation(block) if rng.random() < _LINK_DIFFERENT_BLOCKS else young
        maps[0, block], maps[1, block] = young, old
    return maps


def _make_world(seed: int) -> _World:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    k, t = N_SMALL_GROUPS, N_TRANS_TYPES
    # Zipf-like popularity, in a random order of codes so code 0 is not the top one.
    popularity = 1.0 / np.arange(1, k + 1) ** 1.1
    order = rng.permutation(k)  # order[r] = the code of popularity rank r
    group_logits = np.empty(k)
    group_logits[order] = np.log(popularity / popularity.sum())
    # Age effects change smoothly with age (a trend) plus group-specific parts.
    trend = rng.normal(0.0, 1.0, k)
    ages = np.linspace(-1.0, 1.0, N_AGE_GROUPS)[:, None] * trend + rng.normal(0.0, 0.8, (N_AGE_GROUPS, k))
    gender = rng.normal(0.0, 1.0, k)
    type_popularity = 1.0 / np.arange(1, t + 1) ** 1.2
    type_logits = np.log(type_popularity / type_popularity.sum())
    type_given_group = _softmax(type_logits + rng.normal(0.0, 1.5, (k, t)))
    lifestyles = rng.normal(0.0, 1.0, (_N_LIFESTYLES, k))
    group_amount = rng.normal(0.0, 0.9, k)
    gender_amount = rng.normal(0.0, _GENDER_GROUP_AMOUNT_SCALE, k)
    recurring = order[10 + rng.choice(70, _N_RECURRING_GROUPS, replace=False)]
    links = _make_links(rng, order)
    gender_type = rng.normal(0.0, 0.3, t)
    return _World(
        group_logits=group_logits,
        lifestyles=lifestyles,
        age_groups=_AGE_SHARE_SCALE * ages,
        gender_groups=_GENDER_SHARE_SCALE * np.stack([gender, -gender]),
        group_amount=group_amount,
        gender_group_amount=np.stack([gender_amount, -gender_amount]),
        recurring_groups=recurring,
        links=links,
        type_given_group=type_given_group,
        type_logits=type_logits,
        gender_type=np.stack([gender_type, -gender_type]),
    )


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _sample_rows(probs: np.ndarray, row_of_event: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one column index per event from ``probs[row_of_event]`` without a Python loop.

    Rows' CDFs are shifted by the row number and flattened into one increasing array,
    so a single ``searchsorted`` serves all rows. ``probs`` need not be normalised.
    """
    n_rows, width = probs.shape
    cdf = np.cumsum(probs, axis=1)
    cdf /= cdf[:, -1:]
    cdf[:, -1] = 1.0
    flat = (cdf + np.arange(n_rows)[:, None]).ravel()
    u = rng.random(len(row_of_event)) * (1.0 - 1e-9)
    index = np.searchsorted(flat, row_of_event + u, side="right") - row_of_event * width
    return np.minimum(index, width - 1)


def _segment_positions(starts_flag: np.ndarray) -> np.ndarray:
    """Position of each element inside its segment, segments starting where the flag is set."""
    index = np.arange(len(starts_flag))
    last_start = np.maximum.accumulate(np.where(starts_flag, index, 0))
    return index - last_start


@dataclass
class _Clients:
    """Every client's hidden habits (one row per client; [n, ...] arrays)."""

    client_id: np.ndarray
    age: np.ndarray
    gender: np.ndarray
    # preferences and amounts
    base_logits: np.ndarray  # [n, K]
    drift: np.ndarray  # [n, K] logit change over the whole history
    change_logits: np.ndarray  # [n, K] added from the change day on
    has_change: np.ndarray
    change_day: np.ndarray
    change_amount: np.ndarray
    amount_level: np.ndarray
    amount_spread: np.ndarray
    group_amount_offset: np.ndarray  # [n, K]
    type_prefs: np.ndarray  # [n, T]
    # activity and calendar
    n_events: np.ndarray
    start_day: np.ndarray
    span_days: np.ndarray
    weekday_logits: np.ndarray  # [n, 7]
    payday: np.ndarray
    burst: np.ndarray
    burst_decay: np.ndarray
    # recurring payments
    n_recurring: np.ndarray
    jitter_days: np.ndarray
    skip: np.ndarray
    # time of day and sessions
    hour_loading: np.ndarray
    chronotype: np.ndarray
    hour_noise: np.ndarray  # [n, 24]
    session_extra: np.ndarray  # mean number of events after the first in a session
    gap_minutes: np.ndarray
    # transitions
    link_rho: np.ndarray
    old_map: np.ndarray


# The hidden parameters a label acts on (scalar per client), for the oracle and the figure.
HIDDEN_PARAMETERS = ("jitter_days", "skip", "burst", "has_change", "old_map", "link_rho",
                     "hour_loading", "session_extra", "gap_minutes", "n_recurring", "amount_level", "n_events")


def _make_clients(world: _World, rng: np.random.Generator, n: int, first_id: int, mean_events: float) -> _Clients:
    k = N_SMALL_GROUPS
    age = rng.integers(0, N_AGE_GROUPS, n)
    gender = (rng.random(n) < GENDER_ONE_SHARE).astype(np.int64)

    lifestyle_weights = rng.dirichlet(np.full(_N_LIFESTYLES, _LIFESTYLE_ALPHA), size=n)
    base_logits = (
        world.group_logits
        + lifestyle_weights @ world.lifestyles
        + world.age_groups[age]
        + world.gender_groups[gender]
        + rng.normal(0.0, _INDIVIDUAL_SCALE, (n, k))
    )
    drift = rng.normal(0.0, _DRIFT_SCALE, (n, k))

    log_length = np.log(mean_events) + _AGE_LENGTH[age] + rng.normal(0.0, 0.5, n)
    n_events = np.clip(np.exp(log_length), MIN_EVENTS, MAX_EVENTS).astype(np.int64)
    events_per_day = np.exp(rng.normal(np.log(mean_events / 400.0), 0.6, n))
    span_days = np.clip(n_events / events_per_day, 90, N_DAYS)
    start_day = rng.random(n) * (N_DAYS - span_days)

    has_change = rng.random(n) < _AGE_CHANGE[age]
    change_day = start_day + span_days * rng.uniform(0.3, 0.7, n)
    new_weights = rng.dirichlet(np.full(_N_LIFESTYLES, _LIFESTYLE_ALPHA), size=n)
    change_logits = _CHANGE_SCALE * ((new_weights - lifestyle_weights) @ world.lifestyles) / np.sqrt(2.0)
    change_amount = rng.normal(0.0, _CHANGE_AMOUNT, n)

    weekday_logits = _AGE_WEEKDAY[age] + rng.normal(0.0, _WEEKDAY_NOISE, (n, 7))
    weekday_logits[:, 5:] += np.where(gender == 1, _GENDER_WEEKEND, -_GENDER_WEEKEND)[:, None]

    payday = rng.choice(_PAYDAYS, n)
    burst = _AGE_BURST[age] * np.exp(rng.normal(0.0, _BURST_SPREAD, n))
    burst_decay = rng.uniform(2.0, 6.0, n)

    months_active = np.maximum(span_days / 30.4, 1.0)
    n_recurring = np.minimum(rng.poisson(_RECURRING_MEAN, n), np.floor(_RECURRING_MAX_SHARE * n_events / months_active)).astype(np.int64)
    jitter_days = _AGE_JITTER_DAYS[age] * np.exp(rng.normal(0.0, _JITTER_SPREAD, n))
    skip = rng.beta(2.0, 2.0 / _AGE_SKIP[age] - 2.0)

    hour_loading = np.where(gender == 1, _GENDER_HOUR_MEAN, -_GENDER_HOUR_MEAN) + rng.normal(0.0, _HOUR_LOADING_SPREAD, n)
    chronotype = rng.normal(0.0, _CHRONOTYPE_HOURS, n)
    hour_noise = rng.normal(0.0, _HOUR_NOISE, (n, 24))
    session_extra = _GENDER_SESSION_EXTRA[gender] * np.exp(rng.normal(0.0, _SESSION_SPREAD, n))
    gap_minutes = _GENDER_GAP_MINUTES[gender] * np.exp(rng.normal(0.0, _GAP_SPREAD, n))

    link_rho = rng.beta(*_LINK_RHO, n)
    mean_old = _AGE_OLD_MAP[age]
    old_map = rng.beta(_OLD_MAP_CONCENTRATION * mean_old, _OLD_MAP_CONCENTRATION * (1.0 - mean_old))

    # Scale like the competition file (amounts there are rescaled, median ~20).
    amount_level = 3.0 + _AGE_AMOUNT[age] + rng.normal(0.0, 0.5, n)
    amount_spread = np.exp(rng.normal(np.log(0.8), 0.2, n))
    group_amount_offset = world.gender_group_amount[gender] + rng.normal(0.0, 0.35, (n, k))
    type_logits = world.type_logits + world.gender_type[gender] + rng.normal(0.0, 0.8, (n, N_TRANS_TYPES))
    return _Clients(
        client_id=first_id + np.arange(n, dtype=np.int64), age=age, gender=gender,
        base_logits=base_logits, drift=drift, change_logits=change_logits, has_change=has_change,
        change_day=change_day, change_amount=change_amount, amount_level=amount_level,
        amount_spread=amount_spread, group_amount_offset=group_amount_offset, type_prefs=_softmax(type_logits),
        n_events=n_events, start_day=start_day, span_days=span_days, weekday_logits=weekday_logits,
        payday=payday, burst=burst, burst_decay=burst_decay,
        n_recurring=n_recurring, jitter_days=jitter_days, skip=skip,
        hour_loading=hour_loading, chronotype=chronotype, hour_noise=hour_noise,
        session_extra=session_extra, gap_minutes=gap_minutes, link_rho=link_rho, old_map=old_map,
    )


def _day_intensity(clients: _Clients) -> np.ndarray:
    """[n, N_DAYS] relative spending intensity: active window × weekday habit × salary cycle."""
    days = np.arange(N_DAYS)
    active = (days >= np.floor(clients.start_day)[:, None]) & (days < (clients.start_day + clients.span_days)[:, None])
    weekday = np.exp(clients.weekday_logits)[:, WEEKDAY]
    payday = clients.payday[:, None]
    since_payday = DAY_OF_MONTH - payday + (DAY_OF_MONTH < payday) * _DAYS_IN_PREVIOUS_MONTH
    cycle = 1.0 + clients.burst[:, None] * np.exp(-since_payday / clients.burst_decay[:, None])
    return active * weekday * cycle


def _hour_probs(clients: _Clients) -> np.ndarray:
    """[2n, 24] hour-of-day probabilities: row 2c for weekdays, 2c + 1 for weekends of client c."""
    hours = np.arange(24) + 0.5
    rows = []
    for weekend_shift in (0.0, _WEEKEND_SHIFT_HOURS):
        shifted = hours[None, :] - clients.chronotype[:, None] - weekend_shift
        logits = hour_profile(shifted) + clients.hour_loading[:, None] * gender_hour_shape(shifted) + clients.hour_noise
        rows.append(_softmax(logits))
    return np.stack(rows, axis=1).reshape(-1, 24)


def _recurring_events(world: _World, clients: _Clients, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Monthly payments on each payment's own day of month, jittered and sometimes skipped."""
    payer = np.repeat(np.arange(len(clients.client_id)), clients.n_recurring)
    n_payments = len(payer)
    day_of_month = rng.integers(4, 26, n_payments)  # away from month ends, so jitter rarely wraps
    group = rng.choice(world.recurring_groups, n_payments)
    log_amount = clients.amount_level[payer] + 0.8 + rng.normal(0.0, 0.6, n_payments)
    second = rng.integers(7 * 3600, 22 * 3600, n_payments)  # each payment at its own time of day

    owner = np.repeat(payer, N_MONTHS)
    payment = np.repeat(np.arange(n_payments), N_MONTHS)
    month = np.tile(np.arange(N_MONTHS), n_payments)
    jitter = np.rint(rng.normal(0.0, 1.0, len(owner)) * clients.jitter_days[owner]).astype(np.int64)
    day = MONTH_START[month] + day_of_month[payment] - 1 + jitter
    keep = (
        (day >= clients.start_day[owner]) & (day < clients.start_day[owner] + clients.span_days[owner])
        & (rng.random(len(owner)) >= clients.skip[owner]) & (day >= 0) & (day < N_DAYS)
    )
    owner, payment, day = owner[keep], payment[keep], day[keep]
    minute_jitter = rng.integers(-900, 900, len(owner))
    seconds = np.clip(second[payment] + minute_jitter, 0, SECONDS_PER_DAY - 1)
    return {
        "owner": owner,
        "time": day * SECONDS_PER_DAY + seconds,
        "group": group[payment],
        "log_amount": log_amount[payment] + rng.normal(0.0, 0.003, len(owner)),  # the same bill every month
    }


def _session_events(world: _World, clients: _Clients, rng: np.random.Generator, n_free: np.ndarray) -> dict[str, np.ndarray]:
    """Free spending in sessions: start day from the day intensity, start hour from the hour
    profile, further events minutes apart; categories from drifting (and maybe changed)
    preferences, inside a session partly following the client's link map."""
    n = len(clients.client_id)
    owner = np.repeat(np.arange(n), n_free)
    n_events = len(owner)
    first_of_client = np.zeros(n_events, dtype=bool)
    first_of_client[(np.cumsum(n_free) - n_free)[n_free > 0]] = True
    p_new = 1.0 / (1.0 + clients.session_extra)
    new_session = first_of_client | (rng.random(n_events) < p_new[owner])
    new_session |= _segment_positions(new_session) % _MAX_SESSION == 0  # cap the session length
    position = _segment_positions(new_session)
    session = np.cumsum(new_session) - 1
    session_owner = owner[new_session]

    day = _sample_rows(_day_intensity(clients), session_owner, rng)
    weekend = WEEKDAY[day] >= 5
    hour = _sample_rows(_hour_probs(clients), 2 * session_owner + weekend, rng)
    start = day * SECONDS_PER_DAY + ((hour + rng.random(len(day))) * 3600).astype(np.int64)
    gap = np.where(new_session, 0.0, rng.exponential(1.0, n_events) * clients.gap_minutes[owner] * 60.0)
    elapsed = np.cumsum(gap)
    offset = (elapsed - elapsed[new_session][session]).astype(np.int64)
    time = np.minimum(start[session] + offset, N_DAYS * SECONDS_PER_DAY - 1)

    # preferences per (client, drift period, before/after the change)
    periods = np.linspace(-0.5, 0.5, _N_DRIFT_PERIODS)
    logits = clients.base_logits[:, None, None, :] + periods[None, :, None, None] * clients.drift[:, None, None, :]
    logits = logits + np.array([0.0, 1.0])[None, None, :, None] * clients.change_logits[:, None, None, :]
    prefs = _softmax(logits.reshape(-1, N_SMALL_GROUPS))
    period = np.minimum(time * _N_DRIFT_PERIODS // (N_DAYS * SECONDS_PER_DAY), _N_DRIFT_PERIODS - 1)
    after = clients.has_change[owner] & (time >= clients.change_day[owner] * SECONDS_PER_DAY)
    group = _sample_rows(prefs, (owner * _N_DRIFT_PERIODS + period) * 2 + after, rng)

    follow = (position > 0) & (rng.random(n_events) < clients.link_rho[owner])
    which_map = (rng.random(n_events) < clients.old_map[owner]).astype(np.int64)
    follow_index = np.flatnonzero(follow)
    by_position = follow_index[np.argsort(position[follow_index], kind="stable")]
    bounds = np.searchsorted(position[by_position], np.arange(1, _MAX_SESSION + 1))
    for lo, hi in zip(bounds[:-1], bounds[1:]):  # one vectorised step per position in a session
        idx = by_position[lo:hi]
        group[idx] = world.links[which_map[idx], group[idx - 1]]

    log_amount = clients.group_amount_offset.ravel()[owner * N_SMALL_GROUPS + group] + clients.change_amount[owner] * after
    return {"owner": owner, "time": time, "group": group, "log_amount": log_amount}


def _make_events(world: _World, clients: _Clients, rng: np.random.Generator, with_type: bool) -> pd.DataFrame:
    recurring = _recurring_events(world, clients, rng)
    n_free = clients.n_events - np.bincount(recurring["owner"], minlength=len(clients.client_id))
    free = _session_events(world, clients, rng, n_free)
    free["log_amount"] = (
        free["log_amount"]
        + clients.amount_level[free["owner"]]
        + world.group_amount[free["group"]]
        + clients.amount_spread[free["owner"]] * rng.standard_normal(len(free["owner"]))
    )
    parts = {key: np.concatenate([recurring[key], free[key]]) for key in free}
    owner, group, log_amount = parts["owner"], parts["group"], parts["log_amount"]
    n_events = len(owner)
    outlier = rng.random(n_events) < _OUTLIER_RATE
    log_amount[outlier] += 1.5 + rng.exponential(0.7, int(outlier.sum()))  # rare big purchases
    amount = np.clip(np.round(np.exp(log_amount), 3), 0.001, _MAX_AMOUNT)

    columns = {
        "client_id": clients.client_id[owner],
        "trans_date": parts["time"] // SECONDS_PER_DAY,
        "trans_datetime": parts["time"],
        "small_group": group.astype(np.int64),
        "amount_rur": amount,
    }
    if with_type:
        by_group = _sample_rows(world.type_given_group, group, rng)
        by_client = _sample_rows(clients.type_prefs, owner, rng)
        columns["trans_type"] = np.where(rng.random(n_events) < 0.6, by_group, by_client).astype(np.int64)
    order = rng.permutation(n_events)  # files are not sorted: prepare must sort
    return pd.DataFrame({name: values[order] for name, values in columns.items()})


def calendar_fields(trans_datetime: np.ndarray | pd.Series) -> pd.DataFrame:
    """``hour`` (0..23) and ``weekday`` (0 = Monday) of each ``trans_datetime``: the time-of-day
    and weekly habits as categorical fields, so hand-crafted features and encoders both see them."""
    seconds = np.asarray(trans_datetime, dtype=np.int64)
    return pd.DataFrame({"hour": seconds % SECONDS_PER_DAY // 3600, "weekday": seconds // SECONDS_PER_DAY % 7})


def _csv_options() -> pa_csv.WriteOptions:
    """Plain header (``client_id,...``) like pandas writes; older pyarrow quotes it, still valid CSV."""
    try:
        return pa_csv.WriteOptions(quoting_header="none")
    except TypeError:
        return pa_csv.WriteOptions()


def _check_args(n_clients: int, mean_events: float) -> None:
    if int(n_clients) != n_clients or n_clients < 1:
        raise SyntheticConfigError(f"n_clients must be a positive integer, got {n_clients!r} (example: 3000)")
    if not MIN_EVENTS <= mean_events <= MAX_EVENTS:
        raise SyntheticConfigError(
            f"mean_events must lie in [{MIN_EVENTS}, {MAX_EVENTS}], got {mean_events!r} (example: 300)"
        )


def _iter_clients(n_clients: int, seed: int, mean_events: float) -> Iterator[tuple[_World, _Clients, np.random.Generator]]:
    _check_args(n_clients, mean_events)
    world = _make_world(seed)
    for chunk_index, first in enumerate(range(0, n_clients, CHUNK_CLIENTS)):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 1, chunk_index]))
        n = min(CHUNK_CLIENTS, n_clients - first)
        yield world, _make_clients(world, rng, n, first, mean_events), rng


def iter_chunks(
    n_clients: int = 3000, seed: int = 0, mean_events: float = 300, with_type: bool = False
) -> Iterator[tuple[pd.DataFrame, pd.DataFrame]]:
    """Yield ``(transactions, targets)`` for each chunk of up to CHUNK_CLIENTS clients."""
    for world, clients, rng in _iter_clients(n_clients, seed, mean_events):
        events = _make_events(world, clients, rng, with_type)
        targets = pd.DataFrame({"client_id": clients.client_id, "bins": clients.age, "gender": clients.gender})
        yield events, targets


def client_parameters(n_clients: int = 3000, seed: int = 0, mean_events: float = 300) -> pd.DataFrame:
    """The hidden per-client parameters the labels act on (:data:`HIDDEN_PARAMETERS`: what an
    oracle knowing the mechanisms would see), with ``client_id``, ``bins``, ``gender`` and the
    label-free ``payday`` and ``change_day`` (for drawing a timeline). Same clients as
    :func:`generate` with the same arguments (events are not generated)."""
    frames = []
    for _, clients, _ in _iter_clients(n_clients, seed, mean_events):
        values = {name: getattr(clients, name) for name in (*HIDDEN_PARAMETERS, "payday", "change_day")}
        frames.append(pd.DataFrame({"client_id": clients.client_id, "bins": clients.age, "gender": clients.gender, **values}))
    return pd.concat(frames, ignore_index=True)


def generate(
    n_clients: int = 3000, seed: int = 0, mean_events: float = 300, with_type: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Generate the whole dataset in memory: ``(transactions, targets)``.

    ``transactions``: client_id, trans_date (0..729), trans_datetime (seconds since the
    start of day 0), small_group, amount_rur [, trans_type]; rows shuffled within each
    chunk. ``targets``: client_id, bins (age group 0..3), gender (0/1). Sequence lengths
    are lognormal with median ``mean_events``, clipped to [50, 1500].
    """
    parts = list(iter_chunks(n_clients, seed, mean_events, with_type))
    events = pd.concat([p[0] for p in parts], ignore_index=True)
    targets = pd.concat([p[1] for p in parts], ignore_index=True)
    return events, targets


def write(
    out_dir: str | os.PathLike,
    n_clients: int = 3000,
    seed: int = 0,
    mean_events: float = 300,
    with_type: bool = False,
    fmt: str = "csv",
) -> dict[str, Path]:
    """Stream the dataset to ``out_dir`` chunk by chunk; return the written paths.

    Files: ``transactions_train.csv`` (or ``.parquet``, one row group per chunk),
    ``train_target.csv`` (client_id,bins), ``gender_target.csv`` (client_id,gender).
    Rows are identical to :func:`generate` with the same arguments.
    """
    if fmt not in ("csv", "parquet"):
        raise SyntheticConfigError(f"fmt must be 'csv' or 'parquet', got {fmt!r}")
    _check_args(n_clients, mean_events)
    out_dir = Path(out_dir)
    paths = {
        "transactions": out_dir / f"{TRANSACTIONS_STEM}.{fmt}",
        "age_target": out_dir / AGE_TARGET_FILE,
        "gender_target": out_dir / GENDER_TARGET_FILE,
    }
    targets = []
    n_chunks = -(-n_clients // CHUNK_CLIENTS)
    chunks = iter_chunks(n_clients, seed, mean_events, with_type)
    with atomic_path(paths["transactions"]) as tmp:
        writer = None
        try:
            for events, chunk_targets in tqdm(chunks, total=n_chunks, desc="synthetic", unit="chunk"):
                table = pa.Table.from_pandas(events, preserve_index=False)
                if writer is None:
                    writer = (
                        pq.ParquetWriter(tmp, table.schema)
                        if fmt == "parquet"
                        else pa_csv.CSVWriter(tmp, table.schema, write_options=_csv_options())
                    )
                if fmt == "parquet":
                    writer.write_table(table, row_group_size=len(table))  # one row group per chunk
                else:
                    writer.write_table(table)
                targets.append(chunk_targets)
        finally:
            if writer is not None:
                writer.close()
    all_targets = pd.concat(targets, ignore_index=True)
    for key, column in (("age_target", "bins"), ("gender_target", "gender")):
        with atomic_path(paths[key]) as tmp:
            all_targets[["client_id", column]].to_csv(tmp, index=False)
    return paths
