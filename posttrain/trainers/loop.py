"""The one training loop every recipe runs, offline (SFT, DPO, KTO, RM, PRM) and online (GRPO, PPO).

The recipe supplies three callables: ``step(step) -> metrics`` (one optimizer step offline, one rollout step
online), ``evaluate() -> metrics`` and ``save(done)``. The loop owns the cadence: an evaluation at the start,
every ``train.eval_every`` steps and at the end; metrics every ``train.log_every`` steps and at every
evaluation; checkpoints per ``checkpoint.*``; the fault hook; the progress bar; the summary.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from posttrain.distributed import DistInfo
from posttrain.faults import maybe_kill
from posttrain.trainers.harness import RunHarness, progress_bar, should_checkpoint

log = logging.getLogger("posttrain")


def train_loop(cfg, dist: DistInfo, run: RunHarness, total_steps: int, step_fn: Callable[[int], dict],
               evaluate: Callable[[], dict], save: Callable[[int], None],
               plot_groups: list[list[str]] | Callable[[], list[list[str]]], *,
               progress_keys: tuple[str, ...] = ("loss",), eval_prefix: str = "eval/",
               summary: Callable[[dict, dict], dict] | None = None) -> dict[str, Any]:
    """Run steps ``run.start_step .. total_steps - 1`` and return the run's summary.

    ``evaluate``'s metrics are logged as ``<eval_prefix><name>``; the first and last evaluations are kept in the
    run's history (checkpointed) as ``eval_start`` / ``eval_end``. ``progress_keys``: the step metrics shown on
    the progress bar. ``summary(eval_start, eval_end)``: extra summary keys of the recipe. ``plot_groups``: the
    metrics plotted together, or a callable giving them at the end (when they depend on what was logged).
    """
    if run.start_step == 0:
        run.history["eval_start"] = evaluate()
        run.log(0, {f"{eval_prefix}{k}": v for k, v in run.history["eval_start"].items()})
    progress = progress_bar(total_steps, run.start_step, dist.is_main and cfg.logging.progress)
    started = time.perf_counter()
    for step in range(run.start_step, total_steps):
        metrics = step_fn(step)
        done = step + 1
        evaluated = bool(cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == total_steps
        if evaluated:
            evaluation = evaluate()
            metrics.update({f"{eval_prefix}{k}": v for k, v in evaluation.items()})
            if done == total_steps:
                run.history["eval_end"] = evaluation
        if done % cfg.train.log_every == 0 or evaluated:
            run.log(done, metrics)
        progress.update(1)
        progress.set_postfix({key.split("/")[-1]: f"{metrics[key]:.4f}" for key in progress_keys if key in metrics})
        if should_checkpoint(cfg, done, total_steps):
            save(done)
        maybe_kill(done)
    progress.close()
    start, end = run.history.get("eval_start", {}), run.history.get("eval_end", {})
    if dist.is_main and end:
        log.info("eval: %s", ", ".join(f"{k} {start.get(k, math.nan):.3f} -> {v:.3f}" for k, v in end.items()
                                       if isinstance(v, (int, float))))
    extra = summary(start, end) if summary is not None else {}
    return run.finish({"steps": total_steps, "eval_start": start, "eval_end": end, **extra,
                       "train_seconds": round(time.perf_counter() - started, 2)},
                      plot_groups() if callable(plot_groups) else plot_groups)


def train_online(recipe, plot_groups: list[list[str]]) -> dict:
    """``train_loop`` for an online recipe: its ``rl_step`` per rollout step, its rollouts' ``evaluate`` and its
    ``save``, with the reward and throughput on the progress bar."""
    return train_loop(recipe.cfg, recipe.dist, recipe.run, recipe.total_steps, recipe.rl_step,
                      recipe.rollouts.evaluate, recipe.save, plot_groups,
                      progress_keys=("reward/mean", "time/samples_per_s"))
