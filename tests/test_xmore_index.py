"""The external index (clip-retrieval layout): collections, build/open round trip, exact search."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from xmodal.data.base import DatasetLayoutError
from xmodal.data.collection import expand_braces, read_collection
from xmodal.retrieval import clip_index
from xmodal.retrieval.clip_index import ClipIndex, IndexOptions, auto_factory
from xmodal.retrieval.search import topk

DIM = 16


def write_table_collection(root: Path, n: int, fmt: str = "parquet") -> Path:
    """n tiny images under root/images and a metadata table with relative paths + captions."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (4, 4), (i % 256, 0, 0)).save(root / "images" / f"{i:03d}.jpg")
    table = pa.table(
        {
            "image_path": [f"images/{i:03d}.jpg" for i in range(n)],
            "caption": [f"caption {i % (n - 3)}" for i in range(n)],  # some repeated captions
            "url": [f"http://x/{i}" for i in range(n)],
        }
    )
    path = root / f"metadata.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, path)
    else:
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, path)
    return path


class FakeEncoder:
    """A deterministic ``EncodeFn``: a fixed random vector per item; optionally fails."""

    def __init__(self, invalid: set[str] = frozenset(), fail_after: int | None = None):
        self.invalid, self.fail_after, self.calls = invalid, fail_after, 0

    def vector(self, item: str) -> torch.Tensor:
        seed = int.from_bytes(item.encode()[-8:].rjust(8, b"\0"), "little") % (2**31)
        return torch.randn(DIM, generator=torch.Generator().manual_seed(seed)) * 3

    def __call__(self, items, kind):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        emb = torch.stack([self.vector(f"{kind}:{i}") for i in items])
        return emb, torch.tensor([i not in self.invalid for i in items])


ENCODER = {"name": "fake", "identity": {"dim": DIM}}


def gallery_of(folder: Path) -> torch.Tensor:
    files = sorted((folder / "img_emb").glob("*.npy"))
    return torch.from_numpy(np.concatenate([np.load(f) for f in files]).astype(np.float32))


def test_build_writes_clip_retrieval_layout_and_search_is_exact(tmp_path):
    collection = read_collection(write_table_collection(tmp_path / "c", 23))
    folder = tmp_path / "index"
    info = clip_index.build(folder, collection, FakeEncoder(), ENCODER, partition_size=10)
    # three partitions, zero-padded to the digits of the partition count (3 -> one digit)
    assert sorted(p.name for p in (folder / "img_emb").iterdir()) == [
        "img_emb_0.npy",
        "img_emb_1.npy",
        "img_emb_2.npy",
    ]
    assert sorted(p.name for p in (folder / "metadata").iterdir()) == [
        f"metadata_{p}.parquet" for p in range(3)
    ]
    emb = np.load(folder / "img_emb" / "img_emb_0.npy")
    assert emb.dtype == np.float16 and emb.shape == (10, DIM)
    assert np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1, atol=1e-3)
    assert info["items"] == 23 and info["image_index"] == "Flat" and info["encoder"] == ENCODER
    search = info["image_search"]  # exact: nothing to tune, recall 1 by construction
    assert search["exact"] and search["params"] == "" and search["recall"] == 1.0
    assert info["image_index_bytes"] == (folder / "image.index").stat().st_size
    assert json.loads((folder / "xmodal_index.json").read_text()) == info
    assert not (folder / clip_index.PLAN_FILE).exists()

    index = ClipIndex(folder)
    assert len(index) == 23 and index.dim == DIM and index.info == info
    queries = F.normalize(torch.randn(7, DIM, generator=torch.Generator().manual_seed(1)), dim=-1)
    scores, ids = index.search(queries, 5)
    exact_scores, exact_ids = topk(queries, gallery_of(folder), 5)
    assert ids.tolist() == exact_ids.tolist()
    assert torch.allclose(scores, exact_scores, atol=1e-5)
    captions = collection.captions
    assert index.column(ids) == [[captions[i] for i in row] for row in ids.tolist()]
    assert index.column(ids[:2], "url")[0][0] == f"http://x/{ids[0, 0].item()}"
    # memory-mapped, the same answers
    assert ClipIndex(folder, mmap=True).search(queries, 5)[1].tolist() == ids.tolist()


