"""``orm``: an outcome reward model scores prompt + completion.

The model is a local ``AutoModelForSequenceClassification`` checkpoint directory with its
tokenizer (as saved by posttrain's ``rm`` trainer). Inputs follow the trainer's tokenisation,
so a trained model scores what it was trained on:

  - strings: ``prompt + completion + eos`` (eos appended unless the completion ends with it),
    tokenised without added special tokens;
  - conversations (prompt or completion is a message list): the tokenizer's chat template over
    prompt messages + completion messages (a string completion becomes an assistant message),
    without a generation prompt, tokenised without added special tokens.

Sequences longer than ``max_length`` keep their last ``max_length`` tokens (the answer).
The score is the model's single logit when it has one label (a Bradley-Terry reward), or
the softmax probability of label ``label`` (default 1) when it has several.
"""

from __future__ import annotations

import threading

from reward_models.registry import reward_factory
from reward_models.scoring_models import as_messages, batches, load_checkpoint, pad_id, padded, render_chat


def orm_text(tokenizer, prompt: object, completion: object) -> str:
    """The text the model scores for one sample (see the module docstring)."""
    if isinstance(prompt, list) or isinstance(completion, list):
        messages = as_messages(prompt or [], "user") + as_messages(completion, "assistant")
        return render_chat(tokenizer, messages, add_generation_prompt=False)
    eos = tokenizer.eos_token or ""
    completion = str(completion)
    return str(prompt or "") + (completion if completion.endswith(eos) else completion + eos)


class OutcomeRewardModel:
    """The reward; loads the checkpoint on first use."""

    __name__ = "orm"

    def __init__(self, model: str, device: str, batch_size: int, max_length: int, dtype: str, label: int) -> None:
        self.path, self.device, self.batch_size = model, device, batch_size
        self.max_length, self.dtype, self.label = max_length, dtype, label
        self._loaded = None
        self._lock = threading.Lock()

    def load(self):
        with self._lock:
            if self._loaded is None:
                self._loaded = load_checkpoint(self.path, "AutoModelForSequenceClassification", self.device,
                                               self.dtype, f"orm reward ({self.path})")
            return self._loaded

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        import torch

        tokenizer, model = self.load()
        sequences = [tokenizer(orm_text(tokenizer, p, c), add_special_tokens=False)["input_ids"][-self.max_length:]
                     for p, c in zip(prompts, completions, strict=True)]
        scores = [0.0] * len(sequences)
        pad = pad_id(tokenizer, model)
        with self._lock, torch.inference_mode():
            for group in batches([len(s) for s in sequences], self.batch_size):
                ids, mask = padded([sequences[i] for i in group], pad, self.device)
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
                values = logits[:, 0] if logits.shape[-1] == 1 else logits.softmax(-1)[:, self.label]
                for i, value in zip(group, values.tolist(), strict=True):
                    scores[i] = value
        return scores

    def close(self) -> None:
        with self._lock:
            self._loaded = None


@reward_factory
def orm(*, model: str, device: str = "cpu", batch_size: int = 8, max_length: int = 2048, dtype: str = "auto",
        label: int = 1) -> OutcomeRewardModel:
    """Build the reward from a checkpoint directory ``model`` (model + tokenizer)."""
    return OutcomeRewardModel(str(model), device, int(batch_size), int(max_length), dtype, int(label))
