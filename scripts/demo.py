"""`make demo`: the whole framework on the synthetic shapes world, offline, on a CPU.

Each section (``scripts/demo_sections/NN_<name>.py``, run in file-name order) calls the real
command-line entry points (`xmodal-train`, `xmodal-eval`) in their deterministic run directories
(a finished run is reused, so a second `make demo` is fast), then prints the metrics read back
from each run's metrics.json. A section is a function ``section(demo)`` using ``demo.run``,
``demo.sweep`` (several runs in one process) and ``demo.table`` below.

    python scripts/demo.py                    # every section
    python scripts/demo.py --only retrieval   # one section
    python scripts/demo.py force=true         # extra overrides for every run
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from xmodal.config import compose  # noqa: E402
from xmodal.runs import is_finished, read_metrics  # noqa: E402


class Demo:
    """What a section gets: ``run`` an entry point, print a ``table``; ``extra`` overrides;
    ``only``: the sections asked for by name (an opt-in section runs when named)."""

    def __init__(self, extra: list[str], only: list[str] | None = None) -> None:
        self.extra = extra
        self.only = list(only or [])

    def run(self, entry: str, overrides: list[str]) -> dict:
        """Run `python -m xmodal.cli.<entry> overrides...` and return its metrics.json."""
        overrides = [*overrides, *self.extra]
        print(f"\n$ xmodal-{entry} {' '.join(overrides)}", flush=True)
        t0 = time.time()
        subprocess.run(
            [sys.executable, "-m", f"xmodal.cli.{entry}", *overrides], check=True, cwd=REPO
        )
        print(f"  ({time.time() - t0:.0f} s)", flush=True)
        return read_metrics(compose(entry, overrides).run_dir)

    def sweep(
        self, entry: str, axes: dict[str, list[str]], fixed: list[str] = (), check: bool = True
    ) -> dict[tuple[str, ...], dict | None]:
        """One Hydra multirun over the product of ``axes`` (``key -> values``) plus ``fixed``.

        The jobs run one after another in one process, so torch, Lightning and open_clip are
        imported once (about 9 s a command on 2 cores) instead of once per job. Returns each job's
        metrics.json keyed by its values, in the order of ``axes``; with ``check=False`` a failed
        job maps to None instead of stopping the demo.
        """
        swept = [f"{key}={','.join(values)}" for key, values in axes.items()]
        overrides = [*swept, *fixed, *self.extra]
        print(f"\n$ xmodal-{entry} -m {' '.join(overrides)}", flush=True)
        t0 = time.time()
        cmd = [sys.executable, "-m", f"xmodal.cli.{entry}", "-m", *overrides]
        subprocess.run(cmd, check=check, cwd=REPO)
        print(f"  ({time.time() - t0:.0f} s)", flush=True)
        results = {}
        for values in itertools.product(*axes.values()):
            job = [f"{key}={value}" for key, value in zip(axes, values)]
            run_dir = self.run_dir(entry, [*job, *fixed])
            results[values] = read_metrics(run_dir) if is_finished(run_dir) else None
        return results

    def run_dir(self, entry: str, overrides: list[str]) -> Path:
        return Path(compose(entry, [*overrides, *self.extra]).run_dir)

    @staticmethod
    def table(title: str, header: list[str], rows: list[list]) -> None:
        print(f"\n{title}")
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        fmt = " | ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
        print(fmt.format(*header))
        print("-|-".join("-" * w for w in widths))
        for row in rows:
            print(fmt.format(*[str(x) for x in row]))


def sections() -> dict[str, ModuleType]:
    """``name -> module`` of every ``scripts/demo_sections/NN_<name>.py``, in file order."""
    found = {}
    for path in sorted((REPO / "scripts" / "demo_sections").glob("[0-9]*_*.py")):
        spec = importlib.util.spec_from_file_location(f"demo_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        found[path.stem.split("_", 1)[1]] = module
    return found


def main() -> None:
    available = sections()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=sorted(available), nargs="*", help="sections to run")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    demo = Demo(args.overrides, args.only)
    t0 = time.time()
    for name in args.only or available:
        print(f"\n=== {name}: {available[name].__doc__.strip().splitlines()[0]}")
        available[name].section(demo)
    print(f"\ndemo finished in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
