"""Recall@K, CIRR and FashionIQ metrics: hand-computed cases, brute-force references and the
cir.md §4 fixture with the official CLIP4Cir / PLI values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from retrieval_reference import cirr_recall, fashioniq_recall, recall_at_k
from xmodal.metrics.retrieval import (
    cirr_recall_from_embeddings,
    fashioniq_average,
    image_text_recall,
    positive_ranks,
    recall_from_embeddings,
)

# ----------------------------------------------------------------------------- references


def stable_order(scores: torch.Tensor, largest: bool = True) -> torch.Tensor:
    """Full ranking by the documented tie rule (stable sort: ties keep ascending index)."""
    return scores.sort(dim=1, descending=largest, stable=True).indices


def brute_recall(scores, positives, ks, largest=True):
    """Full-argsort Recall@k: hit if any positive is among the first k of the ranking."""
    hits = positives.gather(1, stable_order(scores, largest))
    return {k: hits[:, :k].any(dim=1).double().mean().item() for k in ks}


def clip_benchmark_recall(scores, positives, ks):
    """CLIP_benchmark's recall: ``scores.topk(max_k)`` then look positives up (tie-free input)."""
    top = scores.topk(max(ks), dim=1).indices
    hits = positives.gather(1, top)
    return {k: hits[:, :k].any(dim=1).double().mean().item() for k in ks}


def brute_cirr(
    scores, target, reference, members, ks=(1, 5, 10, 50), subset_ks=(1, 2, 3), largest=True
):
    """CLIP4Cir's procedure: sort the row, delete the reference, keep member names in order."""
    out_rank, out_subset = [], []
    for i, row in enumerate(stable_order(scores, largest).tolist()):
        ranking = [j for j in row if j != reference[i]]
        group = set(members[i].tolist())
        subset = [j for j in ranking if j in group]
        assert ranking.count(int(target[i])) == 1 and subset.count(int(target[i])) == 1
        out_rank.append(ranking.index(int(target[i])))
        out_subset.append(subset.index(int(target[i])))
    res = {f"R@{k}": sum(r < k for r in out_rank) / len(out_rank) for k in ks}
    res.update({f"Rs@{k}": sum(r < k for r in out_subset) / len(out_subset) for k in subset_ks})
    return res


def tied_scores(q: int, g: int, seed: int = 0) -> torch.Tensor:
    """Scores on a coarse grid: many exact ties."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (q, g), generator=gen).float() / 4


def cir_problem(q: int, g: int, m: int, seed: int = 0):
    """Random targets, references (never the target) and groups containing both."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, g, (q,), generator=gen)
    reference = (target + torch.randint(1, g, (q,), generator=gen)) % g
    others = torch.randint(0, g, (q, m - 2), generator=gen)  # may repeat / hit target or reference
    members = torch.cat([reference[:, None], others[:, :1], target[:, None], others[:, 1:]], dim=1)
    return target, reference, members


# ----------------------------------------------------------------------------- Recall@K


HAND_SCORES = torch.tensor(
    [
        [0.9, 0.1, 0.5, 0.3],  # order 0, 2, 3, 1
        [0.2, 0.8, 0.7, 0.1],  # order 1, 2, 0, 3
        [0.3, 0.3, 0.3, 0.3],  # all tied: order 0, 1, 2, 3
        [0.6, 0.4, 0.2, 0.0],  # no positive
    ]
)
HAND_POSITIVES = torch.tensor(
    [
        [False, False, True, False],  # first positive at rank 1
        [True, False, False, True],  # two positives, first at rank 2
        [False, False, True, False],  # tie: index 2 comes after 0 and 1, rank 2
        [False, False, False, False],
    ]
)


def test_recall_at_k_hand_computed():
    assert positive_ranks(HAND_SCORES, HAND_POSITIVES, 4).tolist() == [1, 2, 2, 4]
    # Hits: R@1 none; R@2 query 0; R@3 queries 0, 1, 2; the no-positive query is always a miss.
    assert recall_at_k(HAND_SCORES, HAND_POSITIVES, ks=(1, 2, 3, 4)) == {
        1: 0.0,
        2: 0.25,
        3: 0.75,
        4: 0.75,
    }
    # A k beyond the gallery size means "the whole gallery".
    assert recall_at_k(HAND_SCORES, HAND_POSITIVES, ks=(1, 10)) == {1: 0.0, 10: 0.75}


@pytest.mark.parametrize("seed", range(3))
def test_recall_at_k_matches_references(seed):
    gen = torch.Generator().manual_seed(seed)
    positives = torch.rand(30, 40, generator=gen) < 0.05  # some rows have none, some several
    scores = torch.randn(30, 40, generator=gen)
    ks = (1, 5, 10)
    assert recall_at_k(scores, positives, ks) == clip_benchmark_recall(scores, positives, ks)
    tied = tied_scores(30, 40, seed)
    assert recall_at_k(tied, positives, ks) == brute_recall(tied, positives, ks)


