"""The run harness: run directory, checkpoints, resume and metrics for one recipe run.

A component every recipe holds (composition, not a base class): the recipe
keeps its own explicit loop and calls ``save``/``restore``/``log``/``finish``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from posttrain.checkpoint import Checkpointer, model_identity
from posttrain.config.loader import to_dict
from posttrain.distributed import DistInfo, broadcast_object
from posttrain.errors import UserError
from posttrain.learner.save import save_hf_model
from posttrain.metrics import MetricsLogger
from posttrain.trainers.common import RecipeConfig, check_output_dir, prepare_output_dir, write_summary

log = logging.getLogger("posttrain")


def run_identity(cfg: RecipeConfig, **extra: Any) -> dict[str, Any]:
    """What must match for a checkpoint to belong to this run."""
    return {"trainer": cfg.trainer, "model": model_identity(cfg.model.path), "data": cfg.data.path,
            "seed": cfg.seed, "global_batch_size": cfg.train.global_batch_size, "lora": cfg.model.lora.enabled,
            **extra}


class RunHarness:
    def __init__(self, cfg: RecipeConfig, dist: DistInfo, identity: dict[str, Any]) -> None:
        self.cfg = cfg
        self.dist = dist
        # Rank 0 decides and tells the others: a rank that looked later would see the
        # directory rank 0 is about to create and wrongly call it another run.
        verdict = None
        if dist.is_main:
            try:
                check_output_dir(cfg)
            except UserError as err:
                verdict = err
        verdict = broadcast_object(verdict)
        if verdict is not None:
            raise verdict
        self.checkpointer = Checkpointer(Path(cfg.output_dir), rank=dist.rank, keep_last=cfg.checkpoint.keep_last,
                                         identity=identity)
        self.resume_from = self.checkpointer.find_resume(cfg.resume)
        self.out = prepare_output_dir(cfg, to_dict(cfg), dist.is_main)
        self.history: dict[str, Any] = {}
        self.start_step = 0
        self.last_checkpoint: Path | None = None
        self.metrics: MetricsLogger | None = None

    def restore(self, learner, *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Load the learner (and the ``extra`` learners, by name), RNG and history from the resume
        checkpoint; returns its trainer state."""
        if self.resume_from is None:
            return {}
        learner.load_state(str(self.resume_from / "state"))
        for name, other in (extra or {}).items():
            other.load_state(str(self.resume_from / f"{name}_state"))
        self.checkpointer.load_rng(self.resume_from)
        state = self.checkpointer.trainer_state(self.resume_from)
        self.history = state.get("history", {})
        self.start_step = int(state["step"])
        self.last_checkpoint = self.resume_from
        log.info("resumed from %s at step %d", self.resume_from, self.start_step)
        return state

    def open_metrics(self) -> MetricsLogger:
        self.metrics = MetricsLogger(self.out, self.cfg.logging, enabled=self.dist.is_main, run_name=self.out.name,
                                     resume_step=self.start_step if self.resume_from else None,
                                     config=to_dict(self.cfg))
        return self.metrics

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        assert self.metrics is not None, "open_metrics() first"
        self.metrics.log(step, metrics)

    def save(self, step: int, learner, tokenizer, *, state: dict[str, Any] | None = None, model_kind: str = "causal_lm",
             extra: dict[str, Any] | None = None) -> Path:
        """A complete checkpoint of ``learner`` at ``step``; collective.

        ``extra`` learners (e.g. ``{"critic": critic}``) are saved alongside: the Hugging Face model as
        ``<name>/`` and the DeepSpeed state as ``<name>_state/``; ``restore(extra=...)`` reads them back.
        """
        lora = self.cfg.model.lora
        scaling = lora.alpha / lora.r if lora.enabled else None
        extra = extra or {}

        def write_model(directory: Path) -> None:
            save_hf_model(learner.module, directory, tokenizer=tokenizer, is_main=self.dist.is_main,
                          lora_scaling=scaling, save_merged=lora.save_merged)
            for name, other in extra.items():
                save_hf_model(other.module, directory, tokenizer=tokenizer, is_main=self.dist.is_main, name=name)

        def write_state(directory: str | Path) -> None:
            learner.save_state(str(directory))
            for name, other in extra.items():
                other.save_state(str(Path(directory).parent / f"{name}_state"))

        trainer_state = {"history": self.history, "model_kind": model_kind, **(state or {})}
        self.last_checkpoint = self.checkpointer.save(step, trainer_state, write_model, write_state)
        return self.last_checkpoint

    def finish(self, summary: dict[str, Any], plot_groups: list[list[str]] | None = None) -> dict[str, Any]:
        plots = self.metrics.close(plot_groups) if self.metrics else []
        summary = {"trainer": self.cfg.trainer, **summary,
                   "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                   "plots": [str(p) for p in plots]}
        if self.dist.is_main:
            write_summary(self.out, summary)
            if summary["checkpoint"]:
                log.info("checkpoint: %s", summary["checkpoint"])
            if plots:
                log.info("plots: %s", self.out / "plots")
        return summary


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "train"):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True)


def should_checkpoint(cfg: RecipeConfig, done: int, total: int) -> bool:
    every = cfg.checkpoint.every_n_steps
    return bool((every and done % every == 0) or (done == total and cfg.checkpoint.save_final))
