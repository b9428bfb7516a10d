"""The two flows behind the CLIs: ``train(cfg)`` and ``evaluate(cfg)``.

Both: skip a finished run unless ``force``; record the run directory; build the backbone through
the one factory; drive the work with a Lightning Trainer; write ``metrics.json`` on rank 0; always
clean up (loggers finished) in ``finally``. The CLIs in ``xmodal.cli`` only compose and call these.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from xmodal.runs import RunDir, read_metrics

log = logging.getLogger("xmodal")


def _instantiate_group(node: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a logger/callbacks group node."""
    if not node:
        return []
    return [instantiate(v) for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]


def build_trainer(cfg: DictConfig, *, training: bool) -> pl.Trainer:
    """The Lightning Trainer of ``cfg.trainer`` with this run's loggers and callbacks."""
    kwargs: dict[str, Any] = {"default_root_dir": cfg.run_dir}
    if training:
        kwargs["logger"] = _instantiate_group(cfg.get("logger")) or False
        kwargs["callbacks"] = _instantiate_group(cfg.get("callbacks"))
    else:
        # evaluators shard their own data (xmodal.retrieval.encode.ShardSampler)
        kwargs.update(logger=False, enable_checkpointing=False, use_distributed_sampler=False)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg.update(kwargs)
    return instantiate(trainer_cfg)


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


def _prepare(cfg: DictConfig, overrides: Sequence[str]) -> tuple[RunDir, dict[str, Any] | None]:
    OmegaConf.resolve(cfg)  # sub-configs (e.g. the backbone) are used detached from the root
    run = RunDir(cfg, overrides)
    if run.finished and not cfg.force:
        log.info(
            "run %s is finished (metrics.json exists); skipping. Use force=true to redo.", run.path
        )
        return run, read_metrics(run.path)
    if cfg.get("print_config"):
        print(OmegaConf.to_yaml(cfg, resolve=True))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    from xmodal.data.datamodule import ensure_shapes_world

    ensure_shapes_world(cfg.data, cfg.paths.shapes_dir, rank=run.rank)
    run.start()
    return run, None


def evaluate(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run a training-free evaluator (``cfg.evaluator``) and return its metrics."""
    from xmodal import backbones
    from xmodal.evaluators.base import EvalContext
    from xmodal.retrieval.cache import EmbeddingCache

    run, done = _prepare(cfg, overrides)
    if done is not None:
        return done
    trainer = None
    try:
        model, preprocess, tokenizer = backbones.build(cfg.backbone)
        trainer = build_trainer(cfg, training=False)
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
        run.finish(metrics)
        return metrics
    except BaseException as err:
        run.fail(err)
        raise
    finally:
        _finish_loggers(trainer)


def train(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Fit ``cfg.method`` (a LightningModule class with ``from_config``), test it, return metrics."""
    run, done = _prepare(cfg, overrides)
    if done is not None:
        return done
    trainer = None
    try:
        method_cls = get_class(cfg.method._target_)
        module, datamodule = method_cls.from_config(cfg)
        trainer = build_trainer(cfg, training=True)
        ckpt_path = _resume_path(cfg)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics: dict[str, Any] = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")
        }
        if cfg.get("test_after_fit", True):
            trainer.test(module, datamodule=datamodule, verbose=False)
            metrics.update(
                {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
            )
        metrics.update(getattr(module, "extra_metrics", {}))
        run.finish(metrics)
        return metrics
    except BaseException as err:
        run.fail(err)
        raise
    finally:
        _finish_loggers(trainer)


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
