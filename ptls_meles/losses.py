"""Metric-learning losses and pair/triplet miners for MeLES, selectable by name.

Everything follows the pytorch-metric-learning (PML) shape: a miner maps
``(embeddings [N, D], labels [N])`` to an ``indices_tuple`` -- pairs
``(a1, p, a2, n)`` or triplets ``(a, p, n)`` -- and a loss maps
``(embeddings, labels, indices_tuple)`` to a scalar. PML supplies the triplet,
margin and histogram losses and the distance-weighted sampling; own code covers
what PML lacks: per-anchor k-hardest / k-random negatives, the squared-hinge
contrastive loss of MeLES and the binomial deviance loss.

Conventions: positive pairs are ordered (both ``(i, j)`` and ``(j, i)`` are
listed), as in PML, so every view serves as an anchor. ``make_loss`` builds a
module ``loss(embeddings, labels) -> scalar`` that mines, then scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from .config import CHOICES

LOSSES = CHOICES["loss"]
MINERS = CHOICES["miner"]

IndicesTuple = tuple[torch.Tensor, ...]


class UnknownChoiceError(ValueError):
    """A loss or miner name that is not one of the valid choices."""


# ----------------------------------------------------------------------------- miners


def _k_best_negatives(scores: torch.Tensor, negative_mask: torch.Tensor, k: int) -> IndicesTuple:
    """Per row, the ``k`` negatives with the smallest score -> (anchor, negative) pairs.

    Rows with fewer than ``k`` negatives contribute all they have.
    """
    k = min(int(k), scores.size(1))
    if k <= 0:
        empty = torch.empty(0, dtype=torch.long, device=scores.device)
        return empty, empty.clone()
    scores = scores.masked_fill(~negative_mask, float("inf"))
    _, cols = torch.topk(scores, k, dim=1, largest=False)
    chosen_is_negative = torch.gather(negative_mask, 1, cols)
    rows = torch.arange(scores.size(0), device=scores.device).unsqueeze(1).expand_as(cols)
    return rows[chosen_is_negative], cols[chosen_is_negative]


class _PerAnchorNegativePairMiner(pml_miners.BaseMiner):
    """All positive pairs plus ``neg_count`` negatives per anchor, chosen by a score."""

    def __init__(self, neg_count: int = 5, **kwargs):
        super().__init__(**kwargs)
        if int(neg_count) < 1:
            raise ValueError(f"neg_count must be >= 1, got {neg_count!r} (example: 5)")
        self.neg_count = int(neg_count)

    def negative_scores(self, embeddings, ref_emb) -> torch.Tensor:
        raise NotImplementedError

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        matches, diffs = lmu.get_matches_and_diffs(labels, ref_labels)
        a1, p = torch.where(matches.bool())
        scores = self.negative_scores(embeddings, ref_emb)
        a2, n = _k_best_negatives(scores, diffs.bool(), self.neg_count)
        return a1, p, a2, n


class HardNegativePairMiner(_PerAnchorNegativePairMiner):
    """All positive pairs + each anchor's ``neg_count`` nearest negatives (MeLES default).

    Nearness uses ``self.distance``: by default plain Euclidean on the embeddings as
    given (as in ptls, and the metric of the contrastive loss); for an inverted
    distance such as cosine similarity the most similar negatives are taken.
    """

    def get_default_distance(self):
        return LpDistance(normalize_embeddings=False)

    def negative_scores(self, embeddings, ref_emb):
        mat = self.distance(embeddings, ref_emb)
        return -mat if self.distance.is_inverted else mat


class RandomNegativePairMiner(_PerAnchorNegativePairMiner):
    """All positive pairs + ``neg_count`` distinct random negatives per anchor.

    Draws from ``generator`` when given, else from the global torch RNG, so
    ``torch.manual_seed`` makes it reproducible.
    """

    def __init__(self, neg_count: int = 5, generator: torch.Generator | None = None, **kwargs):
        super().__init__(neg_count=neg_count, **kwargs)
        self.generator = generator

    def negative_scores(self, embeddings, ref_emb):
        shape = (embeddings.size(0), ref_emb.size(0))
        device = self.generator.device if self.generator is not None else embeddings.device
        return torch.rand(shape, generator=self.generator, device=device).to(embeddings.device)


class AllPairsMiner(pml_miners.BaseMiner):
    """Every positive and every negative pair of the batch."""

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        return lmu.get_all_pairs_indices(labels, ref_labels)


class StableDistanceWeightedMiner(pml_miners.DistanceWeightedMiner):
    """PML's distance-weighted sampling (Wu et al. 2017) with a per-anchor normalisation.

    PML subtracts one global maximum of the log-weights, which includes entries that
    are later zeroed (distances near 2 or above ``nonzero_loss_cutoff``); in high
    dimension that underflows whole rows to 0/0 and silently drops their anchors.
    Here the weights are a softmax over each anchor's eligible negatives, computed in
    float64. Returns triplets ``(a, p, n)``: one weighted negative per (anchor, positive).
    """

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        dim = float(embeddings.size(1))
        mat = self.distance(embeddings, ref_emb).double().clamp(min=self.cutoff)
        log_weights = (2.0 - dim) * torch.log(mat) - ((dim - 3.0) / 2.0) * torch.log(
            (1.0 - 0.25 * mat.pow(2)).clamp(min=1e-12)
        )
        negative = labels.unsqueeze(1) != ref_labels.unsqueeze(0)
        eligible = negative & (mat < self.nonzero_loss_cutoff) & torch.isfinite(log_weights)
        log_weights = log_weights.masked_fill(~eligible, float("-inf"))
        weights = torch.softmax(log_weights, dim=1)
        weights = torch.where(eligible, weights, torch.zeros_like(weights))  # all--inf rows give NaN
        return lmu.get_random_triplet_indices(labels, ref_labels=ref_labels, weights=weights.float())


# ----------------------------------------------------------------------------- index helpers


def pairs_to_triplets(indices_tuple: IndicesTuple) -> IndicesTuple:
    """(a1, p, a2, n) -> every (a, p, n) whose positive and negative pair share the anchor.

    Same set as PML's ``convert_to_triplets`` but without its [P, Q] comparison matrix,
    so the ``all`` miner on a few hundred views stays cheap.
    """
    a1, p, a2, n = indices_tuple
    device = a1.device
    if len(a1) == 0 or len(a2) == 0:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty.clone(), empty.clone()
    size = int(max(a1.max(), a2.max())) + 1
    order = torch.argsort(a2, stable=True)
    negatives_sorted = n[order]
    neg_counts = torch.bincount(a2, minlength=size)
    neg_starts = torch.cumsum(neg_counts, 0) - neg_counts
    repeats = neg_counts[a1]
    anchors = torch.repeat_interleave(a1, repeats)
    positives = torch.repeat_interleave(p, repeats)
    group_starts = torch.cumsum(repeats, 0) - repeats
    within = torch.arange(int(repeats.sum()), device=device) - torch.repeat_interleave(group_starts, repeats)
    negatives = negatives_sorted[torch.repeat_interleave(neg_starts[a1], repeats) + within]
    return anchors, positives, negatives


def _zero_with_grad(embeddings: torch.Tensor) -> torch.Tensor:
    """A 0 that keeps the graph, for batches with nothing to score."""
    return (embeddings * 0).sum()


# ----------------------------------------------------------------------------- own losses


def _squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[N, M] squared Euclidean distances; one matmul instead of gathering rows per pair."""
    sq = x.pow(2).sum(dim=1, keepdim=True) + y.pow(2).sum(dim=1).unsqueeze(0) - 2.0 * x @ y.T
    return sq.clamp(min=0.0)