def caption_problem(seed: int = 0):
    """Images with 0-3 captions each (image 1 has none: an i2t query without positive)."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 4, (15,), generator=gen)
    counts[1] = 0
    caption_image = torch.repeat_interleave(torch.arange(15), counts)
    images = F.normalize(torch.randn(15, 8, generator=gen), dim=1)
    texts = F.normalize(images[caption_image] + 0.8 * torch.randn(len(caption_image), 8), dim=1)
    return images, texts, caption_image


@pytest.mark.parametrize("chunk_size,gallery_chunk_size", [(1, 1), (4, 3), (7, 16), (100, 100)])
def test_recall_from_embeddings_equals_dense(chunk_size, gallery_chunk_size):
    images, texts, caption_image = caption_problem()
    truth = caption_image[:, None] == torch.arange(15)[None]  # [T, I]
    ks = (1, 5, 10)
    opts = dict(chunk_size=chunk_size, gallery_chunk_size=gallery_chunk_size)
    t2i = recall_from_embeddings(texts, images, caption_image, torch.arange(15), ks, **opts)
    i2t = recall_from_embeddings(images, texts, torch.arange(15), caption_image, ks, **opts)
    assert t2i == recall_at_k(texts @ images.T, truth, ks)
    assert i2t == recall_at_k(images @ texts.T, truth.T, ks)
    assert i2t[10] < 1.0  # image 1 has no caption: always a miss
    both = image_text_recall(images, texts, caption_image, ks, chunk_size=chunk_size)
    assert both == {**{f"t2i/R@{k}": t2i[k] for k in ks}, **{f"i2t/R@{k}": i2t[k] for k in ks}}


def test_recall_from_embeddings_with_ties_and_distances():
    gen = torch.Generator().manual_seed(2)
    queries = torch.randint(-1, 2, (20, 3), generator=gen).float()
    gallery = torch.randint(-1, 2, (25, 3), generator=gen).float()
    q_labels, g_labels = torch.randint(0, 6, (20,)), torch.randint(0, 6, (25,))
    truth = q_labels[:, None] == g_labels[None]
    ks = (1, 3, 10)
    got = recall_from_embeddings(queries, gallery, q_labels, g_labels, ks, chunk_size=3)
    assert got == brute_recall(queries @ gallery.T, truth, ks)

    def sq_dist(q, g):
        return torch.cdist(q, g).pow(2).round()

    got = recall_from_embeddings(
        queries, gallery, q_labels, g_labels, ks, chunk_size=6, score_fn=sq_dist, largest=False
    )
    assert got == brute_recall(sq_dist(queries, gallery), truth, ks, largest=False)


# ----------------------------------------------------------------------------- CIRR


def test_cirr_hand_computed():
    # Gallery of 6; query 0: order 3, 0, 1, 4, 2, 5 with reference 3 removed -> 0, 1, 4, 2, 5.
    scores = torch.tensor(
        [
            [0.8, 0.7, 0.2, 0.9, 0.5, 0.1],
            [0.4, 0.4, 0.4, 0.4, 0.4, 0.4],  # all tied: order by index
        ]
    )
    target = torch.tensor([4, 2])
    reference = torch.tensor([3, 0])
    members = torch.tensor([[3, 0, 4, 2, 2, 5], [0, 5, 2, 4, 1, 3]])  # row 0 repeats member 2
    res = cirr_recall(scores, target, reference, members, ks=(1, 2, 3, 5), subset_ks=(1, 2, 3))
    # Full ranks: query 0 -> target 4 at rank 2; query 1 -> 1, 2 (after removing 0) -> rank 1.
    # Subset (reference removed, duplicates once): query 0 -> 0, 4, 2, 5 -> rank 1;
    # query 1 -> 1, 2, 3, 4, 5 -> rank 1.
    assert res == {
        "R@1": 0.0,
        "R@2": 0.5,
        "R@3": 1.0,
        "R@5": 1.0,
        "Rs@1": 0.0,
        "Rs@2": 1.0,
        "Rs@3": 1.0,
    }


@pytest.mark.parametrize("seed", range(3))
def test_cirr_matches_clip4cir_procedure(seed):
    for scores in (
        torch.randn(40, 60, generator=torch.Generator().manual_seed(seed)),
        tied_scores(40, 60, seed),
    ):
        target, reference, members = cir_problem(40, 60, 6, seed)
        ks, subset_ks = (1, 5, 10, 50), (1, 2, 3)
        expected = brute_cirr(scores, target, reference, members, ks, subset_ks)
        assert cirr_recall(scores, target, reference, members, ks, subset_ks) == expected


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_cirr_from_embeddings_equals_dense(chunk_size):
    gen = torch.Generator().manual_seed(4)
    queries = torch.randint(-1, 2, (30, 4), generator=gen).float()  # tied scores
    gallery = torch.randint(-1, 2, (55, 4), generator=gen).float()
    target, reference, members = cir_problem(30, 55, 6, seed=4)
    dense = cirr_recall(queries @ gallery.T, target, reference, members)
    emb = cirr_recall_from_embeddings(
        queries, gallery, target, reference, members, chunk_size=chunk_size
    )
    assert emb == dense

    def sq_dist(q, g):
        return torch.cdist(q, g).pow(2).round()

    dist = cirr_recall_from_embeddings(
        queries, gallery, target, reference, members, score_fn=sq_dist, largest=False
    )
    assert dist == cirr_recall(sq_dist(queries, gallery), target, reference, members, largest=False)


def test_cirr_rejects_inconsistent_groups():
    scores = torch.randn(2, 8)
    members = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]])
    with pytest.raises(ValueError, match="reference equals its target"):
        cirr_recall(scores, torch.tensor([1, 2]), torch.tensor([1, 0]), members)
    with pytest.raises(ValueError, match="group members"):
        cirr_recall(scores, torch.tensor([1, 7]), torch.tensor([0, 0]), members)


# ----------------------------------------------------------------------------- FashionIQ


def test_fashioniq_hand_computed():
    scores = torch.tensor(
        [
            [0.9, 0.8, 0.7, 0.6],  # target 2 at rank 2; reference 0 removed -> rank 1
            [0.1, 0.2, 0.3, 0.4],  # target 3 at rank 0
        ]
    )
    target, reference = torch.tensor([2, 3]), torch.tensor([0, 1])
    assert fashioniq_recall(scores, target, ks=(1, 2)) == {"R@1": 0.5, "R@2": 0.5}
    assert fashioniq_recall(scores, target, reference, ks=(1, 2)) == {"R@1": 0.5, "R@2": 1.0}
    # Distances ranked ascending give the same numbers as negated similarities.
    assert fashioniq_recall(-scores, target, reference, ks=(1, 2), largest=False) == {
        "R@1": 0.5,
        "R@2": 1.0,
    }


def test_fashioniq_average():
    per_cat = {
        "dress": {"R@10": 0.20, "R@50": 0.40},
        "shirt": {"R@10": 0.30, "R@50": 0.50},
        "toptee": {"R@10": 0.40, "R@50": 0.90},
    }
    res = fashioniq_average(per_cat)
    assert res["dress/R@50"] == 0.40
    assert res["avg/R@10"] == pytest.approx(0.30)
    assert res["avg/R@50"] == pytest.approx(0.60)
    assert res["avg"] == pytest.approx(0.45)


# ----------------------------------------------------------------------------- cir.md §4 fixture


def cir_fixture():
    """cir.md §4: G=64, Q=20, d=8, float32; indices stand for the names img00..img63."""
    idx = torch.sin(0.7 * torch.arange(512, dtype=torch.float32) + 0.1).reshape(64, 8)
    pred = F.normalize(
        torch.cos(0.3 * torch.arange(160, dtype=torch.float32)).reshape(20, 8), dim=-1
    )
    i = torch.arange(20)
    target, reference = (7 * i + 3) % 64, (11 * i + 5) % 64
    members = []
    for q in range(20):
        t, r = int(target[q]), int(reference[q])
        candidates = [(13 * q + 17 + 4 * k) % 64 for k in range(8)]
        o = [c for c in candidates if c not in (t, r)][:4]
        members.append([r, o[0], t, o[1], o[2], o[3]])
    return pred, F.normalize(idx, dim=-1), target, reference, torch.tensor(members)


def test_cir_fixture_reproduces_official_values():
    pred, gallery, target, reference, members = cir_fixture()
    sim = pred @ gallery.T
    # CLIP4Cir FIQ, protocol A (reference kept), percent in the spec.
    assert fashioniq_recall(sim, target) == {"R@10": 10.0 / 100, "R@50": 75.0 / 100}
    # Reference masked (protocol A' / PLI): R@50 moves from 75 to 80.
    pli = fashioniq_recall(sim, target, reference, ks=(1, 5, 10, 50))
    assert pli == {"R@1": 0.0, "R@5": 0.05, "R@10": 0.10, "R@50": 0.80}
    # CLIP4Cir CIRR (reference removed).
    expected = {
        "R@1": 0.0,
        "R@5": 5.0,
        "R@10": 10.0,
        "R@50": 80.0,
        "Rs@1": 10.0,
        "Rs@2": 35.0,
        "Rs@3": 65.0,
    }
    expected = {k: v / 100 for k, v in expected.items()}
    assert cirr_recall(sim, target, reference, members) == expected
    assert cirr_recall_from_embeddings(pred, gallery, target, reference, members) == expected
    # CLIP4Cir sorts the distances 1 - sim ascending; the reference procedure agrees.
    assert brute_cirr(1 - sim, target, reference, members, largest=False) == expected
