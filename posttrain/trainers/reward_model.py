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
from posttrain.data.listwise import (
    ListwiseExample,
    collate_listwise,
    list_scores,
    load_listwise,
    rm_data_kind,
)
from posttrain.data.preference import PreferenceExample, collate_preference, load_pairs
from posttrain.data.process import ProcessExample, collate_process, load_process
from posttrain.data.tokenize import IGNORE
from posttrain.distributed import DistInfo
from posttrain.errors import ConfigError
from posttrain.learner import build_learner
from posttrain.learner.engine import apply_lora
from posttrain.models.heads import load_scoring_model
from posttrain.trainers import offline
from posttrain.trainers.common import RecipeConfig, global_sums
from posttrain.trainers.harness import RunHarness, run_identity
from posttrain.trainers.loop import train_loop
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


class PairwiseTask:
    """Outcome RM: one score per sequence, Bradley-Terry over (chosen, rejected)."""

    head = "sequence"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def load(self, tokenizer):
        return load_pairs(self.cfg.data, self.cfg.seed, tokenizer)

    def forward(self, learner, examples: list[PreferenceExample], pad_token_id: int) -> dict[str, torch.Tensor]:
        """Per-pair losses and the statistics averaged over pairs."""
        batch = collate_preference(examples, pad_token_id)
        scores = learner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        chosen, rejected = scores.float().chunk(2)
        margins = torch.tensor([e.margin or 0.0 for e in examples]) if self.cfg.rm.use_margin else None
        losses = algorithms.bradley_terry_loss(chosen, rejected, margin=margins,
                                               center_coefficient=self.cfg.rm.center_coefficient)
        return {"loss": losses, "accuracy": (chosen > rejected).float(), "margin": (chosen - rejected).detach(),
                "reward/chosen": chosen.detach(), "reward/rejected": rejected.detach()}

    @staticmethod
    def summarize(totals: dict[str, float], count: float) -> dict[str, float]:
        """Global sums -> metrics: means over pairs."""
        return {k: v / max(count, 1.0) for k, v in totals.items()}


class ListwiseTask:
    """Outcome RM on ranked lists: one score per completion, a listwise ranking loss per prompt.

    All completions of a micro-batch's lists go through one forward; their scores are placed into
    [lists, K_max] with shorter lists masked, and ``listwise_ranking_loss`` (``rm.ranking_loss``) gives one
    loss per list. Labels (higher = better) are the rows' scores, or K - rank (``posttrain.data.listwise``)."""

    head = "sequence"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def load(self, tokenizer):
        return load_listwise(self.cfg.data, self.cfg.seed, tokenizer,
                             nonnegative=self.cfg.rm.ranking_loss == "softmax")

    def forward(self, learner, examples: list[ListwiseExample], pad_token_id: int) -> dict[str, torch.Tensor]:
        """Per-list losses and statistics: ordered pairs with different labels and how many the scores order
        right, whether the top score is a best-labelled completion, best-minus-worst mean score."""
        batch = collate_listwise(examples, pad_token_id)
        flat = learner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        mask, labels = batch["mask"], batch["labels"]
        scores = list_scores(flat.float(), mask)
        losses = algorithms.listwise_ranking_loss(scores, labels, mask, method=self.cfg.rm.ranking_loss)
        return {"loss": losses, **listwise_stats(scores.detach(), labels, mask)}

    @staticmethod
    def summarize(totals: dict[str, float], count: float) -> dict[str, float]:
        """Global sums -> metrics: loss, top-1 accuracy and margin per list; accuracy per ordered pair."""
        lists = max(count, 1.0)
        return {"loss": totals.get("loss", 0.0) / lists,
                "accuracy": totals.get("pairs_correct", 0.0) / max(totals.get("pairs", 0.0), 1.0),
                "top1_accuracy": totals.get("top1", 0.0) / lists, "margin": totals.get("margin", 0.0) / lists}


