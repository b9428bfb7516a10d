"""Scoring a per-query uncertainty against recorded ambiguity: the metric against hand-computed
cases, the shared reader of every method's uncertainty files, and runs that report it."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from scipy.stats import spearmanr

from xmodal.config import compose
from xmodal.data.ambiguity import sidecar_folder
from xmodal.metrics import ambiguity_scores, spearman
from xmodal.pipeline import evaluate
from xmodal.protocols.uncertainty import (
    ambiguity_metrics,
    csv_path,
    read_query_csv,
    write_query_csv,
    write_retrieval_csvs,
)
from xmodal.runs import read_metrics

SMALL = ["data.shapes_world=small", "trainer=cpu", "trainer.enable_progress_bar=false"]

# ---------------------------------------------------------------- the metric, by hand


def test_spearman_hand_computed_with_ties():
    # ranks x = 1..5; y = 5 6 7 8 7 -> 1 2 3.5 5 3.5 (the two 7s share ranks 3 and 4)
    # deviations from 3: x -2 -1 0 1 2, y -2 -1 .5 2 .5 -> rho = 8 / sqrt(10 * 9.5)
    x, y = [1, 2, 3, 4, 5], [5, 6, 7, 8, 7]
    assert spearman(x, y) == pytest.approx(8 / math.sqrt(95), abs=1e-12)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y)[0], abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="equally long"):
        spearman([1, 2], [1, 2, 3])


#            uncertainty, level, kind
CASE = [
    (0.10, 0.0, "none"),
    (0.30, 0.0, "none"),
    (0.20, 0.0, "none"),
    (0.90, 1.0, "blur"),
    (0.25, 0.5, "blur"),
    (0.40, 0.2, "blur"),  # below the threshold: in the Spearman, not in the AUROC
    (0.80, 0.75, "vague"),
    (0.05, 1.0, "vague"),
]


def test_ambiguity_scores_hand_computed():
    u, level, kind = zip(*CASE)
    out = ambiguity_scores(u, level, kind, threshold=0.5)
    # blur vs clear: u 0.1 0.3 0.2 0.9 0.25 0.4 -> ranks 1 4 2 6 3 5; level 0 0 0 1 .5 .2 -> ranks
    # 2 2 2 6 5 4; deviations from 3.5: u -2.5 .5 -1.5 2.5 -.5 1.5, level -1.5 -1.5 -1.5 2.5 1.5 .5
    assert out["blur/spearman"] == pytest.approx(11.5 / math.sqrt(17.5 * 15.5), abs=1e-12)
    # AUROC: 0.9 beats the 3 clear, 0.25 beats 0.1 and 0.2: 5 of 6 pairs
    assert out["blur/auroc"] == pytest.approx(5 / 6)
    assert out["blur/count"] == 2
    # vague: 0.8 beats the 3 clear, 0.05 none: 3 of 6
    assert out["vague/auroc"] == pytest.approx(3 / 6)
    assert out["vague/spearman"] == pytest.approx(
        spearmanr([0.1, 0.3, 0.2, 0.8, 0.05], [0, 0, 0, 0.75, 1.0])[0]
    )
    # all: positives 0.9 0.25 0.8 0.05 against the 3 clear: 3 + 2 + 3 + 0 of 12
    assert out["all/auroc"] == pytest.approx(8 / 12)
    assert out["all/count"] == 4
    assert out["all/spearman"] == pytest.approx(spearmanr(u, level)[0])
    assert set(out) == {
        f"{k}/{s}" for k in ("all", "blur", "vague") for s in ("spearman", "auroc", "count")
    }


def test_ambiguity_scores_ties_nan_and_bad_input():
    # a constant uncertainty: every pair tied, AUROC one half, Spearman undefined
    out = ambiguity_scores([1.0] * 4, [0, 0, 1, 1], ["none", "none", "blur", "blur"])
    assert out["blur/auroc"] == 0.5 and math.isnan(out["blur/spearman"])
    # NaN uncertainties are left out; no clear item left: AUROC undefined
    out = ambiguity_scores([float("nan"), 0.2, 0.9], [0, 0.6, 1.0], ["none", "blur", "blur"])
    assert math.isnan(out["blur/auroc"]) and out["blur/spearman"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one uncertainty, level and kind"):
        ambiguity_scores([0.1], [0.0, 1.0], ["none", "blur"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ambiguity_scores([0.1], [2.0], ["blur"])


# ---------------------------------------------------------------- the shared reader


def _sidecar(folder: Path, items: dict[str, tuple[float, str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    content = {
        "format": 1,
        "items": {k: {"level": lv, "kind": kd} for k, (lv, kd) in items.items()},
    }
    (folder / "ambiguity.json").write_text(json.dumps(content))


def test_cir_files_are_scored_by_reference_and_target(tmp_path):
    # the CIR protocol's layout (xmodal.protocols.cir.uncertainty_csv): no item column
    root, run = tmp_path / "fashioniq", tmp_path / "run"
    _sidecar(root, {f"r{i}>t{i}": (lv, kd) for i, (_, lv, kd) in enumerate(CASE)})
    (run / "uncertainty").mkdir(parents=True)
    lines = ["query,pair_id,reference,target,text,target_rank,uncertainty,sigma_m2,sigma_t2"]
    for i, (u, _, _) in enumerate(CASE):
        lines.append(f"{i},,r{i},t{i},some text,3,{u!r},{1 - u!r},nan")
    (run / "uncertainty" / "test_dress.csv").write_text("\n".join(lines) + "\n")
    data = {"family": "fashioniq", "root": str(root)}
    out = ambiguity_metrics(data, run)
    assert out["test/dress/ambiguity/matched"] == len(CASE)
    assert out["test/dress/ambiguity/blur/auroc"] == pytest.approx(5 / 6)
    assert out["test/dress/sigma_m2/ambiguity/blur/auroc"] == pytest.approx(1 / 6)  # reversed
    assert not any("sigma_t2" in k for k in out)  # an all-NaN source is not scored
    assert ambiguity_metrics(data, tmp_path / "no_run") == {}
    assert ambiguity_metrics({"family": "fashioniq", "root": str(tmp_path / "x")}, run) == {}


def test_item_ids_relative_to_the_data_root_reach_a_sidecar_below_it(tmp_path, caplog):
    # ImageNet: data.root is the data root, the sidecar lies in the variant's folder
    root, run = tmp_path / "world", tmp_path / "run"
    folder = root / "imagenet" / "images" / "val"
    _sidecar(folder, {f"n{i:08d}/img.JPEG": (lv, kd) for i, (_, lv, kd) in enumerate(CASE)})
    items = [f"imagenet/images/val/n{i:08d}/img.JPEG" for i in range(len(CASE))] + ["elsewhere"]
    write_query_csv(
        csv_path(run, "test", "images"),
        {"query": range(len(items)), "item": items},
        {"uncertainty": [u for u, _, _ in CASE] + [0.5], "text": [0.0] * len(items)},
    )
    ids, columns = read_query_csv(csv_path(run, "test", "images"))
    assert ids == items and list(columns) == ["uncertainty", "text"]
    out = ambiguity_metrics({"family": "imagenet", "root": str(root), "dataset": "imagenet"}, run)
    assert out["test/images/ambiguity/matched"] == len(CASE)
    assert "not in" in caplog.text  # the unknown query is named, then left out
    assert out["test/images/ambiguity/all/auroc"] == pytest.approx(8 / 12)
    assert out["test/images/text/ambiguity/all/auroc"] == 0.5
    with pytest.raises(ValueError, match="first uncertainty column"):
        write_query_csv(tmp_path / "x.csv", {"query": [0]}, {"text": [0.1]})


# ---------------------------------------------------------------- runs report it


def assert_scores_follow_the_files(metrics, run_dir, subset, sidecar, columns=None):
    """The ``all`` AUROC and Spearman of every uncertainty column in metrics.json, recomputed by
    hand from the run's CSV and the world's sidecar: pairs (ambiguous >= 0.5, clear) with ties one
    half, and scipy's Spearman; a wrong column, id or level would change them."""
    ids, values = read_query_csv(csv_path(run_dir, "test", subset))
    assert ids and all(i in sidecar for i in ids)
    assert metrics[f"test/{subset}/ambiguity/matched"] == len(ids)
    level = [sidecar[i]["level"] for i in ids]
    for name in columns or values:
        u = values[name]
        pos = [x for x, lv in zip(u, level) if lv >= 0.5]
        neg = [x for x, lv in zip(u, level) if lv == 0]
        wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
        prefix = f"test/{subset}/" + ("" if name == "uncertainty" else f"{name}/") + "ambiguity/all"
        assert metrics[f"{prefix}/auroc"] == pytest.approx(wins / (len(pos) * len(neg)))
        rho = spearmanr(u, level)[0]
        assert metrics[f"{prefix}/spearman"] == pytest.approx(rho, nan_ok=True)
        assert metrics[f"{prefix}/count"] == len(pos)
    return ids, values


