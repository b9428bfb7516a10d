"""Imports point one way (DESIGN.md, "Rules of the architecture"): every ``xmodal`` import in
``src/xmodal``, read with ``ast`` (lazy imports inside functions and ``TYPE_CHECKING`` blocks
included), goes from a layer to a lower one, never up and never sideways to another unit of the
same layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "xmodal"

#: Top to bottom. A unit (a subpackage or a top-level module of ``xmodal``) may import its own
#: modules and any unit of a lower layer; units of one layer do not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("cli",),
    ("pipeline", "tables"),  # the two flows behind the CLIs; paper tables from run directories
    ("callbacks", "loggers"),  # what the pipeline gives the Lightning Trainer
    ("methods", "evaluators"),
    ("protocols",),  # the official evaluation protocols methods and evaluators share
    ("runs", "distributed", "console"),  # run directories and files, DDP gathers, logging
    ("metrics",),
    # data loaders read data; retrieval searches (and encodes, caches, indexes): neither imports
    # the other, nor backbones nor probabilistic
    ("data", "retrieval", "backbones", "probabilistic"),
    # compose() and the torch-free schemas (the modules of SCHEMAS); optional-dependency checks
    ("config", "extras"),
    ("slurm",),  # SLURM request fitting and resolvers (torch-free: config registers them)
    ("inputs", "errors"),  # file fingerprints of run inputs; the error types every layer raises
]
#: Torch-free schema modules: they belong to the config layer, not to their package.
SCHEMAS = {"xmodal.backbones.config", "xmodal.methods.schemas", "xmodal.evaluators.schemas"}
#: ``xmodal/__init__.py`` is the public facade (``xmodal.load_run``, ``__version__``): it may
#: reach into the pipeline, and anything may read the version from it.
FACADE = "xmodal"

LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """The layer unit of a module name: the schema modules are ``config``, the rest their
    top-level subpackage or module (``xmodal.data.cir`` -> ``data``)."""
    if module in SCHEMAS:
        return "config"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else FACADE


def _imports(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """``(line, imported xmodal module)`` of every import statement of a module's source."""
    package = module if is_package else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:  # `from xmodal import backbones` imports a submodule
                sub = SRC.parent / f"{base}.{alias.name}".replace(".", "/")
                is_module = sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file()
                found.append((node.lineno, f"{base}.{alias.name}" if is_module else base))
    found = [(line, name) for line, name in found if name.split(".")[0] == "xmodal"]
    return list(dict.fromkeys(found))


def arrows_up(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Every import that points back up or sideways, as ``module:line  a -> b (...)``;
    ``sources`` maps a module name to (its source, whether it is a package)."""
    bad = []
    for module, (source, is_package) in sources.items():
        src = _unit(module)
        if src == FACADE:
            continue
        for line, target in _imports(source, module, is_package):
            dst = _unit(target)
            if dst in (src, FACADE):
                continue
            if LAYER_OF[dst] <= LAYER_OF[src]:
                kind = "sideways" if LAYER_OF[dst] == LAYER_OF[src] else "up"
                bad.append(f"{module}:{line}  -> {target} ({src} -> {dst}, {kind})")
    return bad


def _sources() -> dict[str, tuple[str, bool]]:
    return {
        _module_name(p): (p.read_text(encoding="utf-8"), p.name == "__init__.py")
        for p in sorted(SRC.rglob("*.py"))
    }


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _sources()} - {FACADE}
    assert units <= set(LAYER_OF), f"place {sorted(units - set(LAYER_OF))} in LAYERS"


def test_imports_point_one_way():
    bad = arrows_up(_sources())
    assert not bad, "imports against the layer order (LAYERS in tests/test_imports.py):\n" + (
        "\n".join(bad)
    )


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from xmodal.metrics.retrieval import a", "xmodal.metrics.retrieval"),
        ("from xmodal import runs", "xmodal.runs"),
        ("from xmodal import __version__", "xmodal"),
        ("from . import images", "xmodal.data.images"),
        ("from ..retrieval.search import topk", "xmodal.retrieval.search"),
        ("def f():\n    import xmodal.protocols.cir", "xmodal.protocols.cir"),
        ("if TYPE_CHECKING:\n    from xmodal.pipeline import train", "xmodal.pipeline"),
    ],
)
def test_the_walk_sees_every_kind_of_import(source, expected):
    assert [name for _, name in _imports(source, "xmodal.data.x", False)] == [expected]


def test_an_arrow_back_up_or_sideways_is_reported():
    sources = {
        "xmodal.data.cir": ("from xmodal.metrics.retrieval import recall_from_ranks", False),
        "xmodal.retrieval.x": ("from xmodal.data.images import open_image", False),
        "xmodal.methods.x": ("from xmodal.evaluators.retrieval import f", False),
        "xmodal.backbones.config": ("from xmodal.backbones.weights import read_file", False),
        "xmodal.protocols.x": ("from xmodal.data.cir import EvalSubset\nimport xmodal", False),
    }
    bad = arrows_up(sources)
    assert [b.split("  ")[0] for b in bad] == [
        "xmodal.data.cir:1",  # data -> metrics: up
        "xmodal.retrieval.x:1",  # retrieval -> data: sideways
        "xmodal.methods.x:1",  # methods -> evaluators: sideways
        "xmodal.backbones.config:1",  # a schema (config layer) -> backbones: up
    ]
