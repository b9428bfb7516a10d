"""The two flows behind the CLIs: ``train(cfg)`` and ``evaluate(cfg)``.

Both: skip a finished run unless ``force``; record the run directory; build the backbone through
the one factory; drive the work with a Lightning Trainer; write ``metrics.json`` on rank 0; always
clean up (loggers finished) in ``finally``. The CLIs in ``xmodal.cli`` only compose and call these.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from xmodal import inputs
from xmodal.data.world_manifest import outdated_world
from xmodal.runs import PREVIOUS_DIR, RunDir, read_metrics

if TYPE_CHECKING:  # Lightning is imported when a run really starts: skipping one stays fast
    import lightning.pytorch as pl

log = logging.getLogger("xmodal")


def _instantiate_group(node: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a logger/callbacks group node."""
    if not node:
        return []
    return [instantiate(v) for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]


def build_trainer(cfg: DictConfig, *, training: bool) -> pl.Trainer:
    """The Lightning Trainer of ``cfg.trainer`` with this run's loggers and callbacks.

    When stdout is not a terminal (a log file, SLURM output), Lightning's progress bar is replaced
    by plain periodic lines (``xmodal.callbacks.PlainProgress``). Training runs checkpoint on
    SIGTERM and on SLURM's requeue signal and carry the random state in their checkpoints, so
    ``resume=auto`` continues exactly (:mod:`xmodal.callbacks`). Inside a SLURM job Lightning
    joins the job's tasks (one per rank); its own auto-requeue (SIGUSR1, ``hpc_ckpt_*.ckpt``
    outside ``checkpoints/``) is off, the callbacks do that job.
    """
    from xmodal.callbacks import (
        BestWeightsAfterFit,
        CheckpointOnSignal,
        ConfigInCheckpoint,
        ExactResume,
        PlainProgress,
    )
    from xmodal.loggers import ContinueLogs

    kwargs: dict[str, Any] = {"default_root_dir": cfg.run_dir}
    callbacks: list[Any] = []
    if training:
        kwargs["logger"] = _instantiate_group(cfg.get("logger")) or False
        callbacks = [
            ContinueLogs(),  # first: before any callback logs a row for the first batch
            *_instantiate_group(cfg.get("callbacks")),
            ConfigInCheckpoint(cfg),
            ExactResume(),
            CheckpointOnSignal(cfg.run_dir),
        ]
        test_ckpt = cfg.get("test_ckpt", "best")
        if test_ckpt not in ("best", "last"):
            raise ValueError(f"test_ckpt must be best or last, got {test_ckpt!r}")
        if test_ckpt == "best":
            callbacks.append(BestWeightsAfterFit())
    else:
        # evaluators shard their own data (xmodal.retrieval.encode.ShardSampler); their metrics
        # reach the loggers at the end (_log_evaluation)
        kwargs.update(logger=False, enable_checkpointing=False, use_distributed_sampler=False)
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        kwargs["plugins"] = [SLURMEnvironment(auto_requeue=False)]
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_cfg.get("enable_progress_bar", True) and not sys.stdout.isatty():
        trainer_cfg["enable_progress_bar"] = False
        callbacks.append(PlainProgress())
    trainer_cfg.update(kwargs, callbacks=callbacks)
    return instantiate(trainer_cfg)


def _log_evaluation(cfg: DictConfig, metrics: dict[str, Any], run: RunDir) -> None:
    """Send an evaluator's metrics, config and plots (``<run_dir>/*.png``, e.g. uCLIP's
    calibration and rejection plots) to the configured loggers (rank 0)."""
    loggers = _instantiate_group(cfg.get("logger")) if run.rank == 0 else []
    if not loggers:
        return
    numeric = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    images = sorted(run.path.glob("*.png"))
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        logger.log_metrics(numeric, step=0)
        for path in images:
            _log_image(logger, path)
        logger.finalize("success")


def _log_image(logger: Any, path: Path) -> None:
    """One plot to a logger that takes images (W&B, TensorBoard); others (CSV) skip it."""
    if hasattr(logger, "log_image"):  # WandbLogger
        logger.log_image(key=f"plots/{path.stem}", images=[str(path)])
    elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
        import numpy as np
        from PIL import Image

        pixels = np.asarray(Image.open(path).convert("RGB"))
        logger.experiment.add_image(f"plots/{path.stem}", pixels, dataformats="HWC")


def _finish_loggers(trainer: pl.Trainer | None) -> None:
    if trainer is None:
        return
    for logger in trainer.loggers:
        finalize = getattr(logger, "finalize", None)
        if finalize is not None:
            try:
                finalize("success")
            except Exception:  # noqa: BLE001 - cleanup must not mask the real error
                log.exception("could not finalise logger %s", type(logger).__name__)
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except ImportError:
        pass


