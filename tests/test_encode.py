"""Encoding through the Trainer: ordered, complete, cached, and identical under DDP (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf

from xmodal import backbones
from xmodal.retrieval.cache import EmbeddingCache
from xmodal.retrieval.encode import ShardSampler, TextDataset, encode, encode_cached, text_collate

REPO = Path(__file__).resolve().parents[1]


def _trainer():
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        enable_model_summary=False,
    )


@pytest.mark.parametrize(("n", "world"), [(10, 3), (7, 2), (1, 2), (12, 4)])
def test_shard_sampler_partitions_without_padding(n, world):
    shards = [list(ShardSampler(n, r, world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert [len(ShardSampler(n, r, world)) for r in range(world)] == [len(s) for s in shards]


@pytest.fixture(scope="module")
def tiny_clip():
    cfg = OmegaConf.load(REPO / "conf/backbone/tiny_clip.yaml")
    cfg.pop("defaults", None)
    torch.manual_seed(0)
    return backbones.build(cfg)


def test_encode_texts_matches_direct_forward(tiny_clip):
    model, _, tokenizer = tiny_clip
    model.eval()
    texts = [f"a {c} circle" for c in ["red", "green", "blue", "yellow", "purple"]] * 3
    emb, valid = encode(
        _trainer(),
        model,
        TextDataset(texts),
        "text",
        batch_size=4,
        collate_fn=text_collate(tokenizer),
    )
    with torch.no_grad():
        direct = model.encode_text(tokenizer(texts)).float()
    assert emb.shape == direct.shape and bool(valid.all())
    torch.testing.assert_close(emb, direct, rtol=1e-5, atol=1e-5)


def test_encode_cached_hits_skip_the_model(tiny_clip, tmp_path):
    model, _, tokenizer = tiny_clip
    cache = EmbeddingCache(tmp_path)
    key = {"kind": "text", "items": "abc"}
    ds = TextDataset(["a red square", "a blue star"])
    first, _ = encode_cached(
        cache, key, _trainer(), model, ds, "text", collate_fn=text_collate(tokenizer)
    )

    class Exploding(torch.nn.Module):
        def encode_text(self, tokens):
            raise AssertionError("cache hit must not encode")

    second, _ = encode_cached(
        cache, key, _trainer(), Exploding(), ds, "text", collate_fn=text_collate(tokenizer)
    )
    assert torch.equal(first, second)


@pytest.mark.ddp
def test_ddp_two_processes_equal_one(tmp_path, shapes_world):
    """torchrun with 2 gloo processes encodes 23 images + 23 texts exactly like 1 process."""
    script = REPO / "tests" / "ddp_encode_worker.py"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    outs = {}
    for world in (1, 2):
        out = tmp_path / f"emb{world}.pt"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(world),
            "--master_port",
            str(29500 + world + os.getpid() % 500),
            str(script),
            str(shapes_world),
            str(out),
        ]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        outs[world] = torch.load(out, weights_only=True)
    for key in ("image", "text"):
        assert outs[1][key].shape[0] == 23
        torch.testing.assert_close(outs[1][key], outs[2][key], rtol=1e-4, atol=1e-5)
    assert outs[2]["world_size"] == 2
