"""Run directories (self-describing, idempotent) and the atomic embedding cache."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from xmodal import inputs
from xmodal.errors import BrokenFileError, RunConflictError
from xmodal.inputs import digest
from xmodal.retrieval.cache import EmbeddingCache
from xmodal.runs import RunDir, RunLock, atomic_write_json, is_finished


def _cfg(tmp_path, force=False):
    return OmegaConf.create(
        {"run_dir": str(tmp_path / "run"), "force": force, "seed": 1, "trainer": {"devices": 1}}
    )


def test_run_dir_records_config_overrides_sha_and_metrics(tmp_path):
    run = RunDir(_cfg(tmp_path), ["seed=1"])
    run.start()
    assert (run.path / "config.yaml").read_text().strip().startswith("run_dir:")
    assert OmegaConf.load(run.path / "overrides.yaml") == ["seed=1"]
    info = json.loads((run.path / "run.json").read_text())
    assert info["status"] == "running" and "git_sha" in info
    import xmodal

    assert info["xmodal_version"] == xmodal.__version__ != "0.0.0+unknown"
    assert not run.finished
    run.finish({"test/R@1": 12.5})
    assert is_finished(run.path)
    assert json.loads((run.path / "metrics.json").read_text()) == {"test/R@1": 12.5}
    assert json.loads((run.path / "run.json").read_text())["status"] == "done"


def test_forced_rerun_keeps_previous_results(tmp_path):
    run = RunDir(_cfg(tmp_path), [])
    run.start()
    (run.path / "checkpoints").mkdir()
    (run.path / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    run.finish({"x": 1})
    again = RunDir(_cfg(tmp_path, force=True), [])
    again.start()
    (kept,) = list((run.path / "previous").iterdir())
    assert json.loads((kept / "metrics.json").read_text()) == {"x": 1}
    assert (kept / "checkpoints" / "last.ckpt").read_bytes() == b"weights"
    assert json.loads((kept / "inputs.json").read_text())["complete"]
    assert not run.finished and not (run.path / "checkpoints").exists()
    assert json.loads((run.path / "run.json").read_text())["redo_reason"] == "force=true"
    again.finish({"x": 2})


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


def test_truncated_cache_entry_names_the_file_and_the_fix(tmp_path):
    cache = EmbeddingCache(tmp_path)
    path = cache.save({"k": 1}, {"emb": torch.zeros(4, 3)})
    path.write_bytes(path.read_bytes()[:40])  # truncated, as by a full disk or a bad copy
    with pytest.raises(BrokenFileError) as err:
        cache.load({"k": 1})
    message = str(err.value)
    assert str(path) in message and "evaluator.cache=false" in message and "rm " in message
    assert "weights_only" not in message


def _finished(tmp_path, cfg, files=()):
    """A finished run that read ``files`` (noted while recording)."""
    with inputs.recording() as used:
        run = RunDir(cfg, [])
        inputs.note(*files)
        run.start()
        run.finish({"m": 1.0}, used)
    return run


def test_finished_run_is_current_until_its_config_or_an_input_changes(tmp_path):
    image = tmp_path / "img.png"
    image.write_bytes(b"one")
    run = _finished(tmp_path, _cfg(tmp_path), [image])
    assert RunDir(_cfg(tmp_path), []).stale_reason() is None
    recorded = json.loads((run.path / "inputs.json").read_text())
    assert recorded["complete"] and recorded["files"] == {
        str(tmp_path): {"img.png": inputs.fingerprint(image)}
    }
    # settings that do not change the result (devices, paths, ...) leave it current
    neutral = OmegaConf.merge(_cfg(tmp_path), {"trainer": {"devices": 4}, "paths": {"x": "y"}})
    assert RunDir(neutral, []).stale_reason() is None
    changed_cfg = OmegaConf.merge(_cfg(tmp_path), {"seed": 2})
    assert RunDir(changed_cfg, []).stale_reason() == "its config changed (seed)"
    image.write_bytes(b"two")  # the same path, another content
    reason = RunDir(_cfg(tmp_path), []).stale_reason()
    assert reason is not None and str(image) in reason
    image.unlink()
    assert str(image) in RunDir(_cfg(tmp_path), []).stale_reason()


def test_run_without_inputs_record_is_stale(tmp_path):
    run = _finished(tmp_path, _cfg(tmp_path))
    (run.path / "inputs.json").unlink()
    assert "no record of its inputs" in RunDir(_cfg(tmp_path), []).stale_reason()


def test_second_process_on_a_run_dir_is_refused(tmp_path):
    first = RunDir(_cfg(tmp_path), [])
    first.start()  # holds run.lock (this live process)
    lock = first.path / "run.lock"
    holder = json.loads(lock.read_text())
    assert holder["pid"] == os.getpid()
    with pytest.raises(RunConflictError, match="is in use by pid"):
        RunLock(lock).acquire()
    first.finish({"x": 1})
    assert not lock.exists()


def test_killed_run_is_reported_and_its_lock_taken_over(tmp_path):
    run = RunDir(_cfg(tmp_path), [])
    run.start()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(dead.stdout)
    # as SIGKILL leaves it: status running, the lock of a process that no longer exists
    run.lock._stop.set()
    run.lock._thread = None
    lock = json.loads((run.path / "run.lock").read_text())
    (run.path / "run.lock").write_text(json.dumps({**lock, "pid": pid}))
    info = json.loads((run.path / "run.json").read_text())
    (run.path / "run.json").write_text(json.dumps({**info, "pid": pid}))
    again = RunDir(_cfg(tmp_path), [])
    again.start()
    info = json.loads((run.path / "run.json").read_text())
    assert info["status"] == "running" and info["pid"] == os.getpid()
    assert [a["pid"] for a in info["interrupted"]] == [pid]
    again.finish({"x": 1})


def test_stale_lock_by_age_is_taken_over(tmp_path, monkeypatch):
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "then"}))
    old = time.time() - 3600
    os.utime(path, (old, old))
    assert RunLock(path).acquire() == {"pid": 1, "host": "elsewhere", "since": "then"}


def test_unfinished_run_with_checkpoints_needs_resume_or_force(tmp_path):
    run = RunDir(_cfg(tmp_path), [])
    run.start()
    (run.path / "checkpoints").mkdir()
    (run.path / "checkpoints" / "last.ckpt").write_bytes(b"w")
    run.fail(RuntimeError("preempted"))
    with pytest.raises(RunConflictError, match="resume=auto"):
        RunDir(_cfg(tmp_path), []).start()
    assert not (run.path / "run.lock").exists()  # a refused start leaves no lock behind
    resumed = OmegaConf.merge(_cfg(tmp_path), {"resume": "auto"})
    RunDir(resumed, []).start()
    RunDir(resumed, []).lock.release()
    (run.path / "run.lock").unlink()
    other = OmegaConf.merge(_cfg(tmp_path), {"resume": "auto", "seed": 7})
    with pytest.raises(RunConflictError, match="another config"):
        RunDir(other, []).start()


def test_csv_logger_keeps_rows_before_the_resumed_epoch(tmp_path):
    from xmodal.loggers import CSVLogger

    first = CSVLogger(tmp_path, name="csv", version="")
    for epoch, step in ((0, 4), (1, 9), (2, 14)):
        first.log_metrics({"loss": float(step), "epoch": epoch}, step=step)
    first.log_metrics({"lr": 0.1}, step=12)
    first.save()
    resumed = CSVLogger(tmp_path, name="csv", version="")  # Lightning's would delete the file
    assert resumed.experiment.drop_from(2, 10) == 2  # epoch 2 and the lr row at step 12
    resumed.log_metrics({"loss": 14.5, "epoch": 2}, step=14)
    resumed.save()
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], r["loss"]) for r in rows] == [("0", "4.0"), ("1", "9.0"), ("2", "14.5")]


def test_content_digest_sees_a_replaced_file(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"1")
    b.write_bytes(b"22")
    before = inputs.content_digest([a, b])
    assert inputs.content_digest([a, b]) == before
    b.write_bytes(b"333")
    assert inputs.content_digest([a, b]) != before
    after = inputs.content_digest([a, b])
    b.write_bytes(b"444")  # the same size: the modification time tells
    os.utime(b, ns=(b.stat().st_atime_ns, b.stat().st_mtime_ns + 1_000_000))
    assert inputs.content_digest([a, b]) != after