def test_unreadable_images_are_dropped_with_their_metadata(tmp_path):
    collection = read_collection(write_table_collection(tmp_path / "c", 12, fmt="csv"))
    bad = {collection.image_refs[3], collection.image_refs[7]}
    folder = tmp_path / "index"
    info = clip_index.build(folder, collection, FakeEncoder(invalid=bad), ENCODER)
    index = ClipIndex(folder)
    assert info["items"] == len(index) == 10
    kept = [c for r, c in zip(collection.image_refs, collection.captions) if r not in bad]
    all_ids = torch.arange(10)[None]
    assert index.column(all_ids)[0] == kept
    paths = index.column(all_ids, "image_path")[0]
    assert bad.isdisjoint(paths) and all(Path(p).is_absolute() for p in paths)


def test_interrupted_build_resumes_and_a_changed_collection_rebuilds(tmp_path):
    collection = read_collection(write_table_collection(tmp_path / "c", 25))
    folder = tmp_path / "index"
    with pytest.raises(KeyboardInterrupt):
        clip_index.build(folder, collection, FakeEncoder(fail_after=2), ENCODER, partition_size=10)
    assert (folder / clip_index.PLAN_FILE).is_file() and not (folder / "image.index").exists()
    resumed = FakeEncoder()
    clip_index.build(folder, collection, resumed, ENCODER, partition_size=10)
    assert resumed.calls == 1  # only the third partition was left
    fresh = tmp_path / "fresh"
    clip_index.build(fresh, collection, FakeEncoder(), ENCODER, partition_size=10)
    assert torch.equal(gallery_of(folder), gallery_of(fresh))
    # another encoder identity is another plan: everything is encoded again
    again = FakeEncoder()
    clip_index.build(folder, collection, again, {"name": "other"}, partition_size=10)
    assert again.calls == 3


@pytest.mark.parametrize("factory", ["IVF4,Flat", "HNSW8"])
def test_approximate_factories_open_and_search(tmp_path, factory):
    collection = read_collection(write_table_collection(tmp_path / "c", 200))
    folder = tmp_path / "index"
    options = IndexOptions(factory=factory, tune_k=8)
    info = clip_index.build(folder, collection, FakeEncoder(), ENCODER, options=options)
    assert info["image_index"] == factory
    search = info["image_search"]
    assert search["reached"] and search["recall"] >= 0.95 and search["missing"] == 0
    assert search["params"].startswith("nprobe=" if factory.startswith("IVF") else "efSearch=")
    queries = gallery_of(folder)[:20]
    if factory.startswith("IVF"):  # visiting every cell is exact
        ids = ClipIndex(folder, nprobe=4).search(queries, 8)[1]
        assert ids.tolist() == topk(queries, gallery_of(folder), 8)[1].tolist()
    index = ClipIndex(folder)  # the tuned parameters are applied
    assert index.params == search["params"]
    assert (index.search(queries, 8)[1][:, 0] == torch.arange(20)).float().mean() > 0.9


def test_ivf_pq_index_and_missing_results(tmp_path):
    collection = read_collection(write_table_collection(tmp_path / "c", 300))
    folder = tmp_path / "index"
    options = IndexOptions(factory="IVF8,PQ4x4", tune_k=64)
    clip_index.build(folder, collection, FakeEncoder(), ENCODER, options=options)
    index = ClipIndex(folder, nprobe=1)  # one cell of ~37 items: fewer than k results
    scores, ids = index.search(gallery_of(folder)[:5], 64)
    assert ((ids >= -1) & (ids < 300)).all() and (ids == -1).any()
    assert torch.isinf(scores[ids == -1]).all()
    assert all(c is None for row, r in zip(index.column(ids), ids) for c, i in zip(row, r) if i < 0)