#: Config keys whose files are noted by their readers (data loaders), not by the config walk.
_NOT_WALKED = ("paths", "run_dir", "data", "logger", "callbacks", "hydra")


def _prepare(
    cfg: DictConfig, overrides: Sequence[str], splits: Sequence[str | None]
) -> tuple[RunDir, dict[str, Any] | None]:
    """Skip a current finished run; otherwise check the data (``splits``) and take the run
    directory. Call inside :func:`xmodal.inputs.recording`, so what it reads is recorded."""
    OmegaConf.resolve(cfg)  # sub-configs (e.g. the backbone) are used detached from the root
    run = RunDir(cfg, overrides)
    if run.finished and not cfg.force:
        reason = outdated_world(cfg.data, cfg.paths.get("shapes_dir")) or run.stale_reason()
        if reason is None:
            log.info(
                "run %s is finished and its config and inputs are unchanged; skipping. Use "
                "force=true to redo it.",
                run.path,
            )
            return run, read_metrics(run.path)
        run.redo_reason = reason
        log.warning(
            "run %s is finished, but %s: redoing it (its old results move to %s/)",
            run.path,
            reason,
            PREVIOUS_DIR,
        )
    if cfg.get("print_config"):
        print(OmegaConf.to_yaml(cfg, resolve=True))
    check_slurm_allocation(cfg.trainer)
    import lightning.pytorch as pl

    from xmodal.console import adopt_library_loggers

    adopt_library_loggers()  # Lightning's own console handlers, added on import: through ours
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    from xmodal.data.datamodule import check_data, ensure_shapes_world

    check_extras(cfg)
    ensure_shapes_world(cfg.data, cfg.paths.shapes_dir, rank=run.rank)
    check_data(cfg.data, splits)  # a broken dataset stops here, before any model is built
    inputs.note_config_files(OmegaConf.to_container(cfg, resolve=True), skip=_NOT_WALKED)
    run.start()
    log.info("%s %s: run directory %s", cfg.task, cfg.run_name, run.path)
    return run, None


def check_extras(cfg: DictConfig) -> None:
    """Stop before any work when the run needs an optional package that is not installed, with
    the one line naming the extra that installs it (:mod:`xmodal.extras`)."""
    from xmodal import extras

    targets = [str(v.get("_target_", "")) for v in (cfg.get("logger") or {}).values()]
    if any("Wandb" in t for t in targets):
        extras.check("wandb")
    if cfg.backbone.kind in ("blip", "blip2"):
        extras.check("transformers")
    if "xmore" in str(cfg.get("evaluator", {}).get("_target_", "")):
        extras.check("faiss")


