"""The CIR protocol shared by every CIR method (xmodal.protocols.cir, docs/cir.md): metrics on the
cir.md §4 fixture, test-server files, the uncertainty CSV, and RUIR and HUG writing the same keys
and the same files on the same shapes data, rendered in one table."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from test_metrics_retrieval import cir_fixture
from xmodal.data.base import CIRSplit
from xmodal.data.cir import EvalSubset
from xmodal.protocols.cir import (
    UNCERTAINTY_COLUMNS,
    Scoring,
    cirr_submission,
    fashioniq_summary,
    subset_metrics,
    target_ranks,
    uncertainty_csv,
    write_cirr_submission,
)


def _fixture_subset(family: str, remove_reference: bool, with_target: bool = True):
    pred, gallery, target, reference, members = cir_fixture()
    names = [f"img{i:02d}" for i in range(64)]
    split = CIRSplit(
        name=f"{family}_fixture",
        protocol="clip4cir",
        reference=[names[i] for i in reference],
        text=[f"q{i}" for i in range(20)],
        target=[names[i] for i in target] if with_target else None,
        gallery=names,
        name_to_path={},
        remove_reference=remove_reference,
        pair_ids=list(range(100, 120)),
        members=[[names[i] for i in row] for row in members] if family == "cirr" else None,
    )
    return EvalSubset.build("dress" if family == "fashioniq" else "", family, split), pred, gallery


def test_subset_metrics_reproduce_the_official_values():
    # cir.md §4: CLIP4Cir FIQ protocol A R@10 = 10, R@50 = 75; masked reference R@50 = 80
    subset, q, g = _fixture_subset("fashioniq", remove_reference=False)
    out = subset_metrics(subset, q, g)
    assert (out["dress/R@10"], out["dress/R@50"]) == pytest.approx((10.0, 75.0))
    subset, q, g = _fixture_subset("fashioniq", remove_reference=True)
    out = subset_metrics(subset, q, g)
    assert [out[f"dress/R@{k}"] for k in (1, 5, 10, 50)] == pytest.approx([0, 5, 10, 80])
    subset, q, g = _fixture_subset("cirr", remove_reference=True)
    expected = {"R@1": 0, "R@5": 5, "R@10": 10, "R@50": 80, "Rs@1": 10, "Rs@2": 35, "Rs@3": 65}
    out = subset_metrics(subset, q, g)
    assert {k: out[k] for k in expected} == pytest.approx(expected)
    assert out["avg"] == pytest.approx((5 + 10) / 2)


def test_fashioniq_summary():
    per_cat = {f"{c}/R@{k}": v for c, v in (("a", 10.0), ("b", 30.0)) for k in (1, 5, 10, 50)}
    per_cat["b/R@50"] = 50.0
    out = fashioniq_summary(per_cat, ["a", "b"])
    assert out["avg/R@10"] == out["R@10"] == 20.0
    assert out["avg/R@50"] == out["R@50"] == 30.0
    assert out["avg"] == 25.0


def test_cirr_submission_format(tmp_path):
    subset, q, g = _fixture_subset("cirr", remove_reference=True, with_target=False)
    recall, recall_subset = cirr_submission(subset, q, g)
    assert recall["version"] == recall_subset["version"] == "rc2"
    assert (recall["metric"], recall_subset["metric"]) == ("recall", "recall_subset")
    assert set(recall) - {"version", "metric"} == {str(p) for p in range(100, 120)}
    scores = q @ g.T
    for i in range(20):
        ranked, ref = recall[str(100 + i)], subset.split.reference[i]
        assert len(ranked) == 50 and ref not in ranked and len(set(ranked)) == 50
        values = [scores[i, int(n[3:])].item() for n in ranked]
        assert values == sorted(values, reverse=True)
        best = recall_subset[str(100 + i)]
        others = [m for m in subset.split.members[i] if m != ref]
        expected = sorted(others, key=lambda n: -scores[i, int(n[3:])].item())[:3]
        assert best == expected
    paths = write_cirr_submission(tmp_path, "test1", recall, recall_subset)
    assert [p.name for p in paths] == [
        "recall_submission_test1.json",
        "recall_subset_submission_test1.json",
    ]
    assert json.loads(paths[0].read_text()) == recall
    # a gallery smaller than 51 gives lists of gallery size - 1
    names = [f"g{i}" for i in range(8)]
    tiny = CIRSplit("cirr_tiny", "clip4cir", ["g0"], ["x"], None, names, {}, True,
                    pair_ids=[7], members=[names[:6]])  # fmt: skip
    recall, recall_subset = cirr_submission(EvalSubset.build("", "cirr", tiny), q[:1], g[:8])
    assert len(recall["7"]) == 7 and "g0" not in recall["7"]
    assert len(recall_subset["7"]) == 3 and set(recall_subset["7"]) <= set(names[1:6])


def test_restrict_keeps_consistent_queries():
    subset, q, g = _fixture_subset("cirr", remove_reference=True)
    g_seen = torch.ones(64, dtype=torch.bool)
    g_seen[subset.target[0]] = False  # query 0 loses its target
    q_seen = torch.ones(20, dtype=torch.bool)
    q_seen[5] = False
    small, g_keep, q_keep = subset.restrict(g_seen, q_seen)
    dropped = {0, 5} | {i for i in range(20) if bool((subset.members[i] == subset.target[0]).any())}
    assert q_keep.tolist() == [i for i in range(20) if i not in dropped]
    assert len(small.split.gallery) == 63 and len(g_keep) == 63
    assert [small.split.gallery[i] for i in small.target.tolist()] == small.split.target
    assert [small.split.gallery[i] for i in small.reference.tolist()] == small.split.reference
    ranks = target_ranks(small, q[q_keep], g[g_keep])
    assert ranks.shape == (len(q_keep),)


def test_a_distance_score_ranks_like_the_negated_similarity():
    """``Scoring(largest=False)``: smaller is better; the same metrics and server files as the
    similarity it negates, for FashionIQ and CIRR."""
    for family in ("fashioniq", "cirr"):
        subset, q, g = _fixture_subset(family, remove_reference=family == "cirr")
        similar = subset_metrics(subset, q, g)
        distance = Scoring(lambda a, b: -(a @ b.T), largest=False, chunk_size=3)
        assert subset_metrics(subset, q, g, distance) == similar
        assert torch.equal(target_ranks(subset, q, g, distance), target_ranks(subset, q, g))
    subset, q, g = _fixture_subset("cirr", remove_reference=True, with_target=False)
    negated = Scoring(lambda a, b: -(a @ b.T), largest=False)
    assert cirr_submission(subset, q, g, negated) == cirr_submission(subset, q, g)


def test_uncertainty_csv_layout():
    subset, q, g = _fixture_subset("cirr", remove_reference=True)
    ranks = target_ranks(subset, q, g)
    u = torch.linspace(0.1, 0.2, 20)
    text = uncertainty_csv(subset, ranks, u, {"extra": torch.full((20,), float("nan"))})
    rows = list(csv.DictReader(text.splitlines()))
    assert list(rows[0]) == [*UNCERTAINTY_COLUMNS, "extra"]
    assert [int(r["target_rank"]) for r in rows] == ranks.tolist()
    assert [float(r["uncertainty"]) for r in rows] == u.tolist()  # exact floats
    assert rows[3]["pair_id"] == "103" and rows[3]["text"] == "q3" and rows[3]["extra"] == "nan"
    assert rows[3]["reference"] == subset.split.reference[3]


# ------------------------------------------------------------- one protocol for RUIR and HUG

SMALL = ["data.shapes_world=small", "trainer=cpu", "trainer.enable_progress_bar=false"]
EVAL_ONLY = [*SMALL, "trainer.max_epochs=0"]
#: RUIR's shapes rows start from the demo's pretrained tiny CLIP; tests start from random init
ROW_OVERRIDES = {"ruir/shapes_fashioniq": ["backbone=tiny_clip"], "hug/shapes_fashioniq": []}


def test_ruir_and_hug_write_the_same_keys_and_files_and_share_a_table(xmodal_env, shapes_world):
    from xmodal.config import compose
    from xmodal.pipeline import train
    from xmodal.tables import collect, render_markdown, table_config

    table = table_config("cir_shapes")
    runs = {}
    for row in table.rows:
        row.overrides = ROW_OVERRIDES[row.experiment]
        overrides = [f"experiment={row.experiment}", *row.overrides, *EVAL_ONLY]
        cfg = compose("train", overrides)
        runs[row.experiment] = (train(cfg, overrides), Path(cfg.run_dir))
    (ruir, ruir_dir), (hug, hug_dir) = runs.values()
    keys = {k for k in ruir if k.startswith("test/")}
    assert keys == {k for k in hug if k.startswith("test/")}
    for cat in ("dress", "shirt", "toptee"):
        assert {f"test/{cat}/uncertainty/{k}" for k in ("mean", "k1/AUROC", "k10/AURC")} <= keys
    assert {"test/avg", "test/R@10", "test/ms_per_query"} <= keys
    files = sorted(p.name for p in (ruir_dir / "uncertainty").iterdir())
    assert files == ["test_dress.csv", "test_shirt.csv", "test_toptee.csv"]
    assert files == sorted(p.name for p in (hug_dir / "uncertainty").iterdir())
    for run, extras in ((ruir_dir, []), (hug_dir, ["sigma_r2", "sigma_t2", "sigma_m2"])):
        with open(run / "uncertainty" / "test_dress.csv") as f:
            assert next(csv.reader(f)) == [*UNCERTAINTY_COLUMNS, *extras]
    rows = collect(table, EVAL_ONLY)
    assert [r.finished for r in rows] == [True, True]
    assert all(v is not None for r in rows for v in r.ours.values())  # every cell filled
    markdown = render_markdown(table, rows)
    assert "RUIR (tiny CLIP)" in markdown and "HUG (tiny BLIP-2)" in markdown
