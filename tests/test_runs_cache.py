"""Run directories (self-describing, idempotent) and the atomic embedding cache."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from xmodal.retrieval.cache import EmbeddingCache, digest
from xmodal.runs import RunDir, atomic_write_json, is_finished


def _cfg(tmp_path, force=False):
    return OmegaConf.create({"run_dir": str(tmp_path / "run"), "force": force, "seed": 1})


def test_run_dir_records_config_overrides_sha_and_metrics(tmp_path):
    run = RunDir(_cfg(tmp_path), ["seed=1"])
    run.start()
    assert (run.path / "config.yaml").read_text().strip().startswith("run_dir:")
    assert OmegaConf.load(run.path / "overrides.yaml") == ["seed=1"]
    info = json.loads((run.path / "run.json").read_text())
    assert info["status"] == "running" and "git_sha" in info
    assert not run.finished
    run.finish({"test/R@1": 12.5})
    assert is_finished(run.path)
    assert json.loads((run.path / "metrics.json").read_text()) == {"test/R@1": 12.5}
    assert json.loads((run.path / "run.json").read_text())["status"] == "done"


def test_forced_rerun_keeps_previous_metrics(tmp_path):
    run = RunDir(_cfg(tmp_path), [])
    run.start()
    run.finish({"x": 1})
    RunDir(_cfg(tmp_path, force=True), []).start()
    kept = list(run.path.glob("metrics.*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text()) == {"x": 1}
    assert not run.finished


def test_failed_run_is_marked(tmp_path):
    run = RunDir(_cfg(tmp_path), [])
    run.start()
    run.fail(RuntimeError("boom"))
    info = json.loads((run.path / "run.json").read_text())
    assert info["status"] == "failed" and "boom" in info["error"]
    assert not run.finished


def test_atomic_json_leaves_old_file_on_error(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_cache_hit_skips_compute_and_key_depends_on_parts(tmp_path):
    cache = EmbeddingCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"emb": torch.arange(6.0).reshape(2, 3)}

    parts = {"backbone": {"arch": "x"}, "items": digest(["a.jpg", "b.jpg"]), "kind": "image"}
    first = cache.get_or_compute(parts, compute)
    second = cache.get_or_compute(dict(parts), compute)
    assert len(calls) == 1 and torch.equal(first["emb"], second["emb"])
    cache.get_or_compute({**parts, "kind": "text"}, compute)
    assert len(calls) == 2
    assert digest(["a.jpg", "b.jpg"]) != digest(["b.jpg", "a.jpg"])
    meta = json.loads(cache.path(parts).with_suffix(".json").read_text())
    assert meta["kind"] == "image"


def test_interrupted_cache_write_leaves_nothing(tmp_path, monkeypatch):
    cache = EmbeddingCache(tmp_path)

    def broken_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        cache.save({"k": 1}, {"emb": torch.zeros(1)})
    assert list(tmp_path.iterdir()) == []
    assert cache.load({"k": 1}) is None


def test_disabled_cache_always_computes(tmp_path):
    cache = EmbeddingCache(tmp_path, enabled=False)
    n = []
    cache.get_or_compute({"k": 1}, lambda: n.append(1) or torch.zeros(1))
    cache.get_or_compute({"k": 1}, lambda: n.append(1) or torch.zeros(1))
    assert len(n) == 2
