"""Config schemas, resolvers and `compose()` for use outside `@hydra.main`.

YAML under ``conf/`` is the readable source; the dataclasses here are the schemas that check it.
Every group option starts with ``defaults: [_schema, _self_]`` so that a mistyped key fails at
compose time (struct mode), whether it comes from a YAML file or a command-line override.

Run directories are deterministic: ``<paths.output_dir>/<task>/<run_name>/<run_hash>`` where
``run_name`` is the experiment (``default`` without one) and ``run_hash`` hashes the sorted
command-line overrides that change the result (not ``force``, ``resume``, logger or device counts).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from xmodal.errors import ConfigError

# ----------------------------------------------------------------------------------------------
# Where the configs live
# ----------------------------------------------------------------------------------------------


def conf_dir() -> Path:
    """The config folder: env ``XMODAL_CONF_DIR``, else the one installed with the package
    (``xmodal/conf``; in a clone a link to the repository's ``conf/``)."""
    env = os.environ.get("XMODAL_CONF_DIR")
    path = Path(env) if env else Path(__file__).resolve().parent / "conf"
    if not (path / "train.yaml").is_file():
        raise FileNotFoundError(
            f"xmodal configs not found at {path} (expected train.yaml and eval.yaml there). "
            "Reinstall xmodal (`pip install .` ships them), or set XMODAL_CONF_DIR to a folder "
            "laid out like the repository's conf/."
        )
    return path


# ----------------------------------------------------------------------------------------------
# Run identity
# ----------------------------------------------------------------------------------------------

#: Config keys that do not change a run's result: they change neither its directory (as
#: overrides) nor whether a finished run is current (``xmodal.runs.result_config``).
NEUTRAL_KEYS = (
    "force",
    "resume",
    "print_config",
    "verbose",
    "hydra",
    "logger",
    "paths",
    "tags",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.accelerator",
    "trainer.strategy",
    "trainer.enable_progress_bar",
    "data.num_workers",
)
#: Overrides that do not change a run's directory: the neutral keys, plus the experiment (it
#: names the directory already) and the launcher (where the job runs).
NEUTRAL_OVERRIDE_PREFIXES = (*NEUTRAL_KEYS, "experiment", "launcher")


def _override_key(override: str) -> str:
    key = override.split("=", 1)[0]
    return key.lstrip("+~")


def canonical_override(override: str) -> str:
    """``key=value`` with the value parsed by Hydra's grammar, so ``x=false`` and ``x=False``
    (or an interpolation and its escaped form in a sweep job) name the same run."""
    import json

    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        (parsed,) = OverridesParser.create().parse_overrides([override])
        value = parsed.value()
    except Exception:  # noqa: BLE001 - an unparsable override is hashed as written
        return override
    prefix = {"ADD": "+", "FORCE_ADD": "++", "DEL": "~"}.get(parsed.type.name, "")
    return f"{prefix}{parsed.key_or_group}={json.dumps(value, sort_keys=True, default=str)}"


def run_hash(overrides: Sequence[str] | None) -> str:
    """Short stable hash of the result-changing overrides (order- and spelling-insensitive)."""
    kept = sorted(
        canonical_override(o)
        for o in (overrides or [])
        if not any(
            _override_key(o) == p
            or _override_key(o).startswith(p + ".")
            or _override_key(o).startswith(p + "/")
            for p in NEUTRAL_OVERRIDE_PREFIXES
        )
    )
    return hashlib.sha1("\n".join(kept).encode()).hexdigest()[:10] if kept else "base"


def _current_run_hash() -> str:
    """``run_hash`` of this job's command-line overrides, read unresolved from HydraConfig (so an
    interpolation in an override is hashed as written, the same in a single run and a sweep)."""
    from hydra.core.hydra_config import HydraConfig

    return run_hash(OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False))


def _run_name(experiment: str | None) -> str:
    return str(experiment) if experiment not in (None, "None", "null", "") else "default"


def _flag(name: str, value: Any) -> bool:
    if str(value).lower() not in ("true", "false", "none", "0", "1"):
        raise ConfigError(f"data.{name} must be true or false, got {value!r}")
    return str(value).lower() in ("true", "1")