def evaluate(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run a training-free evaluator (``cfg.evaluator``) and return its metrics."""
    with inputs.recording() as used:
        run, done = _prepare(cfg, overrides, [cfg.data.split])
        if done is not None:
            return done
        return _evaluate(cfg, run, used)


def _evaluate(cfg: DictConfig, run: RunDir, used: inputs.InputLog) -> dict[str, Any]:
    from xmodal import backbones
    from xmodal.evaluators.base import EvalContext
    from xmodal.retrieval.cache import EmbeddingCache

    trainer = None
    try:
        model, preprocess, tokenizer = backbones.build(cfg.backbone)
        trainer = build_trainer(cfg, training=False)
        _note_trainer(run, trainer)
        evaluator = instantiate(cfg.evaluator)
        ctx = EvalContext(
            cfg=cfg,
            trainer=trainer,
            model=model,
            preprocess=preprocess,
            tokenizer=tokenizer,
            cache=EmbeddingCache(cfg.paths.cache_dir),
            run_dir=Path(cfg.run_dir),
        )
        metrics = evaluator.evaluate(ctx)
        metrics.update(_ambiguity_metrics(cfg, run))
        _log_evaluation(cfg, metrics, run)
        run.finish(metrics, used)
        return metrics
    except BaseException as err:
        run.fail(err)
        raise
    finally:
        _finish_loggers(trainer)


def train(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Fit ``cfg.method`` (a LightningModule with ``from_config``), test it, return metrics."""
    data = cfg.data
    with inputs.recording() as used:
        run, done = _prepare(cfg, overrides, [data.train_split, data.val_split, data.split])
        if done is not None:
            return done
        return _train(cfg, run, used)


def _train(cfg: DictConfig, run: RunDir, used: inputs.InputLog) -> dict[str, Any]:
    trainer = None
    try:
        method_cls = get_class(cfg.method._target_)
        module, datamodule = method_cls.from_config(cfg)
        trainer = build_trainer(cfg, training=True)
        _note_trainer(run, trainer)
        ckpt_path = _resume_path(cfg)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics: dict[str, Any] = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")
        }
        from xmodal.callbacks import monitored_checkpoint

        best = monitored_checkpoint(trainer)
        if best is not None and best.best_model_score is not None:  # the epoch test_ckpt=best uses
            metrics[f"val/best/{best.monitor.split('/', 1)[-1]}"] = float(best.best_model_score)
        if cfg.get("test_after_fit", True):
            trainer.test(module, datamodule=datamodule, verbose=False)
            metrics.update(
                {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
            )
        metrics.update(getattr(module, "extra_metrics", {}))
        metrics.update(_ambiguity_metrics(cfg, run))
        run.finish(metrics, used)
        return metrics
    except BaseException as err:
        run.fail(err)
        raise
    finally:
        _finish_loggers(trainer)


def _ambiguity_metrics(cfg: DictConfig, run: RunDir) -> dict[str, Any]:
    """How the run's per-query uncertainties track the ambiguity its data records (the shapes
    world with ``data.shapes_ambiguity=true``): one place for every method
    (:func:`xmodal.protocols.uncertainty.ambiguity_metrics`); rank 0, which wrote them."""
    if run.rank != 0:
        return {}
    from xmodal.protocols.uncertainty import ambiguity_metrics

    return ambiguity_metrics(cfg.data, run.path)


def _note_trainer(run: RunDir, trainer: pl.Trainer) -> None:
    """Record how the run is spread: world size and who started its processes (Lightning's
    cluster environment: SLURMEnvironment under SLURM, LightningEnvironment when it spawns)."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    run.note(
        world_size=trainer.world_size,
        cluster_environment=type(environment).__name__ if environment is not None else None,
    )


def _resume_path(cfg: DictConfig) -> str | None:
    resume = cfg.get("resume")
    if not resume:
        return None
    if resume == "auto":
        last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(resume).is_file():
        raise FileNotFoundError(
            f"resume={resume}: no such checkpoint file. Use resume=auto to "
            "continue from <run_dir>/checkpoints/last.ckpt."
        )
    return str(resume)


def _slurm_tasks_per_node() -> int | None:
    """SLURM_NTASKS_PER_NODE, or the first count of SLURM_TASKS_PER_NODE (e.g. ``4(x2)``)."""
    value = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    if not value:
        return None
    return int(value.split("(")[0].split(",")[0])


def check_slurm_allocation(trainer_cfg: DictConfig) -> None:
    """Inside a SLURM job, the allocation must match ``trainer.devices`` x ``trainer.num_nodes``.

    Lightning would otherwise hang or run with a different world size than the config says.
    """
    if "SLURM_JOB_ID" not in os.environ or os.environ.get("SLURM_JOB_NAME") in (
        "bash",
        "interactive",
    ):
        return
    nodes = int(os.environ.get("SLURM_NNODES", os.environ.get("SLURM_JOB_NUM_NODES", "1")))
    tasks = _slurm_tasks_per_node()
    devices = trainer_cfg.devices
    problems = []
    if nodes != trainer_cfg.num_nodes:
        problems.append(f"SLURM gave {nodes} node(s) but trainer.num_nodes={trainer_cfg.num_nodes}")
    if tasks is not None and isinstance(devices, int) and tasks != devices:
        problems.append(f"SLURM runs {tasks} task(s) per node but trainer.devices={devices}")
    if problems:
        raise RuntimeError(
            "SLURM allocation and trainer config disagree: " + "; ".join(problems) + ". Launch "
            "with `launcher=slurm`, which takes nodes and tasks per node from trainer.num_nodes "
            "and trainer.devices, or fix the sbatch script (--nodes, --ntasks-per-node)."
        )


def load_run(run_dir: str | Path, checkpoint: str = "best") -> Any:
    """Rebuild a trained method from its run directory, without the original command line.

    Reads the resolved config stored in the checkpoint (``checkpoints/best.ckpt``, or ``last``, or
    a path), builds the method through its ``from_config`` and loads the weights with
    ``weights_only=True``. Returns the LightningModule in eval mode with ``.config`` attached.
    """
    import torch

    run_dir = Path(run_dir)
    path = (
        Path(checkpoint)
        if checkpoint.endswith(".ckpt")
        else (run_dir / "checkpoints" / f"{checkpoint}.ckpt")
    )
    if not path.is_file():
        found = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
        raise FileNotFoundError(
            f"no checkpoint {path}; found {found or 'none'} in "
            f"{run_dir / 'checkpoints'}. Is {run_dir} a training run?"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "xmodal_config" not in state:
        raise ValueError(f"{path} holds no xmodal_config: it was not written by xmodal-train")
    cfg = OmegaConf.create(state["xmodal_config"])
    module, _ = get_class(cfg.method._target_).from_config(cfg)
    module.load_state_dict(state["state_dict"])
    module.eval()
    module.config = cfg
    return module