def listwise_stats(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per list [B], for scores, labels and mask [B, K]: ``pairs`` (ordered pairs (i, j) with label_i > label_j),
    ``pairs_correct`` (of those, how many have score_i > score_j), ``top1`` (1 if the highest-scored completion
    has the list's highest label) and ``margin`` (mean score of the best-labelled minus of the worst-labelled)."""
    valid = mask.unsqueeze(2) & mask.unsqueeze(1)
    better = (labels.unsqueeze(2) > labels.unsqueeze(1)) & valid
    right = better & (scores.unsqueeze(2) > scores.unsqueeze(1))
    neg_inf = torch.full_like(scores, -torch.inf)
    top = torch.where(mask, scores, neg_inf).argmax(dim=1, keepdim=True)
    best_label = torch.where(mask, labels, neg_inf).max(dim=1, keepdim=True).values
    worst_label = torch.where(mask, labels, -neg_inf).min(dim=1, keepdim=True).values
    best, worst = mask & (labels == best_label), mask & (labels == worst_label)
    zero = torch.zeros_like(scores)
    margin = (torch.where(best, scores, zero).sum(1) / best.sum(1).clamp(min=1)
              - torch.where(worst, scores, zero).sum(1) / worst.sum(1).clamp(min=1))
    return {"pairs": better.sum((1, 2)).float(), "pairs_correct": right.sum((1, 2)).float(),
            "top1": (labels.gather(1, top) == best_label).squeeze(1).float(), "margin": margin}


class StepTask:
    """PRM: a 2-way label at each step's last token; p(step is good) = softmax(logits)[1]."""

    head = "token"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def load(self, tokenizer):
        return load_process(self.cfg.data, self.cfg.seed, tokenizer, self.cfg.prm.separator)

    def forward(self, learner, examples: list[ProcessExample], pad_token_id: int) -> dict[str, torch.Tensor]:
        """Per-example losses (mean over its steps) and per-example step counts (summed later)."""
        batch = collate_process(examples, pad_token_id)
        logits = learner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        at_step = batch["step_labels"] != IGNORE
        per_position = algorithms.process_reward_loss(logits, batch["step_labels"], at_step)
        counts = at_step.sum(dim=1).float()
        losses = per_position.sum(dim=1) / counts.clamp(min=1)  # each example: mean over its steps
        step_logits = logits[at_step]  # [steps, 2], example by example
        good = (batch["step_labels"][at_step] >= 0.5).float()
        owner = at_step.nonzero()[:, 0]
        correct = ((step_logits[:, 1] > step_logits[:, 0]).float() == good).float()
        per_example = torch.zeros(len(examples))
        return {"loss": losses, "steps": counts, "steps_correct": per_example.index_add(0, owner, correct),
                "steps_positive": per_example.index_add(0, owner, good)}

    @staticmethod
    def summarize(totals: dict[str, float], count: float) -> dict[str, float]:
        """Global sums -> metrics: loss per example; accuracy and positive rate per step, and the accuracy of
        the best constant predictor, max(p, 1 - p), that a useful PRM must beat."""
        steps = max(totals.get("steps", 0.0), 1.0)
        positive = totals.get("steps_positive", 0.0) / steps
        return {"loss": totals.get("loss", 0.0) / max(count, 1.0), "step_accuracy": totals.get("steps_correct", 0.0) / steps,
                "step_positive_rate": positive, "constant_baseline": max(positive, 1 - positive)}


TASKS = {"rm": PairwiseTask, "prm": StepTask}


def make_task(cfg: Config) -> PairwiseTask | ListwiseTask | StepTask:
    """The task of ``cfg.trainer``; for ``rm``, listwise when the data has ``completions`` (one kind per run)."""
    if cfg.trainer == "rm" and rm_data_kind(cfg.data) == "listwise":
        return ListwiseTask(cfg)
    return TASKS[cfg.trainer](cfg)


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

