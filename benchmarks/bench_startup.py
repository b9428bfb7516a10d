"""Benchmark: how long the command line takes before it does any work.

Researchers launch xmodal hundreds of times per sweep, and re-run sweeps whose jobs are mostly
finished, so the start-up of a command is paid over and over. Commands, each a fresh process:

  bare      ``python -c "import hydra, omegaconf"``: the floor of any Hydra program;
  help      ``xmodal-eval --help``;
  cfg       ``xmodal-eval --cfg job experiment=shapes/retrieval`` (compose and print);
  skip      re-running a finished shapes run (``experiment=shapes/retrieval_untrained``), which
            finds its result current and skips it.

Timing: the commands run round-robin ``--repeats`` times (so each sees the same background load)
and the median wall time of each is printed with its ratio to ``bare``. Targets: ``cfg`` and
``skip`` at most 3x ``bare``. The finished run is made once beforehand in a temporary output
folder. Run: ``python benchmarks/bench_startup.py`` (exit code 0 whether targets are met or not).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import SRC

TARGET = 3.0
SHAPES = ["data.shapes_world=small", "trainer=cpu"]


def _commands() -> dict[str, list[str]]:
    py, cli = sys.executable, [sys.executable, "-m", "xmodal.cli.eval"]
    return {
        "bare": [py, "-c", "import hydra, omegaconf"],
        "help": [*cli, "--help"],
        "cfg": [*cli, "--cfg", "job", "experiment=shapes/retrieval"],
        "skip": [*cli, "experiment=shapes/retrieval_untrained", *SHAPES],
    }


def _run(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "XMODAL_OUTPUT": str(Path(tmp) / "outputs"),
            "XMODAL_DATA": os.environ.get("XMODAL_DATA", str(Path(tmp) / "data")),
            "HF_HUB_OFFLINE": "1",
        }
        commands = _commands()
        _run(commands["skip"], env)  # the finished run that later runs skip (and the world)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, cmd in commands.items():
                times[name].append(_run(cmd, env))
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"command start-up, median of {args.repeats} round-robin runs (fresh processes)")
    print(f"{'command':<8} {'median s':>9} {'x bare':>7}  target")
    for name, seconds in median.items():
        ratio = seconds / median["bare"]
        target = f"<= {TARGET:.0f}x {'met' if ratio <= TARGET else 'MISSED'}"
        shown = target if name in ("cfg", "skip") else ""
        print(f"{name:<8} {seconds:>9.2f} {ratio:>7.2f}  {shown}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    sys.exit(main(parser.parse_args()))
