"""Losses and miners: hand-computed cases, invariants, and a tiny training run per loss."""

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from ptls_meles.losses import (
    LOSSES,
    MINERS,
    AllPairsHistogramLoss,
    BinomialDevianceLoss,
    HardNegativePairMiner,
    RandomNegativePairMiner,
    SquaredHingeContrastiveLoss,
    StableDistanceWeightedMiner,
    make_loss,
    make_miner,
    pairs_to_triplets,
)


def pair_set(a, b):
    return set(zip(a.tolist(), b.tolist()))


def unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def random_batch(clients=6, views=5, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(clients * views, dim, generator=g)
    labels = torch.arange(clients).repeat_interleave(views)
    return emb, labels


# ----------------------------------------------------------------------------- hand cases

# 2 clients x 2 views in 2-D, raw (unnormalised) coordinates
HAND_EMB = torch.tensor([[0.0, 0.0], [0.3, 0.4], [0.4, 0.0], [1.0, 0.0]])
HAND_LABELS = torch.tensor([0, 0, 1, 1])


def test_contrastive_all_pairs_by_hand():
    loss = make_loss("contrastive", miner="all", margin=0.5)(HAND_EMB, HAND_LABELS)
    # positive pairs (ordered): 0-1 (d=0.5), 1-0, 2-3 (d=0.6), 3-2 -> d^2
    pos = [0.25, 0.25, 0.36, 0.36]
    # negative pairs (ordered): 0-2 d=0.4, 0-3 d=1, 1-2 d=sqrt(.17), 1-3 d=sqrt(.65), and reversed
    neg_d = [0.4, 1.0, math.sqrt(0.17), math.sqrt(0.65)] * 2
    neg = [max(0.5 - d, 0.0) ** 2 for d in neg_d]
    expected = (sum(pos) + sum(neg)) / (len(pos) + len(neg))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_contrastive_with_explicit_pairs():
    a1, p = torch.tensor([0]), torch.tensor([1])
    a2, n = torch.tensor([1, 0]), torch.tensor([2, 3])
    loss = SquaredHingeContrastiveLoss(margin=0.5)(HAND_EMB, HAND_LABELS, (a1, p, a2, n))
    expected = (0.25 + (0.5 - math.sqrt(0.17)) ** 2 + 0.0) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_contrastive_gradient_finite_for_identical_negatives():
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = make_loss("contrastive", "all")(emb, torch.tensor([0, 0, 1, 1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all()
    assert loss.item() > 0


# unit vectors at known angles, 3 clients x 2 views
ANGLES = [0, 10, 30, 180, 90, 200]
ANGLE_EMB = torch.tensor([unit(a) for a in ANGLES])
ANGLE_LABELS = torch.tensor([0, 0, 1, 1, 2, 2])


def test_hard_miner_picks_nearest_negative():
    a1, p, a2, n = HardNegativePairMiner(neg_count=1)(ANGLE_EMB, ANGLE_LABELS)
    assert pair_set(a1, p) == {(0, 1), (1, 0), (2, 3), (3, 2), (4, 5), (5, 4)}
    # 0deg->30deg, 10->30, 30->10, 180->200, 90->30, 200->180
    assert pair_set(a2, n) == {(0, 2), (1, 2), (2, 1), (3, 5), (4, 2), (5, 3)}
    assert len(a2) == 6


def test_hard_miner_two_nearest_and_more_than_available():
    _, _, a2, n = HardNegativePairMiner(neg_count=2)(ANGLE_EMB, ANGLE_LABELS)
    got = pair_set(a2, n)
    # anchor 0 (0deg): negatives at 30 (idx 2) and 90 (idx 4) are the two nearest
    assert {m for a, m in got if a == 0} == {2, 4}
    # anchor 3 (180deg): 200 (idx 5) then 90 (idx 4)
    assert {m for a, m in got if a == 3} == {5, 4}
    _, _, a2, n = HardNegativePairMiner(neg_count=10)(ANGLE_EMB, ANGLE_LABELS)
    all_neg = pair_set(*lmu.get_all_pairs_indices(ANGLE_LABELS)[2:])
    assert pair_set(a2, n) == all_neg and len(a2) == len(all_neg) == 24


def test_random_miner_true_negatives_and_counts():
    emb, labels = random_batch(clients=4, views=5)
    torch.manual_seed(3)
    a1, p, a2, n = RandomNegativePairMiner(neg_count=3)(emb, labels)
    assert len(a1) == 4 * 5 * 4 and (labels[a1] == labels[p]).all() and (a1 != p).all()
    assert (labels[a2] != labels[n]).all()
    assert torch.bincount(a2, minlength=20).tolist() == [3] * 20
    assert len(pair_set(a2, n)) == 60  # distinct negatives per anchor
    torch.manual_seed(3)
    again = RandomNegativePairMiner(neg_count=3)(emb, labels)
    assert torch.equal(again[3], n)
    seen = set()
    for seed in range(30):
        torch.manual_seed(seed)
        seen |= pair_set(*RandomNegativePairMiner(neg_count=3)(emb, labels)[2:])
    assert len(seen) > 200  # 300 negative pairs exist; a fixed choice would give 60


def test_random_miner_caps_at_available_negatives_and_uses_generator():
    miner = RandomNegativePairMiner(neg_count=5, generator=torch.Generator().manual_seed(0))
    _, _, a2, n = miner(HAND_EMB, HAND_LABELS)
    assert pair_set(a2, n) == {(0, 2), (0, 3), (1, 2), (1, 3), (2, 0), (2, 1), (3, 0), (3, 1)}


def test_binomial_deviance_by_hand():
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    loss = make_loss("binomial_deviance", "all")(emb, HAND_LABELS)
    alpha, beta, c = 2.0, 0.5, 25.0
    pos_s = [0.6, 0.0]  # s01, s23 (each listed twice: same mean)
    neg_s = [0.0, -1.0, 0.8, -0.6]  # s02, s03, s12, s13
    pos = sum(math.log1p(math.exp(-alpha * (s - beta))) for s in pos_s) / 2
    neg = sum(math.log1p(math.exp(alpha * c * (s - beta))) for s in neg_s) / 4
    assert loss.item() == pytest.approx(pos + neg, rel=1e-5)
    # scale invariance: cosine similarity ignores the norm
    assert BinomialDevianceLoss()(3 * emb, HAND_LABELS).item() == pytest.approx(pos + neg, rel=1e-5)


def test_triplet_hard_k1_by_hand():
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    loss = make_loss("triplet", "hard", neg_count=1)(emb, HAND_LABELS)
    d01, d23, d12, d13 = math.sqrt(0.8), math.sqrt(2.0), math.sqrt(0.4), math.sqrt(3.2)
    # nearest negatives: 0->2, 1->2, 2->1, 3->1; triplets (0,1,2) (1,0,2) (2,3,1) (3,2,1)
    margins = [d01 - math.sqrt(2.0) + 0.2, d01 - d12 + 0.2, d23 - d12 + 0.2, d23 - d13 + 0.2]
    positive = [m for m in margins if m > 0]
    assert len(positive) == 2  # the case really exercises the non-zero averaging
    assert loss.item() == pytest.approx(sum(positive) / len(positive), rel=1e-5)


def test_pairs_to_triplets_matches_pml():
    emb, labels = random_batch(clients=5, views=3)
    for pairs in (HardNegativePairMiner(2)(emb, labels), lmu.get_all_pairs_indices(labels)):
        ours = pairs_to_triplets(pairs)
        theirs = lmu.convert_to_triplets(pairs, labels)
        as_set = lambda t: sorted(zip(*(x.tolist() for x in t)))  # noqa: E731
        assert as_set(ours) == as_set(theirs) and len(ours[0]) > 0


# ----------------------------------------------------------------------------- histogram


def test_histogram_lower_for_separated_than_mixed():
    labels = torch.arange(4).repeat_interleave(5)
    g = torch.Generator().manual_seed(1)
    centres = torch.eye(8)[:4]
    separated = F.normalize(centres[labels] + 0.05 * torch.randn(20, 8, generator=g), dim=1)
    mixed = F.normalize(torch.randn(20, 8, generator=g), dim=1)
    loss = make_loss("histogram")
    sep, mix = loss(separated, labels).item(), loss(mixed, labels).item()
    assert sep < 0.05 < mix


def test_histogram_matches_pml_and_survives_identical_views():
    emb, labels = random_batch(clients=4, views=3)
    ours = AllPairsHistogramLoss(n_bins=50)(emb, labels)
    theirs = pml_losses.HistogramLoss(n_bins=50)(emb, labels)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], requires_grad=True)
    loss = make_loss("histogram")(same, HAND_LABELS)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- distance weighted


def test_distance_weighted_keeps_anchors_pml_would_drop():
    # 64-D, clustered classes; one antipodal cross-class pair inflates PML's global max
    torch.manual_seed(0)
    labels = torch.arange(6).repeat_interleave(5)
    centres = F.normalize(torch.randn(6, 64), dim=1)
    emb = F.normalize(centres[labels] + 0.03 * torch.randn(30, 64), dim=1)
    emb[29] = -emb[0] + 0.005 * torch.randn(64)  # distance just under 2, not exactly 2
    emb = F.normalize(emb, dim=1)
    a, p, n = StableDistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4)(emb, labels)
    assert len(a) > 0 and (labels[a] == labels[p]).all() and (labels[a] != labels[n]).all()
    dist = torch.cdist(emb, emb)
    assert (dist[a, n] < 1.4).all()
    has_eligible = ((dist < 1.4) & (labels[:, None] != labels[None])).any(dim=1)
    assert set(a.tolist()) == set(torch.where(has_eligible)[0].tolist())
    pml_a, _, _ = pml_miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4)(emb, labels)
    assert len(set(pml_a.tolist())) < len(set(a.tolist()))


