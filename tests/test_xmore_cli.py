"""X-MoRe end to end on the small shapes world: index build, retrieval, stream, metrics.json."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xmodal.config import compose
from xmodal.data.base import DatasetLayoutError
from xmodal.evaluators.xmore import modal_weights
from xmodal.pipeline import evaluate
from xmodal.runs import read_metrics

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.shapes_world=small", "trainer=cpu", "trainer.enable_progress_bar=false"]
# the shapes experiments use the demo's pretrained tiny CLIP; a random-init one (seeded by the
# run's seed) exercises the same code without pretraining here
EXPERIMENT = ["experiment=xmore/shapes_coop", "backbone=tiny_clip", *SMALL]


@pytest.fixture(scope="module")
def xmore_run(xmodal_env, shapes_world):
    """`xmodal-eval experiment=xmore/shapes_coop ...` in a subprocess, as a user runs it."""
    cmd = [sys.executable, "-m", "xmodal.cli.eval", *EXPERIMENT]
    env = {**os.environ, **xmodal_env, "PYTHONPATH": str(REPO / "src")}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return compose("eval", EXPERIMENT)


def test_metrics_json_has_every_accuracy(xmore_run):
    m = read_metrics(xmore_run.run_dir)
    for key in ("image", "text", "equal", "xmore", "xmore_all", "image_all"):
        assert 0.0 <= m[f"test/acc/{key}"] <= 100.0, key
    for name in ("minmax", "l1", "none", "equal"):
        assert 0.0 <= m[f"test/acc/normalizer/{name}"] <= 100.0
    assert m["test/acc/xmore"] == m["test/acc/normalizer/minmax"]
    assert m["test/acc/equal"] == m["test/acc/normalizer/equal"]
    seeds = [m[f"test/acc/xmore_seed{s}"] for s in (0, 1, 2)]
    assert m["test/acc/xmore"] == pytest.approx(sum(seeds) / 3)
    # 8 classes x 3 test images, the pool (150) holds more than K = 128 images: nothing skipped
    assert m["test/num_samples"] == m["test/num_evaluated"] == 24
    assert m["test/num_skipped"] == m["test/num_corrupt"] == 0
    assert m["test/short_results"] == m["test/no_captions"] == m["test/null_captions"] == 0
    assert m["test/index/tuned_recall"] == 1.0 and "test/index/nprobe" not in m  # exact Flat
    assert m["test/acc/image"] == m["test/acc/image_all"]
    assert m["test/acc/xmore_all"] == m["test/acc/xmore"]
    assert 0 < m["test/unique_captions"] <= 128 and m["test/num_short"] == 0


def test_index_was_built_from_the_pool(xmore_run):
    folder = Path(xmore_run.evaluator.index.folder)
    info = json.loads((folder / "xmodal_index.json").read_text())
    assert info["items"] == 150 and info["image_index"] == "Flat"
    assert info["encoder"]["name"] == "tiny_clip"
    assert sorted(p.name for p in folder.iterdir()) == [
        "image.index",
        "img_emb",
        "metadata",
        "xmodal_index.json",
    ]


def test_stream_files_reproduce_the_metrics(xmore_run):
    m = read_metrics(xmore_run.run_dir)
    for seed in (0, 1, 2):
        with open(Path(xmore_run.run_dir) / f"xmore_stream_seed{seed}.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 24 and sorted(int(r["index"]) for r in rows) == list(range(24))
        hits = sum(r["pred_xmore"] == r["label"] for r in rows)
        assert 100 * hits / 24 == pytest.approx(m[f"test/acc/xmore_seed{seed}"])
        image_hits = sum(r["pred_image"] == r["label"] for r in rows)
        assert 100 * image_hits / 24 == pytest.approx(m["test/acc/image"])
        # the weights are the running min-max of the confidences in this order
        conf = [
            torch.tensor([float(r[k]) for r in rows], dtype=torch.float64)
            for k in ("conf_image", "conf_text")
        ]
        w_image, w_text = modal_weights(*conf, "minmax")
        assert w_image.tolist() == [float(r["w_image"]) for r in rows]
        assert w_text.tolist() == [float(r["w_text"]) for r in rows]
        assert rows[0]["w_image"] == rows[0]["w_text"] == "0.5"  # the first sample


def _stream(run_dir, seed: int) -> list[dict[str, str]]:
    with open(Path(run_dir) / f"xmore_stream_seed{seed}.csv") as f:
        return list(csv.DictReader(f))


def test_table6_and_table8_keys_follow_from_the_streams(xmore_run):
    """test/entropy/* (paper Table 6) and test/weight_ratio/* (Table 8), recomputed from the
    stream files: entropy = (1 - confidence) ln C; the ratio pooled over the seeds' streams."""
    m = read_metrics(xmore_run.run_dir)
    streams = [_stream(xmore_run.run_dir, seed) for seed in (0, 1, 2)]
    num_classes = len({r["label"] for r in streams[0]})
    assert num_classes == 8  # 8 classes x 3 test images
    for modality in ("image", "text"):
        conf = [float(r[f"conf_{modality}"]) for r in streams[0]]
        entropy = sum((1 - c) * math.log(num_classes) for c in conf) / len(conf)
        # the stream's confidences are float32 arithmetic, the entropy metric float64
        assert m[f"test/entropy/{modality}"] == pytest.approx(entropy, rel=1e-6)
    cases = {"case1": ("1", "0"), "case2": ("0", "1"), "case3": ("0", "0")}
    for case, (image_ok, text_ok) in cases.items():
        ratios, num, beta_zero = [], 0, 0
        for rows in streams:
            for r in rows:
                right = (
                    str(int(r["pred_image"] == r["label"])),
                    str(int(r["pred_text"] == r["label"])),
                )
                if right != (image_ok, text_ok) or r["pred_xmore"] != r["label"]:
                    continue
                num += 1
                if float(r["w_text"]) == 0:
                    beta_zero += 1
                else:
                    ratios.append(float(r["w_image"]) / float(r["w_text"]))
        assert m[f"test/weight_ratio/{case}/num"] == num
        assert m[f"test/weight_ratio/{case}/beta_zero"] == beta_zero
        if ratios:
            assert m[f"test/weight_ratio/{case}"] == pytest.approx(sum(ratios) / len(ratios))
        else:
            assert f"test/weight_ratio/{case}" not in m
    assert sum(m[f"test/weight_ratio/{c}/num"] for c in cases) > 0


@pytest.mark.slow  # two more X-MoRe runs: ~19 s on the shared 2-core machine
def test_the_analysis_table_renders_from_shapes_runs(xmore_run, tmp_path):
    """xmore_shapes_analysis (Figure 4, Tables 6 and 8 on the shapes world) from two real runs of
    one dataset (k = 16 and k = 1): their cells filled, the other datasets' empty, every Avg.
    empty (a partial row), and the plot written."""
    from xmodal.tables import collect, render, table_config

    extra = ["backbone=tiny_clip", *SMALL]
    runs = {}
    for k in (16, 1):
        overrides = ["experiment=xmore/shapes_coop", "data=shapes_oxford_pets", *extra]
        overrides += [] if k == 16 else [f"evaluator.k={k}"]
        runs[k] = evaluate(compose("eval", overrides), overrides)
    assert runs[1]["test/entropy/image"] == runs[16]["test/entropy/image"]  # p_img has no k
    assert runs[1]["test/acc/image"] == runs[16]["test/acc/image"]
    table = table_config("xmore_shapes_analysis")
    rows = {r.label: r for r in collect(table, extra)}
    expected = {
        "top-1 (%), k=16": runs[16]["test/acc/xmore"],
        "top-1 (%), k=1": runs[1]["test/acc/xmore"],
        "entropy Image": runs[16]["test/entropy/image"],
        "entropy Text (k=1)": runs[1]["test/entropy/text"],
        "entropy Text (k=16)": runs[16]["test/entropy/text"],
    }
    for label, value in expected.items():
        row = rows[label]
        assert row.ours["oxford_pets"] == pytest.approx(value), label
        others = [v for k, v in row.ours.items() if k != "oxford_pets"]
        assert others == [None] * 10, label  # 9 datasets without a run, and the Avg.
        assert row.missing_runs == 9 and not row.finished
    assert rows["top-1 (%), k=8"].missing_runs == 10
    written = render(table, list(rows.values()), tmp_path)
    assert "9 of 10 runs missing" in written["markdown"].read_text()
    assert written["png"].is_file()


def test_zeroshot_agrees_with_the_image_only_baseline(xmore_run):
    overrides = ["evaluator=zeroshot", "data=shapes_oxford_pets", "backbone=tiny_clip", *SMALL]
    zeroshot = evaluate(compose("eval", overrides), overrides)
    assert zeroshot["test/acc1"] == read_metrics(xmore_run.run_dir)["test/acc/image_all"]


def test_skipped_samples_are_counted_and_left_out(xmore_run, tmp_path):
    # an IVF index probing one of 4 cells (~37 images) often returns fewer than K = 40 results
    overrides = [
        *EXPERIMENT,
        f"evaluator.index.folder={tmp_path}/ivf",
        "evaluator.index.factory='IVF4,Flat'",
        "evaluator.index.nprobe=1",
        "evaluator.coarse_k=40",
        "evaluator.k=4",
        "evaluator.normalizer=l1",
    ]
    m = evaluate(compose("eval", overrides), overrides)
    n, kept = m["test/num_samples"], m["test/num_evaluated"]
    assert 0 < kept < n == 24 and m["test/num_skipped"] == m["test/short_results"] == n - kept
    assert m["test/index/nprobe"] == 1 and "test/index/tuned_recall" not in m  # overridden
    assert m["test/acc/xmore"] == m["test/acc/normalizer/l1"]
    # xmore_all counts skipped samples by their image-only prediction, over all n samples
    image_hits_skipped = (m["test/acc/image_all"] * n - m["test/acc/image"] * kept) / 100
    seeds = [m[f"test/acc/xmore_seed{s}"] * kept / 100 for s in (0, 1, 2)]
    expected = sum(100 * (hits + image_hits_skipped) / n for hits in seeds) / 3
    assert m["test/acc/xmore_all"] == pytest.approx(expected)


def test_an_ivf_index_is_searched_with_its_tuned_nprobe_by_default(xmore_run, tmp_path):
    overrides = [
        *EXPERIMENT,
        f"evaluator.index.folder={tmp_path}/ivf",
        "evaluator.index.factory='IVF4,Flat'",  # evaluator.index.nprobe: null
        "evaluator.coarse_k=40",
        "evaluator.k=4",
    ]
    m = evaluate(compose("eval", overrides), overrides)
    info = json.loads((tmp_path / "ivf" / "xmodal_index.json").read_text())
    search = info["image_search"]
    assert info["tune_k"] == search["k"] == 40 and search["reached"]  # tuned for X-MoRe's K
    assert m["test/index/nprobe"] == int(search["params"].removeprefix("nprobe=")) > 1
    assert m["test/index/tuned_recall"] == search["recall"] and m["test/index/tuned_k"] == 40
    assert m["test/num_skipped"] == m["test/short_results"] + m["test/no_captions"]


def test_a_foreign_clip_retrieval_index_is_tuned_once_and_a_wrong_encoder_is_refused(
    xmore_run, tmp_path
):
    import shutil

    from xmodal.cli.index import main

    built = Path(xmore_run.evaluator.index.folder)
    foreign = tmp_path / "foreign"  # what clip-retrieval leaves: no xmodal_index.json
    shutil.copytree(built, foreign, ignore=shutil.ignore_patterns("xmodal_index.json", "img_emb"))
    overrides = [
        *EXPERIMENT,
        "evaluator.index.collection=null",
        f"evaluator.index.folder={foreign}",
    ]
    with pytest.raises(DatasetLayoutError, match="never tuned") as err:  # before any encoding
        evaluate(compose("eval", overrides), overrides)
    assert f"xmodal-index tune {foreign} --embeddings" in str(err.value)
    main(["tune", str(foreign), "--embeddings", str(built)])
    m = evaluate(compose("eval", overrides), overrides)
    main = read_metrics(xmore_run.run_dir)
    for key in ("image", "text", "equal", "xmore"):
        assert m[f"test/acc/{key}"] == main[f"test/acc/{key}"]
    wrong = [*EXPERIMENT, "evaluator.index.collection=null", f"evaluator.index.folder={built}"]
    wrong.append("evaluator.index.backbone=openclip_vit_b_32_openai")
    with pytest.raises(DatasetLayoutError, match="built with encoder tiny_clip"):
        evaluate(compose("eval", wrong), wrong)


def test_every_sample_skipped_is_an_error(xmore_run):
    overrides = [*EXPERIMENT, "evaluator.coarse_k=200"]  # more than the pool holds
    with pytest.raises(RuntimeError, match="all 24 test images were skipped"):
        evaluate(compose("eval", overrides), overrides)


def test_missing_index_fails_with_a_clear_message(xmodal_env, shapes_world, tmp_path):
    overrides = [
        *EXPERIMENT,
        "evaluator.index.collection=null",
        f"evaluator.index.folder={tmp_path}/no_index",
    ]
    with pytest.raises(DatasetLayoutError, match="missing image.index") as err:
        evaluate(compose("eval", overrides), overrides)
    assert "xmodal-index build" in str(err.value) and "evaluator.index.collection" in str(err.value)


def test_missing_dataset_fails_with_the_loader_message(xmodal_env, shapes_world, tmp_path):
    overrides = [*EXPERIMENT, f"data.root={tmp_path}/nope"]
    with pytest.raises(DatasetLayoutError, match="prepare_coop.py"):
        evaluate(compose("eval", overrides), overrides)


@pytest.mark.slow
@pytest.mark.ddp
def test_two_ddp_processes_equal_one(xmodal_env, shapes_world, tmp_path):
    """Index build, retrieval and text probabilities sharded over 2 CPU processes (gloo) give the
    metrics of one process; separate output folders, so nothing is shared through the cache."""
    results = []
    for name, trainer in (("one", ["trainer=cpu"]), ("two", ["trainer=ddp", "trainer.devices=2"])):
        env = {
            **os.environ,
            **xmodal_env,
            "XMODAL_OUTPUT": str(tmp_path / name),
            "PYTHONPATH": str(REPO / "src"),
        }
        overrides = [*EXPERIMENT, *trainer, "trainer.accelerator=cpu"]
        cmd = [sys.executable, "-m", "xmodal.cli.eval", *overrides]
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
        (path,) = (tmp_path / name).glob("eval/xmore/shapes_coop/*/metrics.json")
        results.append(json.loads(path.read_text()))
    one, two = results
    assert one.keys() == two.keys()
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