def test_index_an_existing_embedding_dump_and_on_disk_index(tmp_path):
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    collection = read_collection(write_table_collection(tmp_path / "c", 40))
    dump = tmp_path / "dump"  # what `clip-retrieval inference` leaves: img_emb/ + metadata/
    clip_index.build(dump, collection, FakeEncoder(), ENCODER, partition_size=16)
    out = tmp_path / "reindexed"
    options = IndexOptions(factory="IVF2,Flat", tune_k=4)
    info = clip_index.index_folder(out, embeddings=dump, options=options)
    assert info["image_index"] == "IVF2,Flat" and info["encoder"] == ENCODER  # the dump's
    assert info["items"] == 40 and info["image_search"]["recall"] >= 0.95
    assert not (out / clip_index.PLAN_FILE).exists()
    queries = gallery_of(dump)[:6]
    exact = topk(queries, gallery_of(dump), 4)[1].tolist()
    assert ClipIndex(out, nprobe=2).search(queries, 4)[1].tolist() == exact
    # autofaiss' merged on-disk layout: image.index/ holding populated.index + the ivf data
    merged = tmp_path / "ondisk"
    (merged / "image.index").mkdir(parents=True)
    (merged / "metadata").symlink_to(dump / "metadata")
    x = gallery_of(dump).numpy()
    trained = faiss.index_factory(DIM, "IVF2,Flat", faiss.METRIC_INNER_PRODUCT)
    trained.train(x)
    blocks = []
    for b, rows in enumerate((range(0, 25), range(25, 40))):
        block = faiss.clone_index(trained)
        block.add_with_ids(x[rows.start : rows.stop], np.arange(rows.start, rows.stop))
        blocks.append(str(tmp_path / f"block_{b}.index"))
        faiss.write_index(block, blocks[-1])
    merge_ondisk(trained, blocks, str(merged / "image.index" / "merged_index.ivfdata"))
    faiss.write_index(trained, str(merged / "image.index" / "populated.index"))
    with pytest.raises(DatasetLayoutError, match="never tuned") as err:  # made elsewhere
        ClipIndex(merged)
    assert f"xmodal-index tune {merged} --embeddings" in str(err.value)
    tuned = clip_index.tune_folder(merged, embeddings=dump, options=IndexOptions(tune_k=4))
    assert tuned["image_search"]["recall"] >= 0.95 and tuned["image_index_bytes"] is None
    assert ClipIndex(merged, nprobe=2).search(queries, 4)[1].tolist() == exact
    assert ClipIndex(merged).params == tuned["image_search"]["params"]


def test_missing_or_misaligned_index_fails_with_a_clear_message(tmp_path):
    with pytest.raises(DatasetLayoutError, match="missing image.index") as err:
        ClipIndex(tmp_path / "nowhere")
    assert "xmodal-index build" in str(err.value) and "expected layout" in str(err.value)
    collection = read_collection(write_table_collection(tmp_path / "c", 12))
    folder = tmp_path / "index"
    clip_index.build(folder, collection, FakeEncoder(), ENCODER)
    with pytest.raises(ValueError, match="encoder the index was built with"):
        ClipIndex(folder).search(torch.zeros(1, DIM + 1), 3)
    table = pq.read_table(folder / "metadata" / "metadata_0.parquet")
    pq.write_table(table.slice(0, 11), folder / "metadata" / "metadata_0.parquet")
    with pytest.raises(DatasetLayoutError, match="11 rows but image.index holds 12"):
        ClipIndex(folder)


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _jpg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buf, format="JPEG")
    return buf.getvalue()