def test_distance_weighted_prefers_close_negatives():
    # anchor class 0 at 0deg/5deg; negative class 1 at 40deg (close) vs class 2 at 80deg (far)
    emb = torch.tensor([unit(a) for a in [0, 5, 40, 45, 80, 85]])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    torch.manual_seed(0)
    counts = torch.zeros(6)
    for _ in range(200):
        a, _, n = make_miner("distance_weighted")(emb, labels)
        counts += torch.bincount(n[labels[a] == 0], minlength=6)
    assert counts[2:4].sum() > counts[4:6].sum() > 0


# ----------------------------------------------------------------------------- factory


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("miner", MINERS)
def test_every_combination_is_finite_and_differentiable(name, miner):
    torch.manual_seed(0)
    raw, labels = random_batch()
    raw.requires_grad_(True)
    loss = make_loss(name, miner)(F.normalize(raw, dim=1), labels)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(raw.grad).all() and raw.grad.abs().sum() > 0


def test_unknown_names_list_valid_choices():
    with pytest.raises(ValueError, match="contrastive, triplet, margin, binomial_deviance, histogram"):
        make_loss("arcface")
    with pytest.raises(ValueError, match="hard, random, distance_weighted, all"):
        make_loss("contrastive", miner="semihard")
    with pytest.raises(ValueError, match="margin"):
        make_loss("histogram", margin=0.3)
    with pytest.raises(ValueError, match="neg_count"):
        make_loss("contrastive", neg_count=0)


