"""Pieces every recipe uses: the shared top of a recipe config, run directories, seeding, logs."""

from __future__ import annotations

import json
import logging
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from posttrain.config.schema import (
    CheckpointConfig,
    DataConfig,
    LearnerConfig,
    LoggingConfig,
    ModelConfig,
    TrainConfig,
    doc,
)
from posttrain.errors import TrainingDiverged, UserError

log = logging.getLogger("posttrain")


@dataclass
class RecipeConfig:
    """Keys every recipe has. Trainers extend it with their own sections."""

    trainer: str = doc("", "Which trainer runs this recipe (see `posttrain recipes`).")
    output_dir: str = doc("runs/default", "Run directory: metrics, plots, checkpoints, the resolved recipe.")
    seed: int = doc(0, "Seed for data order, initialisation and sampling.")
    resume: str = doc("never", "'auto': continue from the newest complete checkpoint in output_dir; 'never'; or a checkpoint path.")
    overwrite: bool = doc(False, "Allow starting afresh in an output_dir that already holds a run.")
    model: ModelConfig = doc(ModelConfig, "The model to train.")
    data: DataConfig = doc(DataConfig, "Training and evaluation data.")
    learner: LearnerConfig = doc(LearnerConfig, "DeepSpeed optimisation settings.")
    train: TrainConfig = doc(TrainConfig, "Loop length, batch sizes, evaluation cadence.")
    checkpoint: CheckpointConfig = doc(CheckpointConfig, "Checkpoint cadence and retention.")
    logging: LoggingConfig = doc(LoggingConfig, "Metrics sinks and plots.")

    def validate(self, source: str) -> None:
        if self.resume not in ("never", "auto") and not Path(self.resume).exists():
            raise UserError(f"resume in {source} must be 'auto', 'never' or an existing checkpoint path, got {self.resume!r}.")


def setup_logging(is_main: bool) -> None:
    """Our messages on rank 0; the engines' chatter only when it is a warning."""
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="[posttrain] %(message)s",
                        stream=sys.stderr, force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "httpx", "vllm", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def check_output_dir(cfg: RecipeConfig) -> None:
    """Refuse to mix a fresh run into a directory that holds another one."""
    out = Path(cfg.output_dir)
    holds_run = (out / "metrics.jsonl").exists() or (out / "checkpoints").exists()
    if holds_run and cfg.resume == "never" and not cfg.overwrite:
        raise UserError(
            f"output_dir {str(out)!r} already holds a run.",
            hint="Continue it with resume=auto, start afresh with overwrite=true, or choose another output_dir.",
        )


def prepare_output_dir(cfg: RecipeConfig, resolved: dict, is_main: bool) -> Path:
    """Create the run directory (after every check has passed) and store the resolved recipe."""
    import yaml

    out = Path(cfg.output_dir)
    if is_main:
        if cfg.overwrite and cfg.resume == "never":
            import shutil

            for name in ("checkpoints", "metrics.jsonl", "tensorboard", "plots", "summary.json"):
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    return out


def write_summary(out: Path, summary: dict) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


def eval_batches(examples: list, dist, batch_size: int):
    """This rank's share of an eval set in batches, as ``(batch, real)`` pairs.

    ZeRO-3 gathers weights inside every forward, so every rank must run the
    same number of passes: ranks that run out repeat a batch with ``real=False``
    (its results are discarded).
    """
    import math

    shard = examples[dist.rank :: dist.world_size]
    per_rank = math.ceil(len(examples) / dist.world_size)
    for start in range(0, per_rank, batch_size):
        batch = shard[start : start + batch_size]
        yield (batch, True) if batch else (examples[:1], False)


def accumulate_sums(sums: dict[str, float], values: dict) -> None:
    """Add each tensor's sum into ``sums`` (per-example metrics, reduced later)."""
    for key, value in values.items():
        sums[key] = sums.get(key, 0.0) + float(value.sum())


def global_sums(sums: dict[str, float]) -> dict[str, float]:
    """``sums`` summed over every rank (every rank must hold the same keys)."""
    from posttrain.distributed import all_reduce_sum

    keys = sorted(sums)
    return dict(zip(keys, all_reduce_sum([sums[k] for k in keys])))


def global_means(sums: dict[str, float], count: float) -> dict[str, float]:
    """Sum ``sums`` over ranks and divide by the global example count."""
    return {k: v / max(count, 1) for k, v in global_sums(sums).items()}


def check_finite_loss(loss: float, step: int, last_checkpoint: Path | None, *, setting: str | None = None) -> None:
    """Stop with a clear ``TrainingDiverged`` error when ``loss`` is NaN or infinite (``step`` is 1-based).

    ``loss`` must be the same number on every rank (a global mean), so that every rank stops together.
    """
    import math

    if math.isfinite(loss):
        return
    where = f"the last checkpoint, {last_checkpoint}, is intact" if last_checkpoint else "no checkpoint was written yet"
    hint = "Lower learner.lr, check the data, or train in fp32"
    hint += f", or set {setting}=skip to skip such updates (they are counted)." if setting else "."
    raise TrainingDiverged(f"the loss is {loss} at step {step}; the run stopped and {where}.", hint=hint)
