"""`make demo`'s sections: each one is found and documented, the runs of a section share one
process (Demo.sweep), and the opt-in ambiguity section costs nothing unless asked for."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_module():
    spec = importlib.util.spec_from_file_location("xmodal_demo", REPO / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Recording:
    """A Demo that records what a section would run instead of running it."""

    def __init__(self, only: list[str] | None = None) -> None:
        self.extra, self.only, self.calls = [], list(only or []), []

    def run(self, entry: str, overrides: list[str]) -> dict:
        self.calls.append((entry, overrides))
        raise RuntimeError("stop: recorded")

    sweep = run_dir = run


def test_every_section_is_found_in_order_and_documented(demo_module):
    found = demo_module.sections()
    assert list(found) == ["retrieval", "uclip", "probvlm", "ruir", "hug", "xmore", "ambiguity"]
    assert all(module.__doc__.strip() for module in found.values())


def test_the_ambiguity_section_runs_nothing_unless_asked(demo_module, monkeypatch, capsys):
    section = demo_module.sections()["ambiguity"].section
    monkeypatch.delenv("XMODAL_DEMO_AMBIGUITY", raising=False)
    demo = Recording()
    section(demo)  # make demo's default: skipped, so its time budget is the other sections'
    assert demo.calls == [] and "skipped" in capsys.readouterr().out
    for asked, env in ((Recording(["ambiguity"]), None), (Recording(), "1")):
        if env:
            monkeypatch.setenv("XMODAL_DEMO_AMBIGUITY", env)
        with pytest.raises(RuntimeError, match="recorded"):
            section(asked)
        assert asked.calls and "data.shapes_ambiguity=true" in asked.calls[0][1]


def test_sweep_runs_one_multirun_and_reads_back_every_job(demo_module, monkeypatch, tmp_path):
    """Demo.sweep: one `-m` command over the product of its axes; each job's metrics by values."""
    commands = []
    monkeypatch.setattr(demo_module.subprocess, "run", lambda cmd, **kw: commands.append(cmd))
    finished = {("a", "1"), ("b", "2")}
    monkeypatch.setattr(
        demo_module.Demo, "run_dir", lambda self, entry, overrides: tuple(overrides)
    )
    monkeypatch.setattr(demo_module, "is_finished", lambda d: (d[0][-1], d[1][-1]) in finished)
    monkeypatch.setattr(demo_module, "read_metrics", lambda d: {"job": d})
    demo = demo_module.Demo(["force=true"])
    got = demo.sweep("train", {"x": ["a", "b"], "y": ["1", "2"]}, ["z=3"], check=False)
    assert commands == [
        [sys.executable, "-m", "xmodal.cli.train", "-m", "x=a,b", "y=1,2", "z=3", "force=true"]
    ]
    assert list(got) == [("a", "1"), ("a", "2"), ("b", "1"), ("b", "2")]
    assert got["a", "1"] == {"job": ("x=a", "y=1", "z=3")} and got["a", "2"] is None