def shapes_variant(ambiguity: Any, pool_noise: Any = 0.0, train: Any = False, seed: Any = 0) -> str:
    """The suffix of the shapes world's folder: "" (default world), or "-ambiguity" followed by
    "-noise<p>" and "-train" when set (``data.shapes_ambiguity``, ``data.shapes_pool_noise``,
    ``data.shapes_ambiguity_train``), then "-seed<k>" for a world drawn from another seed than 0
    (``data.shapes_seed``)."""
    try:
        seed = int(seed or 0)
    except ValueError:
        raise ConfigError(f"data.shapes_seed must be an integer >= 0, got {seed!r}") from None
    if seed < 0:
        raise ConfigError(f"data.shapes_seed must be an integer >= 0, got {seed}")
    return _ambiguity_variant(ambiguity, pool_noise, train) + (f"-seed{seed}" if seed else "")


def _ambiguity_variant(ambiguity: Any, pool_noise: Any, train: Any) -> str:
    noise = float(pool_noise or 0.0)
    ambiguous, train = _flag("shapes_ambiguity", ambiguity), _flag("shapes_ambiguity_train", train)
    if not ambiguous:
        for name, value in (("shapes_pool_noise", noise), ("shapes_ambiguity_train", train)):
            if value:
                raise ConfigError(
                    f"data.{name}={value} only applies to the ambiguity world: add "
                    "data.shapes_ambiguity=true"
                )
        return ""
    if not 0.0 <= noise <= 1.0:
        raise ConfigError(f"data.shapes_pool_noise must be in [0, 1], got {noise}")
    return "-ambiguity" + (f"-noise{noise:g}" if noise else "") + ("-train" if train else "")


def _register_resolvers() -> None:
    from xmodal.slurm import register_resolvers as register_slurm_resolvers

    register_slurm_resolvers()  # xmodal.slurm_tasks, xmodal.slurm_gpus, xmodal.times
    if not OmegaConf.has_resolver("xmodal.run_hash"):
        OmegaConf.register_new_resolver("xmodal.run_hash", _current_run_hash)
    if not OmegaConf.has_resolver("xmodal.run_name"):
        OmegaConf.register_new_resolver("xmodal.run_name", _run_name)
    if not OmegaConf.has_resolver("xmodal.shapes_variant"):
        OmegaConf.register_new_resolver("xmodal.shapes_variant", shapes_variant)
    if not OmegaConf.has_resolver("xmodal.wandb_id"):
        # one logger run id per run directory: a resumed job logs into the same W&B run
        OmegaConf.register_new_resolver(
            "xmodal.wandb_id", lambda run_dir: hashlib.sha1(str(run_dir).encode()).hexdigest()[:16]
        )


# ----------------------------------------------------------------------------------------------
# Schemas
# ----------------------------------------------------------------------------------------------


@dataclass
class PathsConfig:
    root_dir: str = "."
    data_dir: str = MISSING
    output_dir: str = MISSING
    shapes_dir: str = MISSING
    cache_dir: str = MISSING
    checkpoint_dir: str = MISSING


@dataclass
class DataConfig:
    """One dataset split. ``family`` picks the loader module in ``xmodal.data``."""

    name: str = MISSING
    family: str = MISSING  # coco | flickr30k | fashioniq | cirr | imagenet | coop
    root: str = MISSING
    split: str = "test"
    train_split: str = "train"
    val_split: str | None = "val"
    format: str = "auto"
    dataset: str | None = None  # imagenet variant or CoOp dataset name
    num_classes: int | None = None  # imagenet family: class folders required; None = official
    categories: list[str] = field(default_factory=list)  # FashionIQ categories
    protocol: str = "clip4cir"  # FashionIQ evaluation protocol (datasets/cir.md §1.3)
    remove_reference: bool | None = None
    shapes_world: str | None = None  # small | medium: write the shapes world here if missing
    shapes_ambiguity: bool = False  # the ambiguity world (per-item ambiguity.json) instead
    shapes_pool_noise: float = 0.0  # ambiguity world: share of X-MoRe pool captions that are wrong
    shapes_ambiguity_train: bool = False  # ambiguity world: training splits ambiguous too
    shapes_seed: int = 0  # the seed the shapes world is drawn from (folder suffix -seed<k>)
    shapes_variant: str = ""  # "", "-ambiguity[-noise<p>][-train]", then "-seed<k>" if k != 0
    shapes_dir: str | None = None  # the shapes world read: paths.shapes_dir + shapes_variant
    batch_size: int = 64
    num_workers: int = 0
    on_corrupt: str = "fail"  # fail | skip
    preload: bool = False  # decode + transform all training images once (small datasets)
    # coco test: folder of the ECCV Caption / CxC ground truth in eccv_caption's layout
    # ("eccv_caption": the package's bundled files; null: no extended-positive evaluation)
    extended_positives: str | None = None
    plausible_matches: str | None = None  # folder of PCME's pm_*.json (PMRP); null: no PMRP


