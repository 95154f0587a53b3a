"""What each reward-model task trains on: pairs (Bradley-Terry), ranked lists (listwise losses) or steps
(process reward models), as ``load`` / ``forward`` (batch to per-example losses and statistics) / ``summarize``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from posttrain import algorithms
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

if TYPE_CHECKING:
    from posttrain.trainers.reward_model import Config


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