def test_webdataset_collections_and_brace_patterns(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _tar(shards / "00.tar", {"a.jpg": _jpg(), "a.txt": b" a red square \n", "b.png": _jpg()})
    _tar(shards / "01.tar", {"c.webp": _jpg(), "c.json": json.dumps({"caption": "json"}).encode()})
    for source in (str(shards / "{00..01}.tar"), str(shards)):
        collection = read_collection(source)
        assert collection.captions == ["a red square", "json"]  # b has no caption: skipped
        assert collection.image_refs == [f"{shards}/00.tar::a.jpg", f"{shards}/01.tar::c.webp"]
        assert collection.table.column("key").to_pylist() == ["a", "c"]
    assert expand_braces("s/{08..10}-{0..1}.tar") == [
        "s/08-0.tar",
        "s/08-1.tar",
        "s/09-0.tar",
        "s/09-1.tar",
        "s/10-0.tar",
        "s/10-1.tar",
    ]


def test_bad_collections_name_the_problem(tmp_path):
    pq.write_table(pa.table({"path": ["x.jpg"], "text": ["t"]}), tmp_path / "m.parquet")
    with pytest.raises(DatasetLayoutError, match=r"lacks column\(s\) \['image_path', 'caption'\]"):
        read_collection(tmp_path / "m.parquet")
    pq.write_table(pa.table({"image_path": ["x.jpg"], "caption": ["t"]}), tmp_path / "n.parquet")
    with pytest.raises(DatasetLayoutError, match="1 of 1 images listed"):
        read_collection(tmp_path / "n.parquet")
    with pytest.raises(DatasetLayoutError, match="no such file"):
        read_collection(tmp_path / "absent.csv")


def test_auto_factory():
    assert auto_factory(1000, 512) == "Flat"
    # LAION-400M scale in the default 32G: 64-byte PQ codes + 8-byte ids = 28.8 GB
    assert auto_factory(400_000_000, 512) == "IVF65536,PQ64np"
    # 4 sqrt(n) = 8000 -> 2^13 lists; float16 codes fit 32G (6.2 GB), SQ8 3.1 GB, else PQ
    assert auto_factory(4_000_000, 768) == "IVF8192,SQfp16"
    assert auto_factory(4_000_000, 768, "4G") == "IVF8192,SQ8"
    assert auto_factory(4_000_000, 768, "1G") == "IVF8192,PQ192np"  # 4M x 200 B = 0.75 GiB
    # small collections stay exact when they fit, and go IVF when they do not
    assert auto_factory(60_000, 64, "16M") == "Flat"  # 15.4 MB
    assert auto_factory(60_000, 64, "12M") == "IVF1024,SQfp16"
    with pytest.raises(ValueError, match="raise the memory budget"):
        auto_factory(400_000_000, 512, "1G")


def test_cli_build_info_and_search(shapes_world, tmp_path, capsys):
    from xmodal.cli.index import main, parse_args

    folder = tmp_path / "pool_index"
    over = ["backbone=tiny_clip", "trainer=cpu", "trainer.enable_progress_bar=false"]
    source = ["--source", str(shapes_world / "pool"), "--num-workers", "0"]
    main(["build", *source, "--folder", str(folder), *over])
    info = json.loads((folder / "xmodal_index.json").read_text())
    assert info["items"] == 150 and info["encoder"]["name"] == "tiny_clip"
    capsys.readouterr()
    main(["info", str(folder)])
    printed = json.loads(capsys.readouterr().out)
    assert printed["items"] == 150 and printed["columns"] == ["image_path", "caption"]
    image = str(shapes_world / "pool" / "images" / "000000.jpg")
    args = parse_args(["search", str(folder), image, "-k", "3", *over])
    assert args.images == [image] and args.overrides == over
    main(["search", str(folder), image, "-k", "3", *over])
    out = capsys.readouterr().out.splitlines()
    assert out[1] == image and len(out) == 5  # blank, the image, its 3 nearest captions
    caption = pq.read_table(shapes_world / "pool" / "metadata.parquet").column("caption")[0]
    assert out[2].endswith(caption.as_py())  # the query image itself is in the pool: rank 1


def test_cli_index_an_embedding_dump(tmp_path, capsys):
    from xmodal.cli.index import main

    collection = read_collection(write_table_collection(tmp_path / "c", 30))
    clip_index.build(tmp_path / "dump", collection, FakeEncoder(), ENCODER)
    out = tmp_path / "index"
    main(
        ["index", "--embeddings", str(tmp_path / "dump"), "--folder", str(out), "--factory", "Flat"]
    )
    assert capsys.readouterr().out.strip() == (
        f"{out}/image.index: Flat, search exact, recall@29 1.0000 against exact search"
    )
    queries = gallery_of(tmp_path / "dump")[:3]
    assert ClipIndex(out).search(queries, 2)[1][:, 0].tolist() == [0, 1, 2]
    assert ClipIndex(out).column(torch.tensor([[5]])) == [[collection.captions[5]]]