@dataclass
class TrainerConfig:
    _target_: str = "lightning.pytorch.Trainer"
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    max_epochs: int = 1
    max_steps: int = -1
    min_epochs: int | None = None
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    limit_predict_batches: Any = None
    check_val_every_n_epoch: int = 1
    log_every_n_steps: int = 10
    gradient_clip_val: float | None = None
    accumulate_grad_batches: int = 1
    deterministic: bool = False
    enable_progress_bar: bool = True
    enable_model_summary: bool = False
    num_sanity_val_steps: int = 0
    use_distributed_sampler: bool = True
    val_check_interval: Any = None
    overfit_batches: Any = 0.0
    fast_dev_run: Any = False
    detect_anomaly: bool = False
    profiler: Any = None


@dataclass
class _BaseRunConfig:
    task: str = MISSING
    seed: int = 0
    force: bool = False
    resume: str | None = None  # null | auto | <path to a checkpoint>
    print_config: bool = False
    verbose: bool = False  # tracebacks of expected failures, library INFO logs
    run_name: str = MISSING
    run_hash: str = MISSING
    run_dir: str = MISSING
    paths: Any = MISSING
    data: Any = MISSING
    backbone: Any = MISSING
    trainer: Any = MISSING
    logger: Any = None
    callbacks: Any = None
    tags: list[str] = field(default_factory=list)


@dataclass
class TrainRunConfig(_BaseRunConfig):
    method: Any = MISSING
    test_after_fit: bool = True
    test_ckpt: str = "best"  # best | last: the weights tested (and exported) after fit


@dataclass
class EvalRunConfig(_BaseRunConfig):
    evaluator: Any = MISSING


def _group_schemas() -> dict[str, type]:
    from xmodal.backbones.config import BackboneConfig

    return {
        "paths": PathsConfig,
        "data": DataConfig,
        "trainer": TrainerConfig,
        "backbone": BackboneConfig,
    }


#: Schemas of the options of polymorphic groups, as ``"module:Class"`` (imported lazily), stored as
#: ``<group>/_schema_<name>``; the option's YAML starts with ``defaults: [_schema_<name>, _self_]``.
#: A method or evaluator module defines its own schema dataclass next to its code.
OPTION_SCHEMAS: dict[tuple[str, str], str] = {
    ("evaluator", "retrieval"): "xmodal.evaluators.schemas:RetrievalEvaluatorConfig",
    ("evaluator", "uclip"): "xmodal.evaluators.schemas:UCLIPConfig",
    ("evaluator", "zeroshot"): "xmodal.evaluators.schemas:ZeroShotConfig",
    ("evaluator", "xmore"): "xmodal.evaluators.schemas:XMoReConfig",
    ("method", "clip_pretrain"): "xmodal.methods.schemas:ClipPretrainConfig",
    ("method", "ruir"): "xmodal.methods.schemas:RUIRConfig",
    ("method", "hug"): "xmodal.methods.schemas:HUGConfig",
    ("method", "probvlm"): "xmodal.methods.schemas:ProbVLMConfig",
}


