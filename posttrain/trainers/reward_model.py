"""Scoring-model training: outcome reward models (``trainer: rm``) and process reward models (``trainer: prm``).

Supports:
  - rm: ``AutoModelForSequenceClassification`` (one score), Bradley-Terry loss with an optional
    per-pair ``margin`` column and reward centring; eval pairwise accuracy. The saved model is the
    ``orm`` reward of ``reward_models`` unchanged.
  - rm on listwise data (rows with ``completions`` and ``ranks`` or ``scores``, K >= 2 per prompt): a
    ranking loss of ``RANKING_LOSSES`` over each list (``rm.ranking_loss``: LiPO-lambda, ListMLE,
    RankNet's pairwise logistic, ListNet-style softmax); eval pairwise accuracy over every ordered pair
    with different labels and top-1 accuracy. Same model, same ``orm`` reward.
  - prm: ``AutoModelForTokenClassification`` (2 labels), per-step binary cross-entropy at step positions
    with hard labels or soft Monte-Carlo values; eval per-step accuracy against a constant predictor.
    The saved model is the ``prm`` reward unchanged (input convention in ``posttrain.data.process``).
  - from a causal LM checkpoint (new, seeded head) or a scoring checkpoint; DeepSpeed ZeRO 0-3, LoRA,
    1..N processes, checkpoints and ``resume=auto``

Assumes:
  - rm: paired data ``prompt``, ``chosen``, ``rejected`` (strings or message lists), optional ``margin``;
    or listwise data ``prompt``, ``completions``, ``ranks`` | ``scores`` (``posttrain.data.listwise``), one
    kind per run
  - prm: ``prompt``, ``completions`` (steps), ``labels`` (bool or [0, 1] per step)

Training language models to follow instructions with human feedback (Ouyang et al., 2022);
Rank analysis of incomplete block designs: the method of paired comparisons (Bradley & Terry, 1952);
Let's Verify Step by Step (Lightman et al., 2023); Math-Shepherd (Wang et al., 2024);
LiPO: Listwise Preference Optimization through Learning-to-Rank (Liu et al., 2024).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from posttrain import algorithms
from posttrain.config.schema import doc
from posttrain.distributed import DistInfo
from posttrain.errors import ConfigError
from posttrain.learner import build_learner
from posttrain.learner.engine import apply_lora
from posttrain.models.heads import load_scoring_model
from posttrain.trainers import offline
from posttrain.trainers.common import RecipeConfig, global_sums
from posttrain.trainers.harness import RunHarness, run_identity
from posttrain.trainers.loop import train_loop
from posttrain.trainers.reward_model_tasks import ListwiseTask, PairwiseTask, StepTask, make_task
from reward_models.prm import DEFAULT_SEPARATOR

log = logging.getLogger("posttrain")

# Module names of the scoring heads transformers puts on a causal LM (Llama, Qwen, Mistral: score; others: classifier).
SCORING_HEADS = ("score", "classifier")


@dataclass
class RMSettings:
    use_margin: bool = doc(True, "Use the data's `margin` column when present: loss = -log sigmoid(r_c - r_r - margin).")
    center_coefficient: float = doc(0.0, "Reward centring: adds coef * mean((r_c + r_r)^2) (Eisenstein et al., 2023).")
    ranking_loss: str = doc("lambda", "Loss on listwise data (rows with `completions` and `ranks` or `scores`): "
                            "lambda (LiPO-lambda), listmle, pairwise_logistic or softmax (any RANKING_LOSSES name; "
                            "docs/preference-data.md).")

    def validate(self, source: str) -> None:
        if self.ranking_loss not in algorithms.RANKING_LOSSES:
            raise ConfigError(f"rm.ranking_loss in {source}: {algorithms.RANKING_LOSSES.unknown_message(self.ranking_loss)}")


@dataclass
class PRMSettings:
    separator: str = doc(DEFAULT_SEPARATOR, "Text appended to the prompt and to every step; a step's score is read at its last token.")


@dataclass
class Config(RecipeConfig):
    rm: RMSettings = field(default_factory=RMSettings, metadata={"help": "Reward-model loss settings (trainer: rm)."})
    prm: PRMSettings = field(default_factory=PRMSettings, metadata={"help": "Process-reward settings (trainer: prm)."})


def preflight(cfg: Config, world_size: int, source: str) -> None:
    task = make_task(cfg)
    unit = {PairwiseTask: "pairs", ListwiseTask: "lists", StepTask: "examples"}[type(task)]
    offline.preflight(cfg, world_size, source, task.load, unit)


class Recipe:
    def __init__(self, cfg: Config, dist: DistInfo, source: str = "the recipe") -> None:
        self.cfg, self.dist, self.source = cfg, dist, source
        self.task = make_task(cfg)

    def setup(self) -> None:
        cfg = self.cfg
        self.data = offline.setup_data(cfg, self.dist, self.source, self.task.load)
        self.tokenizer, self.train_set, self.eval_set = self.data.tokenizer, self.data.train_set, self.data.eval_set
        self.total_steps = self.data.total_steps
        model = load_scoring_model(cfg.model, self.task.head, self.tokenizer.pad_token_id)
        if cfg.model.lora.enabled:
            # Adapters on the backbone and the (new) head in full; the usable scoring model is then the merged one.
            model = apply_lora(model, cfg.model.lora, task_type=None, train_in_full=SCORING_HEADS)
            if not cfg.model.lora.save_merged:
                cfg.model.lora.save_merged = True
                log.info("LoRA: checkpoints hold the merged scoring model (<checkpoint>/merged; the head trains in "
                         "full, so the adapter alone does not score)")
        self.learner = build_learner(model, cfg.learner, world_size=self.dist.world_size,
                                     micro_batch_size=cfg.train.micro_batch_size, grad_accum=self.data.grad_accum,
                                     total_steps=self.total_steps)
        listwise = {"task": "listwise", "ranking_loss": cfg.rm.ranking_loss} if isinstance(self.task, ListwiseTask) else {}
        self.run = RunHarness(cfg, self.dist, run_identity(cfg, head=self.task.head, **listwise))
        self.run.history["skipped_rows"] = self.data.skipped
        self.run.restore(self.learner)
        self.run.open_metrics()

    def train(self) -> dict:
        def plots() -> list[list[str]]:
            end = self.run.history.get("eval_end") or self.run.history.get("eval_start") or {}
            return [[k, f"eval/{k}"] for k in sorted(end)]

        return train_loop(self.cfg, self.dist, self.run, self.total_steps, self.train_step, self.evaluate, self.save,
                          plots, summary=lambda start, end: {"skipped_rows": self.run.history.get("skipped_rows")})

    def save(self, done: int) -> None:
        self.run.save(done, self.learner, self.tokenizer, state={"total_steps": self.total_steps},
                      model_kind=f"{self.task.head}_classification")

    def batch_losses(self, examples: list, _ids: list[int]) -> tuple[torch.Tensor, dict]:
        stats = self.task.forward(self.learner, examples, self.tokenizer.pad_token_id)
        return stats["loss"], stats

    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        micro_batches = offline.micro_batch_ids(self.data, step, self.dist, cfg.train.micro_batch_size)
        sums = offline.optimizer_step(self.learner, self.data, micro_batches, self.batch_losses,
                                      cfg.train.global_batch_size, self.dist.world_size)
        metrics = self.task.summarize(global_sums(sums), cfg.train.global_batch_size)
        return offline.step_metrics(metrics, self.learner, step, self.run.last_checkpoint)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.eval_set:
            return {}
        sums, count = offline.evaluation_sums(
            self.learner, self.data, self.dist, self.cfg.train.eval_batch_size,
            lambda examples, _ids, _real: self.task.forward(self.learner, examples, self.tokenizer.pad_token_id))
        return self.task.summarize(global_sums(sums), count)