def test_margin_and_kwargs_reach_the_loss():
    assert make_loss("contrastive", margin=0.7).loss.margin == 0.7
    assert make_loss("triplet").loss.margin == 0.2
    assert make_loss("binomial_deviance", C=10.0).loss.C == 10.0
    assert make_loss("contrastive", "random", neg_count=3).miner.neg_count == 3
    assert make_loss("histogram", "random").miner is None


def recall_at_1(emb, labels):
    dist = torch.cdist(emb, emb)
    dist.fill_diagonal_(float("inf"))
    return (labels[dist.argmin(dim=1)] == labels).float().mean().item()


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("miner", ["hard", "distance_weighted"])
def test_training_an_embedding_table_separates_clients(name, miner):
    torch.manual_seed(0)
    labels = torch.arange(8).repeat_interleave(5)
    table = torch.nn.Parameter(torch.randn(40, 8))
    loss_fn = make_loss(name, miner)
    opt = torch.optim.Adam([table], lr=0.05)
    before = recall_at_1(F.normalize(table.detach(), dim=1), labels)
    for _ in range(50):
        opt.zero_grad()
        loss_fn(F.normalize(table, dim=1), labels).backward()
        opt.step()
    after = recall_at_1(F.normalize(table.detach(), dim=1), labels)
    # chance is 4/39; binomial deviance (C = 25) moves slowest, reaching ~0.85 in 50 steps
    assert before < 0.3 and after >= 0.8