def _load_schema(path: str) -> type:
    """Import ``"module:Class"`` (a torch-free schema module)."""
    import importlib

    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def register_configs() -> None:
    """Register every schema in Hydra's ConfigStore (idempotent)."""
    _register_resolvers()
    cs = ConfigStore.instance()
    cs.store(name="_schema_train", node=TrainRunConfig)
    cs.store(name="_schema_eval", node=EvalRunConfig)
    for group, schema in _group_schemas().items():
        cs.store(group=group, name="_schema", node=schema)
    for (group, name), path in OPTION_SCHEMAS.items():
        cs.store(group=group, name=f"_schema_{name}", node=_load_schema(path))
    # stores hydra/launcher=xmodal_slurm; only with the slurm extra (the CLI names the extra to
    # install when launcher=slurm is asked for without it)
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None:
        import hydra_plugins.xmodal_slurm  # noqa: F401


# ----------------------------------------------------------------------------------------------
# Additions (`+key=value`) to schema-checked configs
# ----------------------------------------------------------------------------------------------

#: Groups whose options are free-form dicts of ``_target_`` entries: additions are how they grow.
OPEN_GROUPS = ("hydra", "logger", "callbacks")


def _schema_node(config_name: str, group: str | None, choice: str | None) -> Any:
    """The registered schema of a group option (None when the option has none)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    if group is None:
        name = f"_schema_{config_name}.yaml"
    elif group in ("paths", "data", "trainer", "backbone"):  # cf. _group_schemas()
        name = f"{group}/_schema.yaml"
    else:
        name = f"{group}/_schema_{choice}.yaml"
    try:
        return cs.load(name).node
    except Exception:  # noqa: BLE001 - no schema registered for this option
        return None


def check_additions(overrides: Sequence[str], choices: Any, config_name: str) -> None:
    """Refuse ``+key=value`` / ``++key=value`` for a key that the schema of its config does not
    have. Hydra adds such a key silently and nothing reads it (``+data.batchsize=3`` leaves
    ``data.batch_size`` unchanged), which defeats the typo check the schemas give."""
    import difflib

    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if not (override.is_add() or override.is_force_add()):
            continue
        key = override.key_or_group
        parts = key.split(".")
        if parts[0] in OPEN_GROUPS or (len(parts) == 1 and (conf_dir() / key).is_dir()):
            continue  # an open group, or a group option added by the defaults list
        group = parts[0] if len(parts) > 1 and (conf_dir() / parts[0]).is_dir() else None
        node = _schema_node(config_name, group, choices.get(group) if group else None)
        field_name = parts[1] if group else parts[0]
        if node is None or field_name in node:
            continue
        where = f"{group}={choices.get(group)}" if group else f"{config_name}.yaml"
        known = [k for k in node if not str(k).startswith("_")]
        close = difflib.get_close_matches(field_name, known, n=1)
        hint = ""
        if close:
            hint = " Did you mean " + ".".join([group, close[0]] if group else close) + "?"
        raise ConfigError(
            f"override {override.input_line}: {field_name!r} is not a key of {where}, whose "
            f"schema checks every key; `+` would add it and nothing would read it.{hint} "
            f"Known keys: {', '.join(map(str, known))}."
        )


# ----------------------------------------------------------------------------------------------
# compose() outside @hydra.main
# ----------------------------------------------------------------------------------------------


def compose(config_name: str = "train", overrides: Sequence[str] | None = None) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with overrides, as the CLI would (tests, notebooks).

    The returned config has the ``hydra`` node removed and ``HydraConfig`` set, so interpolations
    such as the run directory resolve exactly as under ``xmodal-train`` / ``xmodal-eval``.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    register_configs()
    overrides = list(overrides or [])
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=overrides, return_hydra_config=True)
    check_additions(overrides, cfg.hydra.runtime.choices, config_name)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.resolve(cfg)
    return cfg


def open_dict(cfg: DictConfig):
    """`omegaconf.open_dict`, re-exported so callers need one import."""
    from omegaconf import open_dict as _open_dict

    return _open_dict(cfg)


def list_configs(group: str, pattern: str = "*") -> list[str]:
    """Names of the YAML options of a config group (``experiment`` is searched recursively).
    Files named ``_<name>.yaml`` are parts the options share (``data/_shapes``), not options."""
    import fnmatch

    base = conf_dir() / group
    paths = [p for p in base.rglob("*.yaml") if not p.name.startswith("_")]
    names = sorted(str(p.relative_to(base).with_suffix("")) for p in paths)
    return [n for n in names if fnmatch.fnmatch(n, pattern)]