class SquaredHingeContrastiveLoss(pml_losses.BaseMetricLossFunction):
    """MeLES / ptls contrastive loss with Euclidean distance d on the given embeddings.

    positive pair: d^2; negative pair: relu(margin - d)^2; averaged over all mined
    pairs together (ptls sums; with Adam the scale hardly matters). PML's
    ContrastiveLoss cannot express the squared hinge, hence own code.
    """

    def __init__(self, margin: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.margin = float(margin)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        a1, p, a2, n = lmu.convert_to_pairs(indices_tuple, labels, ref_labels)
        if len(a1) + len(a2) == 0:
            return self.zero_losses()
        sq = _squared_distances(embeddings, ref_emb)
        pos_sq = sq[a1, p]
        neg_dist = torch.sqrt(sq[a2, n].clamp(min=1e-12))  # clamp: finite gradient at d = 0
        per_pair = torch.cat([pos_sq, F.relu(self.margin - neg_dist).pow(2)])
        return {"loss": {"losses": per_pair.mean(), "indices": None, "reduction_type": "already_reduced"}}


class BinomialDevianceLoss(pml_losses.BaseMetricLossFunction):
    """Binomial deviance on cosine similarity s (Yi et al. 2014, as used by Ustinova 2016).

    positive: log(1 + exp(-alpha (s - beta))); negative: log(1 + exp(alpha C (s - beta))),
    C weighting the (many more) negatives. Positive and negative terms are averaged
    separately, then summed.
    """

    def __init__(self, alpha: float = 2.0, beta: float = 0.5, C: float = 25.0, **kwargs):
        super().__init__(**kwargs)
        self.alpha, self.beta, self.C = float(alpha), float(beta), float(C)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        a1, p, a2, n = lmu.convert_to_pairs(indices_tuple, labels, ref_labels)
        if len(a1) + len(a2) == 0:
            return self.zero_losses()
        sim = F.normalize(embeddings, dim=1) @ F.normalize(ref_emb, dim=1).T
        loss = _zero_with_grad(embeddings)
        if len(a1) > 0:
            pos_sim = sim[a1, p]
            loss = loss + F.softplus(-self.alpha * (pos_sim - self.beta)).mean()
        if len(a2) > 0:
            neg_sim = sim[a2, n]
            loss = loss + F.softplus(self.alpha * self.C * (neg_sim - self.beta)).mean()
        return {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}


class AllPairsHistogramLoss(pml_losses.HistogramLoss):
    """PML's HistogramLoss (Ustinova & Lempitsky 2016) over all unordered pairs.

    Always uses every pair of the batch (the method estimates the full positive and
    negative similarity distributions), so any ``indices_tuple`` is ignored. Builds
    the pairs from the upper triangle instead of PML's all-triplets tensor, and
    keeps similarities strictly inside (-1, 1): identical views (s = 1) would
    otherwise index past the last histogram node.
    """

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if not self.distance.is_inverted:
            raise ValueError(
                f"histogram loss needs a similarity in [-1, 1], got distance {type(self.distance).__name__}"
                " (example: CosineSimilarity())"
            )
        same = labels.unsqueeze(1) == labels.unsqueeze(0)
        upper = torch.ones_like(same).triu(diagonal=1)
        pos_i, pos_j = torch.where(same & upper)
        neg_i, neg_j = torch.where(~same & upper)
        if len(pos_i) == 0 or len(neg_i) == 0:
            return self.zero_losses()
        mat = self.distance(embeddings, embeddings)
        eps = self.delta * 1e-3
        mat = mat.clamp(-1.0 + eps, 1.0 - eps)
        phi = torch.cumsum(self.compute_density(mat[pos_i, pos_j]), dim=0)
        p_neg = self.compute_density(mat[neg_i, neg_j])
        return {"loss": {"losses": torch.sum(p_neg * phi), "indices": None, "reduction_type": "already_reduced"}}


class InfoNCELoss(torch.nn.Module):
    """InfoNCE / NT-Xent over the whole batch in a few matrix operations.

    For every ordered positive pair ``(a, p)``: ``−s_ap + log(exp(s_ap) + Σ_n exp(s_an))``
    with ``s = cos / temperature`` and ``n`` over every view of another client, averaged
    over the pairs — the same value as PML's ``NTXentLoss`` (which builds it pair by pair
    and was measured ~10× slower than the whole GRU step on a 320-view batch on CPU).
    ``indices_tuple`` is ignored: every pair of the batch is used.
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, indices_tuple=None) -> torch.Tensor:
        emb = F.normalize(embeddings, dim=1)
        sim = emb @ emb.T / self.temperature
        same = labels.unsqueeze(0) == labels.unsqueeze(1)
        positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        if not bool(positive.any()) or bool(same.all()):
            return _zero_with_grad(embeddings)
        negatives_lse = torch.logsumexp(sim.masked_fill(same, float("-inf")), dim=1, keepdim=True)  # [N, 1]
        per_pair = torch.logaddexp(sim, negatives_lse) - sim
        return per_pair[positive].mean()


# ----------------------------------------------------------------------------- factory


class MinedLoss(torch.nn.Module):
    """``loss(embeddings, labels)``: mine an indices tuple, then score it with a PML-shaped loss."""

    def __init__(self, loss: torch.nn.Module, miner: torch.nn.Module | None, wants_triplets: bool):
        super().__init__()
        self.loss = loss
        self.miner = miner
        self.wants_triplets = wants_triplets

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        indices = None
        if self.miner is not None:
            indices = self.miner(embeddings, labels)
            if self.wants_triplets and len(indices) == 4:
                indices = pairs_to_triplets(indices)
        return self.loss(embeddings, labels, indices)


def _check_choice(kind: str, name: str, valid: tuple[str, ...]) -> None:
    if name not in valid:
        raise UnknownChoiceError(f"unknown {kind} {name!r}; valid names: {', '.join(valid)}")


def make_miner(name: str = "hard", neg_count: int = 5, **kwargs) -> torch.nn.Module:
    """A miner by name: ``hard`` | ``random`` (``neg_count`` negatives per anchor),
    ``distance_weighted`` (kwargs: ``cutoff`` = 0.5, ``nonzero_loss_cutoff`` = 1.4) | ``all``."""
    _check_choice("miner", name, MINERS)
    if name == "hard":
        return HardNegativePairMiner(neg_count=neg_count, **kwargs)
    if name == "random":
        return RandomNegativePairMiner(neg_count=neg_count, **kwargs)
    if name == "distance_weighted":
        kwargs = {"cutoff": 0.5, "nonzero_loss_cutoff": 1.4, **kwargs}
        return StableDistanceWeightedMiner(**kwargs)
    return AllPairsMiner(**kwargs)


def make_loss(
    name: str,
    miner: str = "hard",
    margin: float | None = None,
    neg_count: int = 5,
    miner_kwargs: dict | None = None,
    **kwargs,
) -> torch.nn.Module:
    """Loss module ``loss(embeddings [N, D], labels [N]) -> scalar`` by name.

    ``margin`` goes to contrastive (default 0.5), triplet (0.2) and margin (0.2) losses;
    giving it for binomial_deviance or histogram is an error. ``kwargs`` go to the
    loss (e.g. ``alpha``, ``beta``, ``C``, ``n_bins``), ``miner_kwargs`` to the miner.
    The histogram and InfoNCE (``temperature``, default 0.1) losses always score all pairs:
    the miner is validated but not used.
    """
    _check_choice("loss", name, LOSSES)
    _check_choice("miner", miner, MINERS)
    if margin is not None and name in ("binomial_deviance", "histogram", "infonce"):
        raise ValueError(f"margin is not a parameter of loss {name!r} (got margin={margin!r}); leave it None")
    if name == "contrastive":
        loss = SquaredHingeContrastiveLoss(margin=0.5 if margin is None else margin, **kwargs)
    elif name == "triplet":
        loss = pml_losses.TripletMarginLoss(margin=0.2 if margin is None else margin, **kwargs)
    elif name == "margin":
        loss = pml_losses.MarginLoss(margin=0.2 if margin is None else margin, **kwargs)
    elif name == "binomial_deviance":
        loss = BinomialDevianceLoss(**kwargs)
    elif name == "infonce":
        loss = InfoNCELoss(**{"temperature": 0.1, **kwargs})
    else:
        loss = AllPairsHistogramLoss(**{"n_bins": 100, **kwargs})
    mining = None if name in ("histogram", "infonce") else make_miner(miner, neg_count=neg_count, **(miner_kwargs or {}))
    return MinedLoss(loss, mining, wants_triplets=name in ("triplet", "margin"))