def run_on_ambiguity_world(task: str, experiment: str, *extra: str) -> tuple[Any, dict]:
    """(config, metrics) of a run of ``experiment`` on the small ambiguity world with the tiny
    random-init CLIP, through the pipeline as the CLI runs it."""
    from xmodal.pipeline import train

    overrides = [
        f"experiment={experiment}",
        "backbone=tiny_clip",
        *SMALL,
        "data.shapes_ambiguity=true",
        *extra,
    ]
    cfg = compose(task, overrides)
    return cfg, (evaluate if task == "eval" else train)(cfg, overrides)


def sidecar_items(cfg: Any) -> dict:
    """The items of the ambiguity.json at ``data.root``."""
    return json.loads((Path(cfg.data.root) / "ambiguity.json").read_text())["items"]


def test_uclip_run_on_the_ambiguity_world_scores_every_confidence(xmodal_env):
    options = ["evaluator.passes=2", "evaluator.compare=[top1_similarity]", "evaluator.plots=false"]
    cfg, m = run_on_ambiguity_world("eval", "uclip/shapes_mcd", *options)
    assert read_metrics(cfg.run_dir) == m
    sidecar = sidecar_items(cfg)
    for d, n in (("i2t", m["test/num_images"]), ("t2i", m["test/num_texts"])):
        ids, columns = assert_scores_follow_the_files(m, cfg.run_dir, d, sidecar)
        assert len(ids) == n and list(columns) == ["uncertainty", "top1_similarity"]
    assert m["test/t2i/ambiguity/vague/count"] > 0 and "test/i2t/ambiguity/blur/auroc" in m
    assert "test/i2t/ambiguity/vague/auroc" not in m  # captions are not image queries
    # the sidecar is an input of the run: edited, it makes the finished run stale, not reused
    recorded = json.loads((Path(cfg.run_dir) / "inputs.json").read_text())["files"]
    assert "ambiguity.json" in recorded[os.path.abspath(cfg.data.root)]
    # the same evaluation on the default world reports no ambiguity
    default = compose("eval", ["experiment=uclip/shapes_mcd", *SMALL])
    assert not (Path(default.data.root) / "ambiguity.json").exists()


