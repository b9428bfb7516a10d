"""``xmodal-train --help`` / ``xmodal-eval --help``: what the program does, the config groups and
their options, the experiments of this entry point, and example commands.

Read from the config folder's file names only (no composition, no torch), so it answers at once.
Hydra's own help stays behind ``--hydra-help``.
"""

from __future__ import annotations

import re
from pathlib import Path

from xmodal.config import conf_dir

ABOUT = {
    "train": (
        "xmodal-train",
        "fit a trainable method (RUIR, HUG, the tiny CLIP's pretraining) and test its best "
        "checkpoint",
        "method",
        [
            "xmodal-train experiment=shapes/clip_pretrain",
            "xmodal-train experiment=hug/fashioniq_dress trainer=gpu",
            "xmodal-train -m experiment=ruir/shapes_fashioniq seed=0,1,2",
        ],
    ),
    "eval": (
        "xmodal-eval",
        "run a training-free evaluator (uCLIP, X-MoRe, zero-shot, retrieval) on a dataset",
        "evaluator",
        [
            "xmodal-eval experiment=shapes/retrieval_untrained",
            "xmodal-eval experiment=uclip/coco_mcd_top1_consistency trainer=gpu",
            "xmodal-eval -m experiment=shapes/retrieval data.batch_size=32,64",
        ],
    ),
}
GROUPS = ("data", "backbone", "{kind}", "trainer", "logger", "callbacks", "launcher", "debug")


def _options(group: str) -> list[str]:
    folder = conf_dir() / group
    names = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
    return [n for n in names if not n.startswith("_")]


def _with_bases(base: Path, path: Path) -> str:
    """An experiment file's text and that of the shared experiments it includes
    (``/experiment/<name>`` in its defaults list, e.g. ``xmore/_rn50``)."""
    text = path.read_text()
    for name in re.findall(r"/experiment/([\w/]+)", text):
        text += _with_bases(base, base / f"{name}.yaml")
    return text


def _experiments(kind: str) -> dict[str, list[str]]:
    """Experiment names of this entry point (those overriding ``/method`` or ``/evaluator``, or
    including a shared experiment that does), by folder; ``_``-prefixed files are shared parts."""
    base = conf_dir() / "experiment"
    wanted = re.compile(rf"override /{kind}\b")
    found: dict[str, list[str]] = {}
    for path in sorted(base.rglob("*.yaml")):
        if not path.name.startswith("_") and wanted.search(_with_bases(base, path)):
            name = str(path.relative_to(base).with_suffix(""))
            found.setdefault(name.split("/")[0], []).append(name)
    return found


def _wrap(words: list[str], indent: int, width: int = 100) -> str:
    lines, line = [], ""
    for word in words:
        if line and len(line) + 2 + len(word) > width - indent:
            lines.append(line + ",")
            line = word
        else:
            line = f"{line}, {word}" if line else word
    lines.append(line)
    return ("\n" + " " * indent).join(lines)


def render(config_name: str) -> str:
    program, what, kind, examples = ABOUT[config_name]
    out = [
        f"{program}: {what}.",
        "",
        f"usage: {program} [-m] [group=option] [key=value] ...",
        f"       {program} --cfg job [overrides]    print the composed config and exit",
        f"       {program} --version | --hydra-help",
        "",
        "config groups (group=option):",
    ]
    for group in GROUPS:
        group = group.format(kind=kind)
        out.append(f"  {group:<10} {_wrap(_options(group), 13)}")
    out += ["", "experiments (experiment=<name>, the rows of the papers' tables):"]
    for folder, names in _experiments(kind).items():
        shown = [n for n in names if n.count("/") == 1][:4] or names[:4]
        more = f" (+{len(names) - len(shown)} more)" if len(names) > len(shown) else ""
        out.append(f"  {folder:<10} {_wrap(shown, 13)}{more}")
    out += [
        "",
        "common keys: seed=0 force=true (redo a finished run) verbose=true print_config=true"
        + (" resume=auto" if config_name == "train" else ""),
        "",
        "examples:",
        *[f"  {e}" for e in examples],
        "",
        f"configs: {conf_dir()} (README.md: runs, outputs, real data and weights)",
    ]
    return "\n".join(out)
