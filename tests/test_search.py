"""Exact chunked top-k, target ranks and the faiss backend against brute-force references."""

from __future__ import annotations

import pytest
import torch

from xmodal.retrieval.search import (
    FaissIndex,
    gather_scores,
    rank_of,
    rank_of_scores,
    topk,
    topk_scores,
)


def masked(scores: torch.Tensor, exclude: torch.Tensor | None, largest: bool) -> torch.Tensor:
    """Copy of ``scores`` with the excluded item of each row set to the worst value."""
    scores = scores.clone()
    if exclude is not None:
        rows = (exclude >= 0).nonzero().squeeze(1)
        scores[rows, exclude[rows]] = float("-inf") if largest else float("inf")
    return scores


def brute_order(scores: torch.Tensor, exclude=None, largest: bool = True) -> torch.Tensor:
    """Full ranking by the documented tie rule: stable sort, so ties keep ascending index."""
    return masked(scores, exclude, largest).sort(dim=1, descending=largest, stable=True).indices


def tied_problem(q: int, g: int, d: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Small-integer embeddings: exact float scores with many ties."""
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randint(-1, 2, (q, d), generator=gen).float()
    gallery = torch.randint(-1, 2, (g, d), generator=gen).float()
    return queries, gallery


def neg_sq_dist(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return torch.cdist(q, g).pow(2).round()  # rounded: integer distances, many ties


def test_topk_hand_computed_ties():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.9]])
    values, indices = topk_scores(scores, 3)
    assert indices.tolist() == [[1, 4, 0]]
    assert values[0].tolist() == pytest.approx([0.9, 0.9, 0.5])
    assert topk_scores(scores, 3, largest=False)[1].tolist() == [[3, 0, 2]]
    assert topk_scores(scores, 3, exclude=torch.tensor([1]))[1].tolist() == [[4, 0, 2]]
    # The excluded item ranks last, with the worst value.
    values, indices = topk_scores(scores, 5, exclude=torch.tensor([1]))
    assert indices.tolist() == [[4, 0, 2, 3, 1]]
    assert values[0, -1].item() == float("-inf")
    # A negative exclude entry excludes nothing; the input is never modified.
    assert topk_scores(scores, 2, exclude=torch.tensor([-1]))[1].tolist() == [[1, 4]]
    assert scores[0].tolist() == pytest.approx([0.5, 0.9, 0.5, 0.1, 0.9])


def test_topk_all_equal_rows_take_lowest_indices():
    scores = torch.zeros(3, 50)
    assert topk_scores(scores, 4)[1].tolist() == [[0, 1, 2, 3]] * 3
    assert (
        topk(torch.zeros(3, 2), torch.ones(50, 2), 4, gallery_chunk_size=7)[1].tolist()
        == [[0, 1, 2, 3]] * 3
    )


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 4, 13, 40])
@pytest.mark.parametrize("gallery_chunk_size", [1, 3, 10, 29, 64])
def test_topk_matches_brute_force_with_ties(largest, chunk_size, gallery_chunk_size):
    queries, gallery = tied_problem(13, 29)
    exclude = torch.randint(-1, 29, (13,), generator=torch.Generator().manual_seed(1))
    order = brute_order(queries @ gallery.T, exclude, largest)
    for k in (1, 5, 29):
        values, indices = topk(
            queries,
            gallery,
            k,
            chunk_size=chunk_size,
            gallery_chunk_size=gallery_chunk_size,
            exclude=exclude,
            largest=largest,
        )
        assert torch.equal(indices, order[:, :k])
        assert torch.equal(values, masked(queries @ gallery.T, exclude, largest).gather(1, indices))


@pytest.mark.parametrize("gallery_chunk_size", [2, 7, 100])
def test_topk_custom_distance_ascending(gallery_chunk_size):
    queries, gallery = tied_problem(11, 23, seed=3)
    order = brute_order(neg_sq_dist(queries, gallery), largest=False)
    _, indices = topk(
        queries,
        gallery,
        6,
        chunk_size=4,
        gallery_chunk_size=gallery_chunk_size,
        score_fn=neg_sq_dist,
        largest=False,
    )
    assert torch.equal(indices, order[:, :6])


def test_topk_continuous_matches_torch_topk():
    gen = torch.Generator().manual_seed(0)
    queries, gallery = torch.randn(37, 16, generator=gen), torch.randn(101, 16, generator=gen)
    values, indices = topk(queries, gallery, 10, chunk_size=8, gallery_chunk_size=30)
    ref = (queries @ gallery.T).topk(10)
    assert torch.equal(indices, ref.indices)
    assert torch.allclose(values, ref.values, atol=1e-5)


def test_topk_rejects_bad_arguments():
    q, g = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="k must be"):
        topk(q, g, 6)
    with pytest.raises(ValueError, match="exclude"):
        topk(q, g, 2, exclude=torch.tensor([0, 1]))


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("chunk_size,gallery_chunk_size", [(1, 1), (5, 4), (50, 100)])
def test_rank_of_matches_brute_force(largest, chunk_size, gallery_chunk_size):
    queries, gallery = tied_problem(17, 31, seed=5)
    gen = torch.Generator().manual_seed(6)
    target = torch.randint(0, 31, (17,), generator=gen)
    exclude = (target + torch.randint(1, 31, (17,), generator=gen)) % 31  # never the target
    scores = queries @ gallery.T
    order = brute_order(scores, exclude, largest)
    expected = (order == target[:, None]).int().argmax(dim=1)
    got = rank_of(
        queries,
        gallery,
        target,
        chunk_size=chunk_size,
        gallery_chunk_size=gallery_chunk_size,
        exclude=exclude,
        largest=largest,
    )
    assert torch.equal(got, expected)
    assert torch.equal(rank_of_scores(scores, target, exclude=exclude, largest=largest), expected)


def test_rank_of_hand_computed():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.9], [0.2, 0.2, 0.2, 0.2, 0.2]])
    # Row 0: order 1, 4, 0, 2, 3. Row 1: order 0..4.
    assert rank_of_scores(scores, torch.tensor([2, 3])).tolist() == [3, 3]
    assert rank_of_scores(scores, torch.tensor([2, 3]), exclude=torch.tensor([4, 0])).tolist() == [
        2,
        2,
    ]
    assert rank_of_scores(scores, torch.tensor([0, 0]), largest=False).tolist() == [1, 0]


def test_gather_scores_matches_dense():
    queries, gallery = torch.randn(9, 5), torch.randn(12, 5)
    index = torch.randint(0, 12, (9, 6))
    expected = (queries @ gallery.T).gather(1, index)
    assert torch.allclose(gather_scores(queries, gallery, index, chunk_size=4), expected, atol=1e-6)
    dist = gather_scores(queries, gallery, index, score_fn=neg_sq_dist)
    assert torch.equal(dist, neg_sq_dist(queries, gallery).gather(1, index))


def test_faiss_flat_matches_topk_and_round_trips(tmp_path):
    pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(300, 16, generator=gen), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(40, 16, generator=gen), dim=1)
    index = FaissIndex(16)
    index.add(gallery[:100])
    index.add(gallery[100:])
    assert len(index) == 300
    values, indices = index.search(queries, 10, batch_size=16)
    ref_values, ref_indices = topk(queries, gallery, 10)
    assert torch.equal(indices, ref_indices)
    assert torch.allclose(values, ref_values, atol=1e-5)

    path = tmp_path / "sub" / "image.index"
    index.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["image.index"]  # no temp file left
    loaded = FaissIndex.load(path)
    assert torch.equal(loaded.search(queries, 10)[1], indices)


def test_faiss_ivf_factory():
    pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(1)
    gallery = torch.nn.functional.normalize(torch.randn(400, 16, generator=gen), dim=1)
    queries = gallery[:20]
    exact = FaissIndex(16, "IVF4,Flat", nprobe=4)  # probing every list is exact
    exact.add(gallery)
    assert torch.equal(exact.search(queries, 5)[1], topk(queries, gallery, 5)[1])
    pq = FaissIndex(16, "IVF4,PQ4x4", nprobe=2)
    pq.train(gallery)
    pq.add(gallery)
    values, indices = pq.search(queries, 5)
    assert indices.shape == (20, 5) and values.shape == (20, 5)
    assert (indices[:, 0] == torch.arange(20)).float().mean() > 0.5  # approximate, not exact


@pytest.mark.parametrize("gallery_chunk_size", [7, 1000])
def test_rank_of_top1_is_zero_on_continuous_scores(gallery_chunk_size):
    """The target's score is read from the very blocks it is compared with: never ahead of
    itself, whatever the chunking."""
    gen = torch.Generator().manual_seed(7)
    queries, gallery = torch.randn(50, 24, generator=gen), torch.randn(90, 24, generator=gen)
    opts = dict(chunk_size=16, gallery_chunk_size=gallery_chunk_size)
    _, indices = topk(queries, gallery, 3, **opts)
    for j in range(3):
        assert (rank_of(queries, gallery, indices[:, j], **opts) == j).all()


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_low_precision_embeddings_rank_in_float32(half):
    """bf16/fp16 embeddings at CLIP ViT-L's width (d = 768) rank as their float32 values do.

    Dot products kept in bf16 round cosines ~0.03 to 2^-13 steps near 0.03 but 2^-9 near 0.3: in
    a gallery of 4,000 many scores tie and the ranking follows the tie rule, not the embeddings.
    """
    gen = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(4000, 768, generator=gen), dim=-1)
    queries = torch.nn.functional.normalize(
        gallery[:200] + 0.8 * torch.randn(200, 768, generator=gen) / 768**0.5, dim=-1
    )
    q, g = queries.to(half), gallery.to(half)
    exact = q.double() @ g.double().T  # the embeddings users hold, scored exactly
    values, indices = topk(q, g, 10, chunk_size=64, gallery_chunk_size=1000)
    assert values.dtype == torch.float32
    reference = exact.topk(10, dim=1).indices
    assert torch.equal(indices, reference)
    # the same ranking kept in the input precision disagrees: the test has teeth
    low = (q @ g.T).float()
    assert (low.topk(10, dim=1).indices != reference).any()
    ranks = rank_of(q, g, torch.arange(200), chunk_size=64, gallery_chunk_size=1000)
    torch.testing.assert_close(ranks, (exact > exact.diagonal()[:, None]).sum(1))
    target = gather_scores(q, g, torch.arange(200)[:, None])
    assert target.dtype == torch.float32
    torch.testing.assert_close(target[:, 0].double(), exact.diagonal(), rtol=0, atol=1e-6)