def test_xmore_run_writes_modal_uncertainties(xmodal_env):
    cfg, m = run_on_ambiguity_world("eval", "xmore/shapes_coop", "data=shapes_dtd")
    folder = sidecar_folder(cfg.data.family, cfg.data.root, cfg.data.dataset)
    below = folder.relative_to(cfg.data.root).as_posix()  # ids are relative to data.root
    items = json.loads((folder / "ambiguity.json").read_text())["items"]
    sidecar = {f"{below}/{k}": v for k, v in items.items()}
    ids, columns = assert_scores_follow_the_files(m, cfg.run_dir, "images", sidecar)
    assert len(ids) == m["test/num_evaluated"]
    assert all(i.startswith("dtd/images/") for i in ids)
    for name in ("uncertainty", "text"):  # 1 - normalised entropy
        values = torch.tensor(columns[name])
        assert bool(((values >= 0) & (values <= 1)).all())
    with open(csv_path(cfg.run_dir, "test", "images")) as f:
        rows = list(csv.DictReader(f))
    hits = sum(r["pred_image"] == r["label"] for r in rows)
    assert 100 * hits / len(rows) == pytest.approx(m["test/acc/image"])


def test_cir_training_run_scores_its_uncertainty_file(xmodal_env):
    cfg, m = run_on_ambiguity_world("train", "ruir/shapes_fashioniq", "trainer.max_epochs=0")
    sidecar = sidecar_items(cfg)
    for cat in ("dress", "shirt", "toptee"):
        _, columns = assert_scores_follow_the_files(m, cfg.run_dir, cat, sidecar, ["uncertainty"])
        # an untrained RUIR head: the same variance for every query, so every pair ties
        assert len(set(columns["uncertainty"])) == 1
        assert m[f"test/{cat}/ambiguity/all/auroc"] == 0.5
    assert (
        read_metrics(cfg.run_dir)["test/dress/ambiguity/matched"]
        == m["test/dress/ambiguity/matched"]
    )


def test_probvlm_run_scores_its_variances(xmodal_env):
    options = ["trainer.max_epochs=1", "method.mc_passes=2", "method.plots=false"]
    cfg, m = run_on_ambiguity_world("train", "probvlm/shapes", *options)
    sidecar = sidecar_items(cfg)
    for d, n in (("i2t", m["test/num_images"]), ("t2i", m["test/num_texts"])):
        ids, columns = assert_scores_follow_the_files(m, cfg.run_dir, d, sidecar)
        assert len(ids) == n
        assert list(columns) == ["uncertainty", "epistemic", "total"]  # aleatoric first
        total = torch.tensor(columns["total"]).double()
        parts = torch.tensor(columns["uncertainty"]).double() + torch.tensor(columns["epistemic"])
        torch.testing.assert_close(total, parts.double())  # eq 9


def test_retrieval_csvs_put_the_first_column_as_uncertainty(tmp_path):
    items = {"i2t": ["a.png", "b.png"], "t2i": ["a.png#0", "a.png#1", "b.png#0"]}
    ranks = {"i2t": torch.tensor([0, 3]), "t2i": torch.tensor([1, 0, 2])}
    uncertainties = {
        "top1_similarity": {"i2t": torch.tensor([-0.5, -0.25]), "t2i": torch.tensor([1.0, 2, 3])},
        "adversarial": {"i2t": torch.tensor([0.1, 0.2]), "t2i": torch.tensor([0.0, 0.5, 1.0])},
    }
    write_retrieval_csvs(tmp_path, items, ranks, uncertainties)
    lines = (tmp_path / "uncertainty" / "test_i2t.csv").read_text().splitlines()
    assert lines[0] == "query,item,target_rank,uncertainty,adversarial"
    assert lines[2].split(",")[:4] == ["1", "b.png", "3", "-0.25"]
    ids, columns = read_query_csv(tmp_path / "uncertainty" / "test_t2i.csv")
    assert ids == items["t2i"] and columns["uncertainty"] == [1.0, 2.0, 3.0]
    assert columns["adversarial"] == [0.0, 0.5, 1.0]
