"""The quality levers: config choices, value-aware numbers, time features, pooling, InfoNCE."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from ptls_meles.batch import PaddedBatch
from ptls_meles.config import CHOICES, PRESETS, MeLESConfig
from ptls_meles.encoding import Encoding
from ptls_meles.losses import make_loss
from ptls_meles.nn.event_encoder import EventEncoder, category_value_edges, daytime_features, time_scalars
from ptls_meles.nn.pooling import SequencePooling
from ptls_meles.train import MeLESModule, embedder_from_config


# --------------------------------------------------------------------------- config
def test_bad_choices_are_refused_when_the_config_is_built_with_the_valid_ones_named():
    with pytest.raises(ValueError, match="loss='arcface'.*contrastive.*infonce"):
        MeLESConfig(loss="arcface")
    with pytest.raises(ValueError, match="encoder='cnn'.*gru, lstm, transformer"):
        MeLESConfig(encoder="cnn")
    with pytest.raises(ValueError, match="'median' is not one of last, mean, max, attention"):
        MeLESConfig(pooling="last,median")
    with pytest.raises(ValueError, match="pooling needs at least one"):
        MeLESConfig(pooling="")
    with pytest.raises(ValueError, match="cnt_min"):
        MeLESConfig(cnt_min=50, cnt_max=10)
    with pytest.raises(ValueError, match="'hidden_size' must be int"):
        MeLESConfig(hidden_size="abc")
    with pytest.raises(ValueError, match="'grad_clip' must be float or None"):
        MeLESConfig(grad_clip="x")


def test_sets_are_canonical_and_old_boolean_time_features_still_load():
    c = MeLESConfig(pooling="max, last,max", time_features="")
    assert c.pooling == "last,max" and c.parts("pooling") == ("last", "max") and c.parts("time_features") == ()
    assert MeLESConfig(time_features=True).time_features == "gap"
    assert MeLESConfig(time_features=False).time_features == ""
    assert MeLESConfig.from_dict(MeLESConfig(pooling="mean,last").to_dict()) == MeLESConfig(pooling="last,mean")


def test_paper_preset_fills_settings_and_explicit_ones_win():
    c = MeLESConfig.from_dict({"preset": "paper", "hidden_size": 64, "pooling": "mean"})
    assert c.hidden_size == 64 and c.pooling == "mean"
    assert c.loss == PRESETS["paper"]["loss"] and c.numeric_encoding == "scalar"
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        MeLESConfig.from_dict({"preset": "nope"})
    # explicit settings that equal today's defaults win too (they were overwritten by the preset)
    c = MeLESConfig(preset="paper", encoder="conv", numeric_encoding="scalar,by_category", pooling="last,mean,max")
    assert (c.encoder, c.numeric_encoding, c.pooling) == ("conv", "scalar,by_category", "last,mean,max")
    assert MeLESConfig(preset="paper").encoder == "gru"


def test_paper_preset_keeps_the_papers_view_lengths_while_the_defaults_are_shorter():
    assert (MeLESConfig().cnt_min, MeLESConfig().cnt_max) == (15, 100)
    assert (MeLESConfig(preset="paper").cnt_min, MeLESConfig(preset="paper").cnt_max) == (25, 200)
    # a saved paper-preset model round-trips with its own lengths, not today's defaults
    saved = MeLESConfig(preset="paper").to_dict()
    assert (MeLESConfig.from_dict(saved).cnt_min, MeLESConfig.from_dict(saved).cnt_max) == (25, 200)


def test_choices_table_is_the_one_the_factories_read():
    from ptls_meles.losses import LOSSES, MINERS
    from ptls_meles.nn.embedder import ENCODERS
    from ptls_meles.views import SPLITS

    assert (LOSSES, MINERS, ENCODERS, SPLITS) == (CHOICES["loss"], CHOICES["miner"], CHOICES["encoder"], CHOICES["split"])


# --------------------------------------------------------------------------- event encoder
def _batch(ids, values, times, lengths) -> PaddedBatch:
    return PaddedBatch(
        {"p": torch.tensor(ids), "v": torch.tensor(values, dtype=torch.float32),
         "event_time": torch.tensor(times, dtype=torch.float64)},
        torch.tensor(lengths),
    )


def test_by_category_standardises_within_the_category_and_scales_its_vector():
    enc = EventEncoder({"p": (5, 3)}, ["v"], numeric_encoding=("by_category",))
    columns = {"p": np.array([2, 2, 2, 3, 3, 4]), "v": np.array([100.0, 120.0, 140.0, 5.0, 7.0, 1.0], np.float32)}
    enc.fit_value_moments(columns)
    assert enc.value_mean[0, 2].item() == pytest.approx(120.0) and enc.value_std[0, 2].item() == pytest.approx(20.0)
    assert enc.value_mean[0, 3].item() == pytest.approx(6.0) and enc.value_std[0, 3].item() == pytest.approx(math.sqrt(2))
    assert enc.value_std[0, 4].item() == 1.0  # one value: no spread to divide by
    # the same raw 120 is typical for category 2 and extreme for category 3
    out = enc(_batch([[2, 3, 2]], [[120.0, 120.0, 140.0]], [[0.0, 1.0, 2.0]], [3]))
    emb = enc.embeddings["p"].weight
    value_block = out[0, :, 3:]
    assert torch.allclose(value_block[0], torch.zeros(3), atol=1e-6)
    z3 = min((120.0 - 6.0) / math.sqrt(2), 10.0)
    assert torch.allclose(value_block[1], enc.value_vectors.weight[3] * z3, atol=1e-5)
    assert torch.allclose(value_block[2], enc.value_vectors.weight[2] * 1.0, atol=1e-5)
    assert torch.allclose(out[0, :, :3], emb[[2, 3, 2]])


def test_every_numeric_encoding_ignores_padding_garbage_and_has_the_announced_size():
    torch.manual_seed(0)
    enc = EventEncoder({"p": (5, 3)}, ["v"], time_features=("gap", "elapsed", "absolute", "daytime"),
                       numeric_encoding=("scalar", "by_category", "periodic", "piecewise"), periodic_dim=4).eval()
    clean = _batch([[2, 3, 0]], [[1.0, 2.0, 0.0]], [[10.0, 70.0, 0.0]], [2])
    dirty = _batch([[2, 3, 4]], [[1.0, 2.0, float("nan")]], [[10.0, 70.0, 1e9]], [2])
    a, b = enc(clean), enc(dirty)
    assert a.shape == (1, 3, enc.output_size) == (1, 3, 3 + 3 + 3 + 4 + 4 + 4)
    assert torch.equal(a, b) and torch.all(a[0, 2] == 0)


def test_piecewise_edges_are_each_categorys_quantiles_and_a_rare_category_takes_the_columns():
    rng = np.random.default_rng(0)
    ids = np.r_[np.full(101, 2), np.full(41, 3), np.full(3, 4)]
    values = np.r_[rng.normal(100, 10, 101), rng.exponential(5, 41), [1.0, 2.0, 3.0]].astype(np.float32)
    values[5] = np.nan  # not finite: left out of the quantiles
    order = rng.permutation(len(ids))  # the store's row order does not matter
    edges = category_value_edges({"p": ids[order], "v": values[order]}, "p", ["v"], vocab=6, n_bins=4)
    q = np.linspace(0, 1, 5)
    assert edges.shape == (1, 6, 5)
    np.testing.assert_allclose(edges[0, 2], np.quantile(values[1:101][np.isfinite(values[1:101])], q, method="lower"), rtol=1e-6)
    np.testing.assert_allclose(edges[0, 3], np.quantile(values[101:142], q, method="lower"), rtol=1e-6)
    finite = values[np.isfinite(values)]
    for rare in (0, 1, 4, 5):  # padding, unseen and a category of three values read the whole column's edges
        np.testing.assert_allclose(edges[0, rare], np.quantile(finite, q), rtol=1e-6)
    # past max_rows every k-th row is read: a column of 1..1000 sampled every 4th row keeps its range
    thinned = category_value_edges({"p": np.full(1000, 2), "v": np.arange(1.0, 1001.0)}, "p", ["v"], 3, 2, max_rows=250)
    assert thinned[0, 2].tolist() == [1.0, 497.0, 997.0]


def test_piecewise_fills_the_bins_below_the_value_and_weighs_its_categorys_vectors():
    enc = EventEncoder({"p": (4, 2)}, ["v"], numeric_encoding=("piecewise",), piecewise_bins=3)
    enc.fit_value_moments({"p": np.r_[np.full(7, 2), np.full(7, 3)],
                           "v": np.r_[np.arange(7) / 2, np.arange(7) * 5].astype(np.float32)})
    assert enc.value_edges[0, 2].tolist() == [0.0, 1.0, 2.0, 3.0] and enc.value_edges[0, 3].tolist() == [0.0, 10.0, 20.0, 30.0]
    out = enc(_batch([[2, 3, 2, 3, 2]], [[1.5, 1.5, float("nan"), 99.0, -5.0]], [[0.0] * 5], [5]))
    assert out.shape == (1, 5, enc.output_size) == (1, 5, 2 + 2)
    vectors = enc.bin_vectors.weight.detach().view(4, 3, 2)
    assert torch.allclose(out[0, 0, 2:], vectors[2, 0] + 0.5 * vectors[2, 1])  # 1.5 within 0, 1, 2, 3
    assert torch.allclose(out[0, 1, 2:], 0.15 * vectors[3, 0])  # the same 1.5 is low for category 3
    assert torch.equal(out[0, 2, 2:], torch.zeros(2))  # a missing value fills no bin
    assert torch.allclose(out[0, 3, 2:], vectors[3].sum(0))  # above the top edge: every bin full, no further
    assert torch.equal(out[0, 4, 2:], torch.zeros(2))  # below the bottom edge
    # the curve is not a line: three evenly spaced values of category 2 have unevenly spaced encodings
    a, b, c = enc(_batch([[2, 2, 2]], [[0.5, 1.5, 2.5]], [[0.0] * 3], [3]))[0, :, 2:]
    assert not torch.allclose(b - a, c - b)


def test_time_scalars_and_daytime_by_hand():
    t = torch.tensor([[100.0, 103.0, 110.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    gap, elapsed, absolute = time_scalars(t, mask, ("gap", "elapsed", "absolute"))
    assert torch.allclose(gap, torch.log1p(torch.tensor([[0.0, 3.0, 7.0, 0.0]])))
    assert torch.allclose(elapsed, torch.log1p(torch.tensor([[0.0, 3.0, 10.0, 0.0]])))
    assert absolute.tolist() == [[100.0, 103.0, 110.0, 0.0]]
    day = 86_400.0
    feats = daytime_features(torch.tensor([[0.0, day / 4, day + day / 2]], dtype=torch.float64), torch.ones(1, 3, dtype=torch.bool))
    np.testing.assert_allclose(feats[0, :, :2].numpy(), [[0, 1], [1, 0], [0, -1]], atol=1e-6)  # sin, cos of the hour
    np.testing.assert_allclose(feats[0, 2, 2:].numpy(), [math.sin(2 * math.pi / 7), math.cos(2 * math.pi / 7)], atol=1e-6)


def test_daytime_needs_times_in_seconds():
    enc = Encoding("c", "t", "number", numeric={})
    with pytest.raises(ValueError, match="daytime.*seconds.*'number'"):
        embedder_from_config(MeLESConfig(time_features="daytime"), enc)


def test_num_layers_left_unset_gives_each_encoder_its_own_depth_and_a_set_one_wins():
    from ptls_meles.encoding import CategoryVocab

    enc = Encoding("c", "t", "number", numeric={})
    enc.categorical["p"] = CategoryVocab(values=["a", "b"])

    def depth(**settings) -> int:
        seq = embedder_from_config(MeLESConfig(hidden_size=8, time_features="", **settings), enc).seq_encoder
        return {"gru": lambda: seq.rnn.num_layers, "bag": lambda: sum(isinstance(m, torch.nn.Linear) for m in seq.mlp),
                "conv": lambda: len(seq.mix)}[settings["encoder"]]()

    assert (depth(encoder="gru"), depth(encoder="bag"), depth(encoder="conv")) == (1, 2, 3)
    assert (depth(encoder="gru", num_layers=2), depth(encoder="conv", num_layers=5)) == (2, 5)
    with pytest.raises(ValueError, match="num_layers must be >= 1.*got 0"):
        MeLESConfig(num_layers=0)


# --------------------------------------------------------------------------- pooling
def test_pooling_by_hand_with_garbage_in_padding():
    out = torch.tensor([[[1.0, 5.0], [3.0, -1.0], [float("nan"), 99.0]], [[2.0, 2.0], [7.0, 7.0], [9.0, 9.0]]])
    pool = SequencePooling("max,last,mean", 2)
    assert pool.parts == ("last", "mean", "max") and pool.output_size == 6
    got = pool(out, torch.tensor([2, 3]))
    expected = torch.tensor([[3.0, -1.0, 2.0, 2.0, 3.0, 5.0], [9.0, 9.0, 6.0, 6.0, 9.0, 9.0]])
    assert torch.allclose(got, expected)
    attention = SequencePooling("attention", 2)
    a = attention(out, torch.tensor([2, 3]))
    assert torch.isfinite(a).all() and a.shape == (2, 2)


def test_gru_with_pooled_states_gives_the_same_vector_alone_or_in_a_batch():
    enc = Encoding("c", "t", "number", numeric={})
    enc.categorical = {}
    from ptls_meles.encoding import CategoryVocab

    enc.categorical["p"] = CategoryVocab(values=["a", "b", "c"])
    torch.manual_seed(0)
    emb = embedder_from_config(MeLESConfig(encoder="gru", hidden_size=8, pooling="last,mean,max,attention", time_features="",
                                           category_pooling=0), enc).eval()
    assert emb.output_size == 32
    rows = [torch.randint(2, 5, (n,)) for n in (3, 7, 5)]
    batch = PaddedBatch({"p": torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)}, torch.tensor([3, 7, 5]))
    together = emb(batch)
    for i, r in enumerate(rows):
        alone = emb(PaddedBatch({"p": r[None]}, torch.tensor([len(r)])))
        assert torch.allclose(alone[0], together[i], atol=1e-5)


def test_category_pooling_by_hand_with_garbage_in_padding():
    from ptls_meles.nn.category_pooling import CategoryPooling

    pool = CategoryPooling(state_size=2, n_categories=2, width=2)
    with torch.no_grad():
        pool.project.weight.copy_(torch.eye(2))
        pool.project.bias.zero_()
    # ids 2, 3 are the two frequent categories (slots 0, 1); 9 and the unseen 1 go to "any other" (slot 2)
    states = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [3.0, 0.0], [5.0, 5.0], [float("nan"), 9.0]],
                           [[2.0, 4.0], [1.0, 1.0], [7.0, 7.0], [8.0, 8.0], [6.0, 6.0]]], requires_grad=True)
    ids = torch.tensor([[2, 3, 2, 9, 0], [2, 1, 2, 9, 3]])
    got = pool(states, ids, torch.tensor([4, 2]))
    assert pool.output_size == 12 and got.shape == (2, 12)
    # per slot its mean, then per slot its last event's state; row 2 has no event of slot 1 inside its length
    assert torch.equal(got[0], torch.tensor([2.0, 0.0, 0.0, 1.0, 5.0, 5.0, 3.0, 0.0, 0.0, 1.0, 5.0, 5.0]))
    assert torch.equal(got[1], torch.tensor([2.0, 4.0, 0.0, 0.0, 1.0, 1.0, 2.0, 4.0, 0.0, 0.0, 1.0, 1.0]))
    got.sum().backward()
    assert torch.isfinite(states.grad).all() and states.grad[0, 4].abs().sum() == 0 and states.grad[1, 2:].abs().sum() == 0


def test_category_pooling_of_event_encodings_projects_each_event_itself():
    from ptls_meles.encoding import CategoryVocab

    enc = Encoding("c", "t", "number", numeric={})
    enc.categorical = {"p": CategoryVocab(values=["a", "b", "c", "d"])}
    emb = embedder_from_config(MeLESConfig(encoder="gru", hidden_size=8, time_features="", category_pooling=2,
                                           category_inputs="events", category_statistics="last"), enc).eval()
    rows = [torch.tensor([2, 3, 5, 2, 3]), torch.tensor([4, 2])]
    batch = PaddedBatch({"p": torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)}, torch.tensor([5, 2]))
    with torch.no_grad():
        out, events = emb(batch)[:, 24:], emb.event_encoder(batch)
        project = emb.category_pooling.project
        # slots: id 2, id 3, any other; each slot's last event's own encoding, projected; none: zeros
        want = [torch.cat([project(events[0, 3]), project(events[0, 4]), project(events[0, 2])]),
                torch.cat([project(events[1, 1]), torch.zeros(8), project(events[1, 0])])]
    assert torch.allclose(out, torch.stack(want), atol=1e-6)
    with pytest.raises(ValueError, match="'outputs' is not one of states, events"):
        MeLESConfig(category_inputs="outputs")


def test_category_pooling_share_keeps_how_often_a_category_occurs():
    from ptls_meles.nn.category_pooling import CategoryPooling

    pool = CategoryPooling(state_size=1, n_categories=1, width=1, statistics=("share", "mean"))
    with torch.no_grad():
        pool.project.weight.zero_()
        pool.project.bias.fill_(1.0)  # every event projects to 1: the bias alone
    # row 0: category 2 in 1 of 4 events; row 1: in 3 of 4; padding (id 2 past the length) not counted
    ids = torch.tensor([[2, 5, 5, 5, 2], [2, 2, 7, 2, 2]])
    got = pool(torch.randn(2, 5, 1), ids, torch.tensor([4, 4]))
    assert pool.statistics == ("mean", "share") and pool.output_size == 4
    # means: 1 wherever the slot has events, blind to counts; shares: each slot's fraction of the events
    assert torch.equal(got, torch.tensor([[1.0, 1.0, 0.25, 0.75], [1.0, 1.0, 0.75, 0.25]]))
    assert MeLESConfig(category_statistics="share,mean").category_statistics == "mean,share"
    with pytest.raises(ValueError, match="'median' is not one of mean, last, share, max"):
        MeLESConfig(category_statistics="mean,median")
    with pytest.raises(ValueError, match="statistics must be some of"):
        CategoryPooling(state_size=1, n_categories=1, statistics=())


def test_category_share_pooling_counts_more_categories_than_the_mean_and_last():
    from ptls_meles.bench.parts import embedding_parts
    from ptls_meles.encoding import CategoryVocab
    from ptls_meles.nn.category_pooling import CategoryPooling

    pool = CategoryPooling(state_size=1, n_categories=1, width=1, statistics=("mean", "share"), share_categories=3)
    with torch.no_grad():
        pool.project.weight.fill_(1.0)
        pool.project.bias.zero_()
    # ids 2 (frequent: its own slot everywhere), 3 and 4 (their own share slots only), 6 and unseen 1 ("any other")
    states = torch.tensor([[[1.0], [2.0], [4.0], [4.0], [8.0], [16.0], [99.0]]])
    ids = torch.tensor([[2, 3, 3, 4, 6, 1, 2]])  # the last event is padding
    got = pool(states, ids, torch.tensor([6]))
    assert pool.statistic_sizes == {"mean": 2, "share": 4} and pool.output_size == 6
    # means: id 2, then the rest together (2+4+4+8+16)/5; shares: ids 2, 3, 4, the rest, each sum over 6 events
    assert torch.allclose(got[0], torch.tensor([1.0, 34 / 5, 1 / 6, 6 / 6, 4 / 6, 24 / 6]))
    # from the config: the share's slots are cut to the vocabulary, and the parts follow the sizes
    enc = Encoding("c", "t", "number", numeric={})
    enc.categorical = {"p": CategoryVocab(values=["a", "b", "c", "d"])}
    emb = embedder_from_config(MeLESConfig(hidden_size=8, time_features="", category_pooling=2,
                                           category_share_pooling=200), enc)
    assert emb.category_pooling.statistic_sizes == {"mean": 3 * 8, "last": 3 * 8, "share": 5 * 8}
    parts = embedding_parts(emb)
    assert parts["category sums over the length"] == slice(emb.output_size - 40, emb.output_size)
    # the default keeps every value's share (up to 256); without a share statistic it sets nothing, and such a
    # config saved and read back loads; asked for without a share, it is refused
    assert MeLESConfig().category_share_pooling == 256
    no_share = MeLESConfig(category_statistics="mean,last")
    assert no_share.category_share_pooling == 0
    assert MeLESConfig.from_dict(no_share.to_dict(), saved=True).category_share_pooling == 0
    saved = {k: v for k, v in MeLESConfig().to_dict().items() if k != "category_share_pooling"}
    assert MeLESConfig.from_dict(saved, saved=True).category_share_pooling == 0  # saved before it existed
    with pytest.raises(ValueError, match="category_share_pooling=50 sets the share .* has no share"):
        MeLESConfig(category_statistics="mean,last", category_share_pooling=50)
    with pytest.raises(ValueError, match="category_share_pooling must be 0"):
        MeLESConfig(category_share_pooling=-1)


def test_category_pooling_max_keeps_each_dimension_largest_value_per_category():
    from ptls_meles.nn.category_pooling import CategoryPooling

    pool = CategoryPooling(state_size=2, n_categories=1, width=2, statistics=("max", "mean"))
    with torch.no_grad():
        pool.project.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))  # x and -x: its maximum and its minimum
        pool.project.bias.zero_()
    # row 0: category 2 at values 3, -1, 5 (then padding holding a larger value), "any other" at -7;
    # row 1: only "any other" events, all negative: the maximum is not clipped at zero
    states = torch.tensor([[[3.0, 0.0], [-1.0, 0.0], [-7.0, 0.0], [5.0, 0.0], [99.0, 0.0]],
                           [[-4.0, 0.0], [-2.0, 0.0], [8.0, 0.0], [8.0, 0.0], [8.0, 0.0]]], requires_grad=True)
    ids = torch.tensor([[2, 2, 9, 2, 2], [4, 4, 2, 2, 2]])
    got = pool(states, ids, torch.tensor([4, 2]))
    assert pool.statistics == ("mean", "max") and pool.output_size == 8
    # per statistic, per slot (category 2, any other): (x, -x); max of -x is minus the minimum
    assert torch.equal(got[0], torch.tensor([7 / 3, -7 / 3, -7.0, 7.0, 5.0, 1.0, -7.0, 7.0]))
    assert torch.equal(got[1], torch.tensor([0.0, 0.0, -3.0, 3.0, 0.0, 0.0, -2.0, 4.0]))  # no category-2 event: zeros
    got[:, 4:].sum().backward()  # the maxima's gradient reaches only the events that hold them
    assert states.grad[0, :, 0].tolist() == [0.0, -1.0, 0.0, 1.0, 0.0] and states.grad[1, :, 0].tolist() == [-1.0, 1.0, 0, 0, 0]
    assert MeLESConfig(category_statistics="max,share").category_statistics == "share,max"


def test_category_pooling_is_on_by_default_where_it_applies():
    from ptls_meles.encoding import CategoryVocab

    assert (MeLESConfig().category_pooling, MeLESConfig().category_width) == (32, 8)
    assert MeLESConfig().category_statistics == "mean,last,share"
    # the default is off where it cannot apply; asked for there, it is refused
    assert MeLESConfig(encoder="transformer").category_pooling == 0 == MeLESConfig(encoder="bag").category_pooling
    with pytest.raises(ValueError, match="category_pooling needs a causal encoder"):
        MeLESConfig(encoder="transformer", category_pooling=32)
    assert MeLESConfig(preset="paper").category_pooling == 0
    # a model saved before category pooling existed was trained without it
    saved = {k: v for k, v in MeLESConfig().to_dict().items() if k != "category_pooling"}
    assert MeLESConfig.from_dict(saved, saved=True).category_pooling == 0
    # one saved before the share statistic existed pooled by mean and last (and had no share's own categories)
    saved = {k: v for k, v in MeLESConfig().to_dict().items() if k not in ("category_statistics", "category_share_pooling")}
    old = MeLESConfig.from_dict(saved, saved=True)
    assert (old.category_statistics, old.category_share_pooling) == ("mean,last", 0)
    assert MeLESConfig.from_dict(MeLESConfig().to_dict(), saved=True).category_pooling == 32
    # data without a categorical field has no categories to pool apart
    numbers_only = Encoding("c", "t", "number", numeric={})
    plain = embedder_from_config(MeLESConfig(hidden_size=8, time_features="gap"), numbers_only)
    assert plain.category_pooling is None and plain.output_size == 24
    with pytest.raises(ValueError, match="category_pooling=4 pools .* this store has no categorical field"):
        embedder_from_config(MeLESConfig(hidden_size=8, time_features="gap", category_pooling=4), numbers_only)
    # a saved config asked for nothing: a model saved with the default loads on such data
    saved = MeLESConfig.from_dict(MeLESConfig(hidden_size=8, time_features="gap").to_dict(), saved=True)
    assert saved.category_pooling == 32 and embedder_from_config(saved, numbers_only).category_pooling is None
    with_field = Encoding("c", "t", "number", numeric={})
    with_field.categorical = {"p": CategoryVocab(values=["a", "b", "c"])}
    pooled = embedder_from_config(MeLESConfig(hidden_size=8, time_features=""), with_field)
    assert pooled.output_size == 24 + 3 * 4 * 8  # mean, last, share; three values (fewer than 32) and "any other"


def test_category_pooling_extends_the_embedding_and_ignores_padding():
    from ptls_meles.encoding import CategoryVocab

    enc = Encoding("c", "t", "number", numeric={})
    enc.categorical = {"p": CategoryVocab(values=["a", "b", "c", "d"])}
    torch.manual_seed(0)
    emb = embedder_from_config(MeLESConfig(encoder="conv", hidden_size=8, time_features="", category_pooling=2), enc).eval()
    # mean and last of 2 categories and "any other"; the share (by default) of all 4 values and "any other"
    assert emb.output_size == 24 + 2 * 3 * 8 + 5 * 8
    big = embedder_from_config(MeLESConfig(encoder="gru", hidden_size=8, time_features="", category_pooling=50), enc)
    assert big.output_size == 8 * 3 + 3 * 5 * 8  # at most the vocabulary's four values, plus "any other"
    wide = embedder_from_config(MeLESConfig(hidden_size=8, time_features="", category_pooling=2, category_width=5), enc)
    assert wide.output_size == 24 + 2 * 3 * 5 + 5 * 5
    rows = [torch.randint(2, 6, (n,)) for n in (3, 7, 5)]
    batch = PaddedBatch({"p": torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)}, torch.tensor([3, 7, 5]))
    together = emb(batch)
    for i, r in enumerate(rows):
        alone = emb(PaddedBatch({"p": r[None]}, torch.tensor([len(r)])))
        assert torch.allclose(alone[0], together[i], atol=1e-5)
    # a batch big enough to run in length groups gives each row what one padded call gives it
    rows = [torch.randint(2, 6, (n,)) for n in torch.randint(1, 40, (200,)).tolist()]
    batch = PaddedBatch({"p": torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)},
                        torch.tensor([len(r) for r in rows]))
    assert emb.seq_encoder.length_groups(batch.lengths) is not None
    grouped = emb(batch)
    emb.seq_encoder.length_buckets = 1
    assert torch.allclose(grouped, emb(batch), atol=1e-5)
    # reading the event encodings too: the same, in length groups or not
    both = embedder_from_config(MeLESConfig(encoder="conv", hidden_size=8, time_features="", category_pooling=2,
                                            category_inputs="events,states"), enc).eval()
    assert both.category_inputs == ("states", "events") and both.output_size == emb.output_size
    assert both.category_pooling.project.in_features == 8 + both.event_encoder.output_size
    grouped = both(batch)
    both.seq_encoder.length_buckets = 1
    assert torch.allclose(grouped, both(batch), atol=1e-5)
    for encoder in ("transformer", "bag"):
        with pytest.raises(ValueError, match="category_pooling needs a causal encoder"):
            MeLESConfig(encoder=encoder, category_pooling=4)
    with pytest.raises(ValueError, match="category_pooling must be 0"):
        MeLESConfig(category_pooling=-1)
    with pytest.raises(ValueError, match="category_width .* must be >= 1"):
        MeLESConfig(category_pooling=2, category_width=0)


# --------------------------------------------------------------------------- InfoNCE
def test_infonce_matches_the_formula_and_rewards_closer_positives():
    emb = F.normalize(torch.tensor([[1.0, 0.1], [0.9, 0.2], [-1.0, 0.3], [-0.8, -0.4]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    tau = 0.5
    loss = make_loss("infonce", temperature=tau)(emb, labels)
    sim = emb @ emb.T / tau
    terms = []
    for a in range(4):
        for p in range(4):
            if a != p and labels[a] == labels[p]:
                negatives = sim[a][labels != labels[a]]
                terms.append(-sim[a, p] + torch.logsumexp(torch.cat([sim[a, p : p + 1], negatives]), 0))
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    closer = F.normalize(torch.tensor([[1.0, 0.1], [1.0, 0.12], [-1.0, 0.3], [-1.0, 0.31]]), dim=1)
    assert make_loss("infonce", temperature=tau)(closer, labels) < loss
    with pytest.raises(ValueError, match="margin"):
        make_loss("infonce", margin=0.2)


# --------------------------------------------------------------------------- end to end
def test_a_module_with_every_lever_trains_and_its_value_moments_travel_in_the_state(tmp_path, monkeypatch):
    from conftest import events_frame
    from ptls_meles.prepare import prepare
    from ptls_meles.schema import EventSchema
    from ptls_meles.train import fit, load_model

    tx = events_frame(n_clients=40, max_len=30, seed=1)
    store, _ = prepare(tx, EventSchema("client", "day", ["mcc"], ["amount"], time_format="number"), show_progress=False)
    config = MeLESConfig(hidden_size=8, batch_size=8, max_epochs=2, num_workers=0, val_fraction=0.25, cnt_min=2,
                         cnt_max=10, patience=None, numeric_encoding="scalar,by_category,periodic,piecewise",
                         time_features="gap,elapsed,absolute", pooling="last,mean,max", loss="infonce",
                         lr_schedule="cosine", grad_clip=1.0, weight_decay=0.01,
                         aux_objective="next_event,view_stats", aux_relative=True,
                         view_statistics="shares,values,deviations,rate,gaps", category_pooling=3)
    from ptls_meles.nn.next_event import NextEventHead

    next_event_fitted = []  # the training module's moments (the returned best model reloads without them)
    fit_next = NextEventHead.fit_value_moments

    def spy(head, columns):
        fit_next(head, columns)
        next_event_fitted.append(head.value_mean.clone())

    monkeypatch.setattr(NextEventHead, "fit_value_moments", spy)
    module = fit(store, config, out_dir=tmp_path, show_progress=False)
    moments = module.embedder.event_encoder.value_mean
    assert moments.abs().sum() > 0  # fitted from the store, not left at zero
    loaded = load_model(tmp_path / "checkpoints" / "last.ckpt")
    assert torch.equal(loaded.embedder.event_encoder.value_mean, moments)
    edges = module.embedder.event_encoder.value_edges
    assert edges.diff(dim=-1).ge(0).all() and not torch.equal(edges[0, 1], torch.linspace(-1, 1, 9))  # fitted
    assert torch.equal(loaded.embedder.event_encoder.value_edges, edges)
    assert torch.equal(loaded.view_stats.value_mean, module.view_stats.value_mean)
    assert next_event_fitted and next_event_fitted[0].abs().sum() > 0  # fitted at the training start
    assert module.view_stats.gap_edges.diff().ge(0).all() and module.view_stats.gap_edges[-1] > 0  # fitted quantiles
    assert torch.equal(loaded.view_stats.gap_edges, module.view_stats.gap_edges)
    assert torch.equal(loaded.view_stats.gap_mean, module.view_stats.gap_mean)
    assert (loaded.aux_reference > 0).all() and int(loaded.aux_reference_steps) > 0  # both losses, saved
    logged = pd.read_csv(next((tmp_path / "logs").rglob("metrics.csv")))
    assert logged["view_stats_loss"].notna().any() and logged["next_event_loss"].notna().any()
    assert isinstance(loaded.config, MeLESConfig) and loaded.config.pooling == "last,mean,max"
    # last, mean, max of 8; mean and last of 3 categories and the others; the share of all 4 values and the others
    assert module.embedder.output_size == 24 + 2 * 4 * 8 + 5 * 8


# --------------------------------------------------------------------------- next-event objective
def test_next_event_head_scores_only_events_with_a_successor_and_numbers_within_their_category():
    from ptls_meles.nn.next_event import NextEventHead

    torch.manual_seed(0)
    head = NextEventHead(4, "p", 6, ["v"], predict_gap=False)
    # category 2: values 1, 3, 5 (mean 3, std 2); category 3: 10, 30 (mean 20, std 14.14)
    head.fit_value_moments({"p": np.array([2, 2, 2, 3, 3]), "v": np.array([1.0, 3.0, 5.0, 10.0, 30.0], np.float32)})
    with torch.no_grad():
        head.category.weight.zero_()
        head.category.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0, 0.0, 0.0]))  # always predicts category 2
        head.regression.weight.zero_()
        head.regression.bias.zero_()
    seq = torch.randn(2, 3, 4)
    good = _batch([[2, 2, 2], [2, 2, 9]], [[1.0, 3.0, 0.0], [1.0, 3.0, 0.0]], [[0.0] * 3] * 2, [3, 2])
    bad = _batch([[2, 3, 3], [2, 2, 9]], [[1.0, 3.0, 0.0], [1.0, 3.0, 0.0]], [[0.0] * 3] * 2, [3, 2])
    ce_right = F.cross_entropy(torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0, 0.0]]), torch.tensor([2])).item()
    # successors (3, 0, 3), all of category 2: standardised (0, -1.5, 0) → MSE 0.75 against 0
    assert head(seq, good).item() == pytest.approx(ce_right + 0.75, rel=1e-4)  # the padded 9 is never a target
    # a missing number is left out: (0, NaN, 0) → MSE 0
    gap = _batch([[2, 2, 2], [2, 2, 9]], [[1.0, 3.0, float("nan")], [1.0, 3.0, 0.0]], [[0.0] * 3] * 2, [3, 2])
    assert head(seq, gap).item() == pytest.approx(ce_right, rel=1e-4)
    # category 3's numbers are read against category 3's moments: (3 - 20) / 14.14, (0 - 20) / 14.14
    wrong = F.cross_entropy(torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0, 0.0]] * 3), torch.tensor([3, 3, 2])).item()
    z = torch.tensor([(3.0 - 20.0) / 200 ** 0.5, (0.0 - 20.0) / 200 ** 0.5, 0.0])
    assert head(seq, bad).item() == pytest.approx(wrong + float((z ** 2).mean()), rel=1e-4)
    # the moments are refitted at every training start, so checkpoints do not carry them
    assert not any(k.startswith("value_") for k in head.state_dict())


def _random_p_batch() -> PaddedBatch:
    """Four sequences of 6, 4, 5 and 3 random values of field ``p`` (ids 2..4), one event a day."""
    rows = [torch.randint(2, 5, (n,)) for n in (6, 4, 5, 3)]
    return PaddedBatch({"p": torch.nn.utils.rnn.pad_sequence(rows, batch_first=True),
                        "event_time": torch.arange(6.0, dtype=torch.float64).repeat(4, 1)}, torch.tensor([6, 4, 5, 3]))


def test_next_event_objective_trains_and_is_refused_for_a_transformer():
    for encoder in ("transformer", "bag"):
        with pytest.raises(ValueError, match="causal encoder"):
            MeLESConfig(encoder=encoder, aux_objective="next_event")
    enc = Encoding("c", "t", "number", numeric={})
    from ptls_meles.encoding import CategoryVocab

    enc.categorical = {"p": CategoryVocab(values=["a", "b", "c"])}
    module = MeLESModule(MeLESConfig(encoder="gru", hidden_size=8, aux_objective="next_event", time_features="gap"), enc)
    batch = _random_p_batch()
    emb, seq = module.embedder(batch, return_sequence=True)
    aux = module.next_event(seq, batch)
    aux.backward()
    assert seq.shape == (4, 6, 8) and torch.isfinite(aux)
    assert module.embedder.seq_encoder.rnn.weight_ih_l0.grad.abs().sum() > 0
    # the causal convolutions feed the same head
    conv = MeLESModule(MeLESConfig(encoder="conv", num_layers=2, hidden_size=8, aux_objective="next_event",
                                   time_features="gap"), enc)
    _, seq = conv.embedder(batch, return_sequence=True)
    conv.next_event(seq, batch).backward()
    assert seq.shape == (4, 6, 8) and conv.embedder.seq_encoder.filters.grad.abs().sum() > 0


def test_configs_saved_before_the_levers_keep_the_architecture_they_were_trained_with():
    from ptls_meles.config import SAVED_BEFORE_LEVERS

    old = {k: v for k, v in MeLESConfig().to_dict().items() if k not in SAVED_BEFORE_LEVERS}
    old["time_features"] = True  # the old boolean
    c = MeLESConfig.from_dict(old, saved=True)
    assert (c.numeric_encoding, c.pooling, c.time_features) == ("scalar", "last", "gap")
    assert MeLESConfig.from_dict({"hidden_size": 8}).pooling == MeLESConfig().pooling  # partial settings: today's defaults
    assert MeLESConfig.from_dict(MeLESConfig().to_dict()) == MeLESConfig()


# --------------------------------------------------------------------------- view statistics
def _view_stats_batch():
    # two clients × two views; field p (ids 1..3), one number x, times in days
    p = [[1, 1, 2, 0], [2, 3, 0, 0], [3, 3, 3, 3], [1, 3, 0, 0]]
    x = [[1.0, 3.0, 10.0, 0.0], [20.0, 5.0, 0.0, 0.0], [4.0, 6.0, 8.0, 2.0], [7.0, 1.0, 0.0, 0.0]]
    t = [[0.0, 1.0, 3.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 1.0, 2.0, 3.0], [0.0, 4.0, 0.0, 0.0]]
    return PaddedBatch({"p": torch.tensor(p), "x": torch.tensor(x), "event_time": torch.tensor(t, dtype=torch.float64)},
                       torch.tensor([3, 2, 4, 2])), torch.tensor([0, 0, 1, 1])


def test_view_statistics_are_shares_per_category_means_and_mean_log_gap_counted_by_hand():
    from ptls_meles.nn.view_stats import ViewStatsHead

    batch, _ = _view_stats_batch()
    head = ViewStatsHead(4, {"p": 4}, ["x"], use_time=True)
    sums, counts = head.view_statistics(batch)
    ratio = sums / counts.clamp(min=1e-6)
    assert ratio[0, :4].tolist() == pytest.approx([0, 2 / 3, 1 / 3, 0])  # shares of ids 0..3 in view 0
    assert ratio[2, :4].tolist() == pytest.approx([0, 0, 0, 1])
    assert ratio[0, 4:8].tolist() == pytest.approx([0, 2.0, 10.0, 0])  # mean x per id (moments 0 / 1)
    assert counts[0, 4:8].tolist() == [0, 2, 1, 0]  # padding (id 0, x 0) is never counted
    assert ratio[0, 8].item() == pytest.approx((math.log(2) + math.log(3)) / 2)  # gaps 1, 2 days


def test_deviations_are_the_mean_absolute_standardised_value_per_category_counted_by_hand():
    from ptls_meles.nn.view_stats import ViewStatsHead

    batch, _ = _view_stats_batch()
    head = ViewStatsHead(4, {"p": 4}, ["x"], use_time=False, statistics=("values", "deviations"))
    head.value_mean.copy_(torch.tensor([[0.0, 4.0, 0.0, 5.0]]))
    head.value_std.copy_(torch.tensor([[1.0, 2.0, 1.0, 1.0]]))
    sums, counts = head.view_statistics(batch)
    assert sums.shape == (4, 8)  # values per id, then deviations per id
    ratio = sums / counts.clamp(min=1e-6)
    # view 0: id 1 values 1 and 3 standardise to -1.5 and -0.5; id 2 value 10 to 10
    assert ratio[0, :4].tolist() == pytest.approx([0, -1.0, 10.0, 0])
    assert ratio[0, 4:].tolist() == pytest.approx([0, 1.0, 10.0, 0])
    # view 2: id 3 values 4, 6, 8, 2 standardise to -1, 1, 3, -3: highs and lows cancel in the mean, not here
    assert ratio[2, 3].item() == pytest.approx(0.0) and ratio[2, 7].item() == pytest.approx(2.0)
    only = ViewStatsHead(4, {"p": 4}, ["x"], use_time=False, statistics=("deviations",))
    only.value_mean.copy_(head.value_mean)
    only.value_std.copy_(head.value_std)
    assert torch.equal(only.view_statistics(batch)[0], sums[:, 4:])  # deviations alone: the same block


def test_gap_statistics_are_log_gap_bin_shares_and_mean_log_gap_per_category_counted_by_hand():
    from ptls_meles.nn.view_stats import GAP_BINS, ViewStatsHead

    batch, _ = _view_stats_batch()
    head = ViewStatsHead(4, {"p": 4}, ["x"], use_time=True, statistics=("gaps",))
    head.gap_edges.copy_(torch.tensor([math.log1p(1.5)] + [100.0] * (GAP_BINS - 2)))
    sums, counts = head.view_statistics(batch)
    assert sums.shape == (4, GAP_BINS + 4)  # no shares, values or rate: bins, then a mean per id
    ratio = sums / counts.clamp(min=1e-6)
    # view 0: times 0, 1, 3 (ids 1, 1, 2): gaps of 1 and 2 days, one in each of the first two bins
    assert ratio[0, :3].tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert ratio[0, GAP_BINS:].tolist() == pytest.approx([0, math.log(2), math.log(3), 0])  # moments 0 / 1
    assert counts[0, GAP_BINS:].tolist() == [0, 1, 1, 0]  # the view's first event has no gap
    # view 2: gaps of 1 day before three id-3 events
    assert ratio[2, :2].tolist() == pytest.approx([1.0, 0.0]) and counts[2, GAP_BINS + 3].item() == 3


def test_gap_moments_and_bin_edges_are_fitted_per_client_from_the_store():
    from ptls_meles.nn.view_stats import ViewStatsHead, flat_log_gaps

    times, offsets = np.array([0.0, 1.0, 3.0, 5.0, 6.0]), np.array([0, 3, 5])
    gaps = flat_log_gaps(times, offsets)
    assert np.isnan(gaps[[0, 3]]).all()  # each client's first event: no gap across clients
    assert gaps[[1, 2, 4]].tolist() == pytest.approx([math.log(2), math.log(3), math.log(2)])
    head = ViewStatsHead(4, {"p": 4}, ["x"], use_time=True, statistics=("shares", "gaps"))
    head.fit_value_moments({"p": np.array([1, 1, 2, 3, 3]), "x": np.ones(5), "event_time": times}, offsets)
    assert head.gap_mean[1:4].tolist() == pytest.approx([math.log(2), math.log(3), math.log(2)])
    assert head.gap_edges[0].item() == 0 and head.gap_edges[1].item() == pytest.approx(math.log(2))
    assert head.gap_edges.max().item() <= math.log(3) + 1e-6
    # most gaps 0 (measurements stamped together): 0 keeps its own bin, the rest spread over the others
    from ptls_meles.nn.view_stats import gap_bin_edges

    edges = gap_bin_edges(np.concatenate([np.zeros(900), np.log1p(np.arange(1, 101)), [np.nan]]))
    assert edges[0] == 0 and len(np.unique(edges)) == len(edges) and edges[-1] < math.log1p(100)
    with pytest.raises(ValueError, match="need the store's offsets"):
        head.fit_value_moments({"p": np.array([1]), "event_time": np.array([0.0])})
    with pytest.raises(ValueError, match="view_statistics 'gaps' reads the event times"):
        MeLESConfig(aux_objective="view_stats", time_features="", view_statistics="shares,gaps")
    # without the objective the statistics are not read, so a preset without time features stays valid
    assert MeLESConfig(preset="paper", view_statistics="shares,gaps").time_features == ""
    with pytest.raises(ValueError, match="unknown"):
        ViewStatsHead(4, {"p": 4}, [], use_time=True, statistics=("order",))


def test_view_targets_come_from_the_clients_other_views_only():
    from ptls_meles.nn.view_stats import ViewStatsHead, other_views

    batch, labels = _view_stats_batch()
    head = ViewStatsHead(4, {"p": 4}, ["x"], use_time=False)
    sums, counts = head.view_statistics(batch)
    target, known = other_views(sums, counts, labels)
    own = sums / counts.clamp(min=1e-6)
    assert torch.allclose(target[0], own[1]) and torch.allclose(target[1], own[0])
    assert torch.allclose(target[2], own[3]) and torch.allclose(target[3], own[2])
    assert known[0, 4:8].tolist() == [False, False, True, True]  # view 1 saw ids 2 and 3 only
    # a lone view has no target at all
    _, lone = other_views(sums[:3], counts[:3], torch.tensor([0, 0, 1]))
    assert not lone[2].any()


def test_view_stats_objective_learns_the_other_views_mix_and_trains_the_encoder():
    from ptls_meles.encoding import CategoryVocab

    batch, labels = _view_stats_batch()
    enc = Encoding("c", "t", "number", numeric={"x": None})
    enc.categorical = {"p": CategoryVocab(values=["a", "b", "c"])}
    module = MeLESModule(MeLESConfig(encoder="gru", hidden_size=8, aux_objective="view_stats", time_features="gap",
                                     view_statistics="shares,values,rate"), enc)
    module.view_stats.fit_value_moments({"p": np.array([1, 1, 2, 3, 3]), "x": np.array([1.0, 3.0, 5.0, 2.0, 4.0])})
    assert module.view_stats.value_mean[0, 1:4].tolist() == pytest.approx([2.0, 5.0, 3.0])
    emb = module.embedder(batch)
    first = module.view_stats(emb, batch, labels)
    first.backward()
    assert torch.isfinite(first) and module.embedder.seq_encoder.rnn.weight_ih_l0.grad.abs().sum() > 0
    opt = torch.optim.Adam(module.parameters(), lr=0.01)
    for _ in range(60):
        opt.zero_grad()
        loss = module.view_stats(module.embedder(batch), batch, labels)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first.item()
    MeLESConfig(encoder="transformer", aux_objective="view_stats")  # no future to peek at: allowed


def test_relative_aux_losses_are_divided_by_their_mean_over_the_first_steps_then_frozen():
    from ptls_meles.encoding import CategoryVocab
    from ptls_meles.train import AUX_REFERENCE_STEPS

    enc = Encoding("c", "t", "number", numeric={"x": None})
    enc.categorical = {"p": CategoryVocab(values=["a", "b", "c"])}
    plain = MeLESModule(MeLESConfig(encoder="gru", hidden_size=8, aux_objective="view_stats", aux_relative=False), enc)
    assert plain.relative_to_start({"view_stats_loss": torch.tensor(3.0)})["view_stats_loss"].item() == 3.0
    assert "aux_reference" not in plain.state_dict()  # models saved before the option load unchanged
    module = MeLESModule(MeLESConfig(encoder="gru", hidden_size=8, aux_objective="view_stats", aux_relative=True), enc)
    first = module.relative_to_start({"view_stats_loss": torch.tensor(4.0, requires_grad=True)})["view_stats_loss"]
    assert first.item() == pytest.approx(1.0) and first.requires_grad  # the gradient still flows, scaled by 1/4
    second = module.relative_to_start({"view_stats_loss": torch.tensor(2.0)})["view_stats_loss"]
    assert second.item() == pytest.approx(2.0 / 3.0)  # reference: the mean of 4 and 2
    for _ in range(AUX_REFERENCE_STEPS):
        module.relative_to_start({"view_stats_loss": torch.tensor(3.0)})
    reference = module.aux_reference.clone()
    module.relative_to_start({"view_stats_loss": torch.tensor(100.0)})  # after the first steps: frozen
    assert torch.equal(module.aux_reference, reference) and int(module.aux_reference_steps) == AUX_REFERENCE_STEPS
    assert reference[1].item() == pytest.approx((4 + 2 + 3 * (AUX_REFERENCE_STEPS - 2)) / AUX_REFERENCE_STEPS)
    restored = MeLESModule(MeLESConfig(encoder="gru", hidden_size=8, aux_objective="view_stats", aux_relative=True), enc)
    restored.load_state_dict(module.state_dict())  # the reference travels with the weights
    assert torch.equal(restored.aux_reference, reference)
    with pytest.raises(ValueError, match="aux_relative=True scales an auxiliary loss, but aux_objective is empty"):
        MeLESConfig(aux_objective="", aux_relative=True)


def test_default_objective_is_relative_view_stats_with_timing_and_turning_it_off_needs_one_setting():
    c = MeLESConfig()
    assert (c.aux_objective, c.aux_weight, c.aux_relative) == ("view_stats", 0.3, True)
    assert c.parts("view_statistics") == ("shares", "values", "rate", "gaps")
    # no time features: the default drops the timing statistics it cannot read; asked for, they are refused
    assert MeLESConfig(time_features="").parts("view_statistics") == ("shares", "values", "rate")
    with pytest.raises(ValueError, match="view_statistics 'gaps' reads the event times"):
        MeLESConfig(time_features="", view_statistics="shares,values,rate,gaps")
    assert MeLESConfig(preset="paper", aux_objective="view_stats").parts("view_statistics") == ("shares", "values", "rate")
    # no objective: the relative default has nothing to scale and is off, not an error
    assert MeLESConfig(aux_objective="").aux_relative is False
    assert MeLESConfig.from_dict({"aux_objective": ""}).aux_relative is False
    paper = MeLESConfig(preset="paper")
    assert (paper.aux_objective, paper.aux_weight, paper.aux_relative) == ("", 1.0, False)
    # a model saved before aux_relative existed trained the raw loss: it loads without the reference buffers
    saved = {k: v for k, v in MeLESConfig().to_dict().items() if k != "aux_relative"}
    assert MeLESConfig.from_dict(saved, saved=True).aux_relative is False
    assert MeLESConfig.from_dict(MeLESConfig().to_dict(), saved=True).aux_relative is True
    # ... and one saved before view_statistics existed predicted shares, values and rate
    saved = {k: v for k, v in MeLESConfig().to_dict().items() if k != "view_statistics"}
    assert MeLESConfig.from_dict(saved, saved=True).view_statistics == "shares,values,rate"


def test_a_missing_value_is_not_counted_in_its_category_mean():
    from ptls_meles.nn.view_stats import ViewStatsHead

    batch, _ = _view_stats_batch()
    batch.payload["x"][0, 1] = float("nan")  # view 0: id 1 holds 1.0 and a missing value
    sums, counts = ViewStatsHead(4, {"p": 4}, ["x"], use_time=False).view_statistics(batch)
    assert counts[0, 5].item() == 1 and sums[0, 5].item() == pytest.approx(1.0)


def test_projection_head_trains_the_loss_on_its_output_and_embeds_without_it():
    enc = Encoding("c", "t", "number", numeric={})
    from ptls_meles.encoding import CategoryVocab

    enc.categorical = {"p": CategoryVocab(values=["a", "b", "c"])}
    with pytest.raises(ValueError, match="projection_head"):
        MeLESConfig(projection_head=-1)
    paper = MeLESConfig(preset="paper")
    assert (paper.projection_head, paper.encoder) == (0, "gru")  # the paper's recipe whatever the defaults
    module = MeLESModule(MeLESConfig(encoder="gru", hidden_size=8, projection_head=5, time_features="gap", pooling="last",
                                     aux_objective="", category_pooling=0), enc)
    batch = _random_p_batch()
    labels = torch.tensor([0, 0, 1, 1])
    emb = module.embedder(batch)
    assert emb.shape == (4, 8) and module(batch).shape == (4, 8)  # embeddings skip the head
    space = module.metric_space(emb)
    assert space.shape == (4, 5) and torch.allclose(space.norm(dim=1), torch.ones(4))
    loss = module.training_step((batch, labels), 0)
    assert torch.isclose(loss, module.loss_fn(space, labels))
    loss.backward()
    assert module.projection[0].weight.grad.abs().sum() > 0
    assert module.embedder.seq_encoder.rnn.weight_ih_l0.grad.abs().sum() > 0


def test_head_width_caps_the_hidden_layer_of_both_training_heads():
    from ptls_meles.encoding import CategoryVocab

    enc = Encoding("c", "t", "number", numeric={})
    enc.categorical = {"p": CategoryVocab(values=["a", "b", "c"])}
    settings = dict(encoder="gru", hidden_size=8, projection_head=5, time_features="gap", pooling="last,mean",
                    aux_objective="view_stats", category_pooling=0)
    capped = MeLESModule(MeLESConfig(head_width=6, **settings), enc)
    assert capped.embedder.output_size == 16
    assert capped.projection[0].weight.shape == (6, 16) and capped.projection[2].weight.shape == (5, 6)
    assert capped.view_stats.body[0].weight.shape == (6, 16) and capped.view_stats.out.in_features == 6
    wide = MeLESModule(MeLESConfig(head_width=100, **settings), enc)  # a cap above the embedding changes nothing
    assert wide.projection[0].weight.shape == (16, 16) and wide.view_stats.out.in_features == 16
    batch = _random_p_batch()
    capped.training_step((batch, torch.tensor([0, 0, 1, 1])), 0).backward()
    assert capped.view_stats.body[0].weight.grad.abs().sum() > 0
    saved = {k: v for k, v in MeLESConfig().to_dict().items() if k != "head_width"}
    assert MeLESConfig.from_dict(saved, saved=True).head_width == 0  # saved before it existed: embedding-wide
    with pytest.raises(ValueError, match="head_width must be 0"):
        MeLESConfig(head_width=-1)


def test_embedding_parts_tile_the_embedding_in_pooling_order():
    from ptls_meles.bench.parts import embedding_parts, part_groups
    from ptls_meles.encoding import CategoryVocab

    enc = Encoding("c", "t", "number", numeric={})
    enc.categorical = {"p": CategoryVocab(values=["a", "b", "c", "d"])}
    emb = embedder_from_config(MeLESConfig(encoder="conv", hidden_size=8, time_features="", category_pooling=2,
                                           category_statistics="mean,last"), enc)
    parts = embedding_parts(emb)
    assert list(parts) == ["last", "mean", "max", "category means", "category last states"]
    assert [(s.start, s.stop) for s in parts.values()] == [(0, 8), (8, 16), (16, 24), (24, 48), (48, 72)]
    # the columns a part names are the values that pooling part computes
    rows = [torch.tensor([2, 3, 5, 2]), torch.tensor([4, 2])]
    batch = PaddedBatch({"p": torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)}, torch.tensor([4, 2]))
    with torch.no_grad():
        out = emb.eval()(batch)
        _, states = emb.seq_encoder(emb.event_encoder(batch), batch.lengths, None, return_sequence=True)
    assert torch.allclose(out[0, parts["last"]], states[0, 3]) and torch.allclose(out[1, parts["last"]], states[1, 1])
    assert torch.allclose(out[1, parts["mean"]], states[1, :2].mean(0), atol=1e-6)
    with_share = embedder_from_config(MeLESConfig(encoder="conv", hidden_size=8, time_features="", category_pooling=2,
                                                  category_statistics="mean,last,share"), enc)
    parts = embedding_parts(with_share)
    assert list(parts)[3:] == ["category means", "category last states", "category sums over the length"]
    # the share (by default) of all four values and "any other"
    assert parts["category sums over the length"] == slice(72, 112) and with_share.output_size == 112
    groups = part_groups(parts)  # the global states and the category parts, each scored as one table
    assert groups == {"global states together": list(range(0, 24)), "category parts together": list(range(24, 112))}
    assert embedding_parts(embedder_from_config(MeLESConfig(encoder="gru", hidden_size=4, pooling="mean", time_features="",
                                                                         category_pooling=0),
                                                enc)) == {"mean": slice(0, 4)}
    assert part_groups({"mean": slice(0, 4)}) == {}  # one kind only: nothing to group


# --------------------------------------------------------------------------- bag of events
def test_event_bag_is_the_mean_of_a_per_event_mlp_over_real_events():
    from ptls_meles.bench.parts import embedding_parts
    from ptls_meles.encoding import CategoryVocab

    enc = Encoding("c", "t", "number", numeric={})
    enc.categorical = {"p": CategoryVocab(values=["a", "b", "c", "d"])}
    torch.manual_seed(0)
    emb = embedder_from_config(MeLESConfig(encoder="conv", hidden_size=8, time_features="", category_pooling=2,
                                           event_bag=6), enc).eval()
    plain = embedder_from_config(MeLESConfig(encoder="conv", hidden_size=8, time_features="", category_pooling=2), enc)
    assert emb.output_size == plain.output_size + 6
    parts = embedding_parts(emb)
    assert list(parts)[-1] == "event bag" and parts["event bag"] == slice(plain.output_size, plain.output_size + 6)
    rows = [torch.tensor([2, 3, 5, 2]), torch.tensor([4, 2])]
    padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    garbage = padded.clone()
    garbage[1, 2:] = 5  # what sits after a row's length must not count
    outs = []
    with torch.no_grad():
        for ids in (padded, garbage):
            batch = PaddedBatch({"p": ids}, torch.tensor([4, 2]))
            outs.append(emb(batch))
        per_event = emb.event_bag.event_states(emb.event_encoder(PaddedBatch({"p": padded}, torch.tensor([4, 2]))))
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert torch.allclose(outs[0][0, parts["event bag"]], per_event[0].mean(0), atol=1e-6)
    assert torch.allclose(outs[0][1, parts["event bag"]], per_event[1, :2].mean(0), atol=1e-6)
    # the bag does not change what the sequence encoder and category pooling give
    plain.load_state_dict({k: v for k, v in emb.state_dict().items() if not k.startswith("event_bag.")})
    with torch.no_grad():
        assert torch.allclose(plain.eval()(PaddedBatch({"p": padded}, torch.tensor([4, 2]))),
                          outs[0][:, : plain.output_size], atol=1e-6)
    # the objectives train it, also beside the next-event head (which asks for the per-event states)
    module = MeLESModule(MeLESConfig(encoder="conv", hidden_size=8, time_features="gap", event_bag=6,
                                     aux_objective="next_event,view_stats", category_pooling=2), enc)
    rows = [torch.randint(2, 6, (n,)) for n in (6, 4, 5, 3)]
    batch = PaddedBatch({"p": torch.nn.utils.rnn.pad_sequence(rows, batch_first=True),
                         "event_time": torch.arange(6.0, dtype=torch.float64).repeat(4, 1)}, torch.tensor([6, 4, 5, 3]))
    module.training_step((batch, torch.tensor([0, 0, 1, 1])), 0).backward()
    assert module.embedder.event_bag.mlp[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="event_bag must be 0"):
        MeLESConfig(event_bag=-1)
    assert MeLESConfig.from_dict({k: v for k, v in MeLESConfig().to_dict().items() if k != "event_bag"},
                                 saved=True).event_bag == 0
