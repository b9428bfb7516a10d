"""Indexes built like autofaiss (factory for a memory budget, search parameters tuned for a target
recall against exact search, stored and applied on opening), and clear errors for broken ones."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from xmodal.data.base import DatasetLayoutError
from xmodal.data.collection import Collection, read_collection
from xmodal.retrieval import clip_index, tuning
from xmodal.retrieval.clip_index import ClipIndex, IndexOptions
from xmodal.retrieval.search import topk

faiss = pytest.importorskip("faiss")

REPO = Path(__file__).resolve().parents[1]
K = 128  # X-MoRe's K


def clustered(n: int, dim: int, seed: int, *, world: int = 0) -> np.ndarray:
    """Unit vectors of a mixture of 300 Gaussian clusters of unequal sizes and spreads near a
    random 16-dim subspace (clip embeddings are clustered and of low intrinsic dimension);
    ``world`` fixes the mixture, ``seed`` the draw."""
    gen = np.random.default_rng(world)
    basis = np.linalg.qr(gen.standard_normal((dim, 16)))[0]
    centers = gen.standard_normal((300, 16))
    spread = gen.uniform(0.3, 0.8, 300)
    weights = 1 / np.arange(1, 301) ** 0.7
    rng = np.random.default_rng(seed)
    cluster = rng.choice(300, size=n, p=weights / weights.sum())
    z = centers[cluster] + spread[cluster, None] * rng.standard_normal((n, 16))
    x = z @ basis.T + 0.3 * np.sqrt(16 / dim) * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_dump(folder: Path, vectors: np.ndarray, parts: int = 2) -> Path:
    """What `clip-retrieval inference` leaves: img_emb/ (float16) + metadata/ (captions)."""
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    for p, rows in enumerate(np.array_split(np.arange(len(vectors)), parts)):
        np.save(folder / "img_emb" / f"img_emb_{p}.npy", vectors[rows].astype(np.float16))
        captions = [f"item {i}" for i in rows]
        pq.write_table(
            pa.table({"caption": captions}), folder / "metadata" / f"metadata_{p}.parquet"
        )
    return folder


def gallery(folder: Path) -> torch.Tensor:
    files = sorted((folder / "img_emb").glob("*.npy"))
    return torch.from_numpy(np.concatenate([np.load(f) for f in files]).astype(np.float32))


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    return tuning.recall_at_k(found.numpy(), exact.numpy())


@pytest.fixture(scope="module")
def ivf_dump(tmp_path_factory) -> Path:
    """60k clustered vectors, d = 64, indexed by `xmodal-index index` under a 12 MB budget:
    Flat (15.4 MB) does not fit, so auto picks IVF1024,SQfp16 and tunes its nprobe."""
    from xmodal.cli.index import main

    folder = write_dump(tmp_path_factory.mktemp("ivf") / "dump", clustered(60_000, 64, seed=0))
    main(["index", "--embeddings", str(folder), "--max-memory", "12M", "--tune-queries", "500"])
    return folder


def test_an_ivf_index_opened_with_its_defaults_reaches_the_target_recall(ivf_dump):
    info = json.loads((ivf_dump / "xmodal_index.json").read_text())
    assert info["image_index"] == "IVF1024,SQfp16" and info["max_memory"] == "12M"
    search = info["image_search"]
    assert search["k"] == K and search["target"] == 0.95 and search["reached"]
    nprobe = int(search["params"].removeprefix("nprobe="))
    assert 1 < nprobe < 1024 and search["recall"] >= 0.95 and search["missing"] == 0

    # fresh queries from the same distribution, never seen by training or tuning
    queries = torch.from_numpy(clustered(300, 64, seed=1))
    exact = topk(queries, gallery(ivf_dump), K)[1]
    index = ClipIndex(ivf_dump)  # defaults: the stored, tuned nprobe
    assert index.params == f"nprobe={nprobe}"
    _, ids = index.search(queries, K)
    assert (ids >= 0).all() and recall(ids, exact) >= 0.95
    # the same file read by plain faiss (e.g. clip-retrieval's `clip back`) carries the nprobe
    assert faiss.extract_index_ivf(faiss.read_index(str(ivf_dump / "image.index"))).nprobe == nprobe
    # before: faiss' default nprobe=1 misses most of the top-128 and returns missing ids
    _, ids_1 = ClipIndex(ivf_dump, nprobe=1).search(queries, K)
    assert recall(ids_1, exact) < 0.8 and (ids_1 < 0).sum() > 1000


def test_the_tuned_nprobe_is_the_smallest_that_reaches_the_target(ivf_dump):
    search = json.loads((ivf_dump / "xmodal_index.json").read_text())["image_search"]
    trials = {int(p.removeprefix("nprobe=")): (r, se, m) for p, r, se, m in search["trials"]}
    chosen = int(search["params"].removeprefix("nprobe="))
    assert trials[chosen] == (search["recall"], search["recall_se"], search["missing"])
    # reached with a margin: the mean minus two standard errors over the 500 queries
    recall, se, _ = trials[chosen]
    assert recall - 2 * se >= 0.95 and 0 < se < 0.01
    assert chosen - 1 in trials  # the bisection measured its neighbour: below the target
    below_recall, below_se, below_missing = trials[chosen - 1]
    assert below_recall - 2 * below_se < 0.95 or below_missing > 0
    # recall grows with nprobe over the measured values (monotone search)
    recalls = [trials[v][0] for v in sorted(trials)]
    assert recalls == sorted(recalls)


def test_an_explicit_nprobe_overrides_the_tuned_one(ivf_dump):
    index = ClipIndex(ivf_dump, nprobe=1024)  # every cell: exact up to the float16 codes
    queries = torch.from_numpy(clustered(50, 64, seed=2))
    exact = topk(queries, gallery(ivf_dump), K)[1]
    assert index.params == "nprobe=1024" and recall(index.search(queries, K)[1], exact) > 0.999


@pytest.mark.parametrize(
    ("factory", "knob"),
    [("IVF64_HNSW8,Flat", "nprobe"), ("HNSW8", "efSearch"), ("IVF64,PQ8x4np", "nprobe")],
)
def test_tune_other_factories(factory, knob, caplog):
    x = clustered(6000, 32, seed=3)
    index = faiss.index_factory(32, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    own = np.arange(0, 6000, 30)
    exact = tuning.drop_own(tuning.exact_knn([x], x[own], 33, block=1000), own, 32)
    with caplog.at_level(logging.WARNING):
        out = tuning.tune(index, x[own], exact, own=own, target=0.95)
    assert out["params"].startswith(f"{knob}=") and out["k"] == 32
    if factory.startswith("IVF64_HNSW"):  # the quantizer's HNSW searches 2 nprobe candidates
        nprobe = int(out["params"].split(",")[0].removeprefix("nprobe="))
        assert out["params"].endswith(f"quantizer_efSearch={max(16, 2 * nprobe)}")
    # what the index holds now is what was measured
    _, ids = index.search(x[own], 33)
    found = tuning.drop_own(ids, own, 32)
    assert tuning.recall_at_k(found, exact) == out["recall"]
    if "PQ" in factory:  # 4-byte codes cap the recall: recorded and said, not hidden
        assert not out["reached"] and out["recall"] < 0.95
        assert "cannot reach recall@32 >= 0.95" in caplog.text
        # kept: the smallest nprobe within the plateau tolerance of the best complete recall
        trials = {int(p.split("=")[1]): (r, m) for p, r, _, m in out["trials"]}
        best = max(r for r, m in trials.values() if m == 0)
        plateau = [v for v, (r, m) in trials.items() if m == 0 and r >= best - tuning.PLATEAU]
        assert out["params"] == f"nprobe={min(plateau)}" and out["missing"] == 0
    else:
        assert out["reached"] and out["recall"] >= 0.95 and out["missing"] == 0


def test_exact_knn_and_leave_one_out():
    x = clustered(2500, 16, seed=4)
    queries = x[[5, 17, 2000]]
    ids = tuning.exact_knn([x[:1000], x[1000:]], queries, 10, block=300)
    assert ids.tolist() == topk(torch.from_numpy(queries), torch.from_numpy(x), 10)[1].tolist()
    assert ids[:, 0].tolist() == [5, 17, 2000]  # each finds itself first ...
    loo = tuning.drop_own(ids, np.array([5, 17, 2000]), 9)
    assert loo.tolist() == ids[:, 1:].tolist()  # ... and leave-one-out drops it
    assert tuning.recall_at_k(np.array([[1, 2, -1]]), np.array([[2, 3, 1]])) == pytest.approx(2 / 3)


def test_parse_size():
    assert tuning.parse_size("32G") == 32 * 2**30
    assert tuning.parse_size("1.5g") == int(1.5 * 2**30)
    assert tuning.parse_size("512MiB") == 512 * 2**20 and tuning.parse_size(4096) == 4096
    with pytest.raises(ValueError, match="memory size like"):
        tuning.parse_size("lots")


# ------------------------------------------------------------------------------------------
# Broken index folders: one paragraph, the file named, the command that fixes it
# ------------------------------------------------------------------------------------------


@pytest.fixture
def small_build(tmp_path) -> tuple[Path, Collection]:
    from test_xmore_index import ENCODER, FakeEncoder, write_table_collection

    collection = read_collection(write_table_collection(tmp_path / "c", 40))
    folder = tmp_path / "index"
    options = IndexOptions(factory="IVF2,Flat", tune_k=8)
    clip_index.build(folder, collection, FakeEncoder(), ENCODER, options=options)
    return folder, collection


def test_a_truncated_index_file_names_the_file_and_the_rebuild_command(small_build):
    folder, collection = small_build
    path = folder / "image.index"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for mmap in (False, True):
        with pytest.raises(DatasetLayoutError) as err:
            ClipIndex(folder, mmap=mmap)
        message = str(err.value)
        assert f"{path} holds {len(data) // 2} bytes" in message and "truncated" in message
        rebuild = f"xmodal-index build --source {collection.source} --folder {folder}"
        assert f"`{rebuild} backbone=fake --factory 'IVF2,Flat'`" in message
        assert err.value.__cause__ is None  # no chained faiss traceback


def test_a_corrupt_index_file_of_the_recorded_size_is_caught_at_reading(small_build):
    folder, _ = small_build
    path = folder / "image.index"
    path.write_bytes(b"\0" * path.stat().st_size)  # same size, garbage: the size check passes
    with pytest.raises(DatasetLayoutError, match="could not be read: it is truncated or corrupt"):
        ClipIndex(folder, mmap=True)
    # a clip-retrieval index tuned here has no recorded collection: rebuilt from its embeddings
    info = json.loads((folder / "xmodal_index.json").read_text())
    del info["collection"]
    (folder / "xmodal_index.json").write_text(json.dumps(info))
    with pytest.raises(DatasetLayoutError) as err:
        ClipIndex(folder)
    assert f"xmodal-index index --embeddings {folder} --folder {folder}" in str(err.value)
    assert "faiss: " in str(err.value) and "Error in" not in str(err.value)  # its gist only


def test_an_unfinished_build_is_refused(tmp_path):
    from test_xmore_index import ENCODER, FakeEncoder, write_table_collection

    collection = read_collection(write_table_collection(tmp_path / "c", 25))
    folder = tmp_path / "index"
    with pytest.raises(KeyboardInterrupt):
        clip_index.build(folder, collection, FakeEncoder(fail_after=2), ENCODER, partition_size=10)
    faiss.write_index(faiss.IndexFlatIP(16), str(folder / "image.index"))  # even with an index
    with pytest.raises(DatasetLayoutError, match="an unfinished build") as err:
        ClipIndex(folder)
    command = f"xmodal-index build --source {collection.source} --folder {folder} backbone=fake"
    assert f"`{command}`" in str(err.value)
    with pytest.raises(DatasetLayoutError, match="finish it first"):  # `index` would spoil it
        clip_index.index_folder(folder)


def test_an_index_without_its_info_json_is_refused(small_build):
    folder, _ = small_build
    (folder / "xmodal_index.json").unlink()
    with pytest.raises(DatasetLayoutError, match="has no xmodal_index.json") as err:
        ClipIndex(folder)
    message = str(err.value)
    assert f"xmodal-index index --embeddings {folder} --folder {folder}" in message
    assert f"`xmodal-index tune {folder}`" in message  # img_emb/ is there
    clip_index.tune_folder(folder, options=IndexOptions(tune_k=8))
    assert ClipIndex(folder).params.startswith("nprobe=")


def test_an_info_json_without_tuned_parameters_is_refused(small_build):
    folder, _ = small_build
    info = json.loads((folder / "xmodal_index.json").read_text())
    old = {k: v for k, v in info.items() if k not in ("image_search", "image_index_bytes")}
    (folder / "xmodal_index.json").write_text(json.dumps({**old, "format_version": 1}))
    with pytest.raises(DatasetLayoutError, match="no tuned search parameters"):
        ClipIndex(folder)


def test_a_corrupt_metadata_partition_is_named(small_build):
    folder, _ = small_build
    part = folder / "metadata" / "metadata_0.parquet"
    part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(DatasetLayoutError, match="metadata_0.parquet could not be read"):
        ClipIndex(folder)


def test_the_cli_prints_one_paragraph_and_exits_2(small_build):
    folder, _ = small_build
    path = folder / "image.index"
    path.write_bytes(path.read_bytes()[:50])
    cmd = [sys.executable, "-m", "xmodal.cli.index", "info", str(folder)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert "Traceback" not in res.stderr and str(path) in res.stderr
    assert res.stderr.strip().startswith("xmodal-index: X-MoRe external index:")
    assert "fix: rebuild it with `xmodal-index build --source" in res.stderr


def test_new_index_options_reindex_without_re_encoding(small_build):
    from test_xmore_index import ENCODER, FakeEncoder

    folder, collection = small_build
    encoder = FakeEncoder()
    options = IndexOptions(factory="Flat", tune_k=8)
    info = clip_index.build(folder, collection, encoder, ENCODER, options=options)
    assert encoder.calls == 0 and info["image_index"] == "Flat" and info["factory"] == "Flat"
    assert info["image_search"]["exact"] and ClipIndex(folder).params == ""


def test_a_corrupt_embedding_partition_is_named(small_build):
    folder, collection = small_build
    part = folder / "img_emb" / "img_emb_0.npy"
    part.write_bytes(b"garbage")
    with pytest.raises(DatasetLayoutError, match="img_emb_0.npy could not be read") as err:
        clip_index.index_folder(folder)
    assert f"delete it and re-encode it with `xmodal-index build --source {collection.source}" in (
        str(err.value)
    )


def test_the_cli_help_states_the_tuning_defaults():
    from xmodal.cli.index import _parser

    text = " ".join(_parser()._subparsers._group_actions[0].choices["index"].format_help().split())
    assert f"(default {tuning.DEFAULT_MAX_MEMORY})" in text
    assert f"(default {tuning.DEFAULT_TARGET_RECALL})" in text
    assert f"(default {tuning.DEFAULT_TUNE_K})" in text
    assert f"(default {tuning.DEFAULT_TUNE_QUERIES})" in text
