"""``prm``: a process reward model scores each step of a completion.

Model convention (shared with posttrain's ``prm`` trainer, so a trained PRM scores unchanged):

  - the checkpoint is a local directory holding an ``AutoModelForTokenClassification`` with
    2 labels (0 = the step is wrong, 1 = the solution is still correct after this step) and
    its tokenizer;
  - input ids (``build_prm_inputs``): the prompt followed by the separator, then each step
    followed by the separator, each of these pieces tokenised on its own with
    ``add_special_tokens=False`` (so a step boundary never merges into one token):

        ids = tok(prompt + sep) + tok(step_1 + sep) + tok(step_2 + sep) + ...

    a conversational prompt (a message list) is first rendered with the tokenizer's chat
    template and ``add_generation_prompt=True``;
  - the score of step j is ``softmax(logits[p_j])[1]``, where ``p_j`` is the position of the
    last token of step j's piece (its separator's last token); training puts step labels at
    exactly these positions (``prm_token_labels``) and ignores every other position.

At scoring time the completion's text is split into steps on ``split_on`` (default: the
separator, "\\n\\n"), each step stripped of surrounding whitespace and empty steps dropped.
With ``max_length``, tokens past it are cut and only steps whose position is kept are scored.
The sequence score aggregates the step scores: ``min`` (default), ``last``, ``prod`` or
``mean``; per-step scores go to ``reward_info`` (``step_scores``).
"""

from __future__ import annotations

import math
import threading

from posttrain.errors import UserError
from reward_models.registry import reward_factory
from reward_models.scoring_models import batches, load_checkpoint, pad_id, padded, render_chat
from reward_models.text import completion_text
from reward_models.types import RewardOutput

DEFAULT_SEPARATOR = "\n\n"
IGNORE_INDEX = -100
AGGREGATES = ("min", "last", "prod", "mean")


def build_prm_inputs(tokenizer, prompt: str | list, steps: list[str],
                     separator: str = DEFAULT_SEPARATOR) -> tuple[list[int], list[int]]:
    """Input ids for a prompt and its steps, and the position whose label scores each step."""
    if isinstance(prompt, list):
        prompt = render_chat(tokenizer, prompt, add_generation_prompt=True)
    ids = list(tokenizer(prompt + separator, add_special_tokens=False)["input_ids"])
    positions = []
    for step in steps:
        ids += tokenizer(step + separator, add_special_tokens=False)["input_ids"]
        positions.append(len(ids) - 1)
    return ids, positions


def prm_token_labels(length: int, positions: list[int], labels: list[int | float]) -> list[int | float]:
    """Per-token training targets: each step's label at its position, ``-100`` (ignored) elsewhere."""
    if len(positions) != len(labels):
        raise ValueError(f"{len(positions)} step positions but {len(labels)} labels")
    targets: list[int | float] = [IGNORE_INDEX] * length
    for position, label in zip(positions, labels, strict=True):
        targets[position] = label
    return targets


def split_steps(text: str, split_on: str = DEFAULT_SEPARATOR) -> list[str]:
    """Steps of a completion: split on ``split_on``, stripped, empty ones dropped."""
    return [step.strip() for step in text.split(split_on) if step.strip()]


def aggregate(scores: list[float], how: str) -> float | None:
    if not scores:
        return None
    if how == "min":
        return min(scores)
    if how == "last":
        return scores[-1]
    if how == "prod":
        return math.prod(scores)
    if how == "mean":
        return math.fsum(scores) / len(scores)
    raise ValueError(f"unknown aggregate {how!r}; expected one of {', '.join(AGGREGATES)}")


class ProcessRewardModel:
    """The reward; loads the checkpoint on first use."""

    __name__ = "prm"

    def __init__(self, model: str, device: str, batch_size: int, max_length: int | None, separator: str,
                 split_on: str, aggregation: str, dtype: str) -> None:
        self.path, self.device, self.batch_size, self.max_length = model, device, batch_size, max_length
        self.separator, self.split_on, self.aggregation, self.dtype = separator, split_on, aggregation, dtype
        self._loaded = None
        self._lock = threading.Lock()

    def load(self):
        with self._lock:
            if self._loaded is None:
                self._loaded = load_checkpoint(self.path, "AutoModelForTokenClassification", self.device,
                                               self.dtype, f"prm reward ({self.path})")
            return self._loaded

    def step_scores(self, prompts: list, step_lists: list[list[str]]) -> list[list[float]]:
        """Per-step scores for each (prompt, steps); steps cut by ``max_length`` get no score."""
        import torch

        tokenizer, model = self.load()
        inputs = []
        for prompt, steps in zip(prompts, step_lists, strict=True):
            ids, positions = build_prm_inputs(tokenizer, prompt, steps, self.separator)
            if self.max_length is not None:
                ids = ids[:self.max_length]
                positions = [p for p in positions if p < self.max_length]
            inputs.append((ids, positions))
        out: list[list[float]] = [[] for _ in inputs]
        pad = pad_id(tokenizer, model)
        with self._lock, torch.inference_mode():
            for group in batches([len(ids) for ids, _ in inputs], self.batch_size):
                ids, mask = padded([inputs[i][0] for i in group], pad, self.device)
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
                probs = logits.softmax(-1)[..., 1] if logits.shape[-1] > 1 else logits[..., 0].sigmoid()
                for row, i in enumerate(group):
                    out[i] = probs[row, inputs[i][1]].tolist()
        return out

    def __call__(self, prompts: list, completions: list, **columns) -> RewardOutput:
        step_lists = [split_steps(completion_text(c), self.split_on) for c in completions]
        per_step = self.step_scores(list(prompts), step_lists)
        scores, info = [], []
        for steps, step_scores in zip(step_lists, per_step, strict=True):
            scores.append(aggregate(step_scores, self.aggregation))
            info.append({"step_scores": step_scores, "steps": len(steps), "aggregate": self.aggregation})
        return RewardOutput(scores, info)

    def close(self) -> None:
        with self._lock:
            self._loaded = None


@reward_factory
def prm(*, model: str, device: str = "cpu", batch_size: int = 8, max_length: int | None = None,
        separator: str = DEFAULT_SEPARATOR, split_on: str | None = None, aggregate: str = "min",
        dtype: str = "auto") -> ProcessRewardModel:
    """Build the reward from a checkpoint directory ``model`` (model + tokenizer); see the module docstring."""
    if aggregate not in AGGREGATES:
        raise UserError(f"prm reward: aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}.")
    if not separator:
        raise UserError("prm reward: separator must be a non-empty string.")
    return ProcessRewardModel(str(model), device, int(batch_size), max_length, separator,
                              split_on or separator, aggregate, dtype)
