"""Prompts and their scoring: prompt-only rows, the rewards' view of a sample, and evaluation by generation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.data.formats import check_prompt_only
from posttrain.data.loading import Row
from posttrain.data.pipeline import load_examples
from posttrain.data.tokenize import LengthReport, render_chat
from posttrain.distributed import all_reduce_sum
from posttrain.errors import DataError


@dataclass
class PromptRow:
    """A prompt (string or messages), its token count, and the row's other columns (for rewards)."""

    prompt: Any
    num_tokens: int
    columns: dict[str, Any]
    where: str


def load_prompts(data_cfg, seed: int, tokenizer, max_prompt_length: int) -> tuple[list[PromptRow], list[PromptRow], LengthReport, dict]:
    """Prompt-only rows; prompts longer than ``max_prompt_length`` tokens follow ``data.overlong``
    (``truncate`` is treated as ``drop``: a cut prompt would ask another question)."""

    def encode(row: Row, report: LengthReport) -> PromptRow | None:
        prompt = row.data["prompt"]
        text = render_chat(tokenizer, prompt, add_generation_prompt=True) if isinstance(prompt, list) else prompt
        length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if length > max_prompt_length:
            if data_cfg.overlong == "error":
                raise DataError(f"{row.where}: the prompt has {length} tokens, more than "
                                f"max_prompt_length={max_prompt_length}.",
                                hint="Raise it, or set data.overlong=drop to skip such prompts (they are counted).")
            report.dropped_too_long += 1
            return None
        columns = {k: v for k, v in row.data.items() if k != "prompt"}
        return PromptRow(prompt, length, columns, row.where)

    return load_examples(data_cfg, seed, check_prompt_only, encode)


def expand_columns(rows: list[PromptRow], n: int) -> dict[str, list]:
    """Each extra column repeated per sample (n samples per prompt, group-major), for reward functions."""
    names = sorted({k for r in rows for k in r.columns})
    return {name: [r.columns.get(name) for r in rows for _ in range(n)] for name in names}


def reward_completion(prompt: Any, text: str) -> Any:
    """A sample's completion as rewards receive it, as TRL's GRPOTrainer gives it: for a conversational prompt
    (messages) a list of one assistant message, ``[{"role": "assistant", "content": text}]``; else the text."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def score_samples(reward_set, rows: list[PromptRow], batch, *, collective: bool = False,
                  trainer_state: Any = None) -> tuple[torch.Tensor, dict[str, float], Any]:
    """Rewards [N] (NaN where every reward abstained), per-reward means, and the raw ``BatchScores``.
    ``collective``: every rank scores its part of one step's batch, so batch statistics of the combination
    (maxmin's objective means) are taken over all of them. ``trainer_state`` (a
    ``reward_models.convention.TrainerState``, or None outside training) reaches every reward."""
    n = batch.n
    prompts = [rows[s.group].prompt for s in batch]
    completions = [reward_completion(p, s.text) for p, s in zip(prompts, batch, strict=True)]
    scores = reward_set.score(prompts, completions, groups=[s.group for s in batch],
                              reduce_sum=all_reduce_sum if collective else None, trainer_state=trainer_state,
                              completion_ids=[s.completion_ids for s in batch], **expand_columns(rows, n))
    totals = torch.tensor([math.nan if t is None else float(t) for t in scores.totals], dtype=torch.float32)
    means = {}
    for label, column in scores.scores.items():
        values = [v for v in column if v is not None and math.isfinite(v)]
        if values:
            means[f"reward/{label}"] = sum(values) / len(values)
    return totals, means, scores


@torch.no_grad()
def evaluate_generation(engine, rows: list[PromptRow], reward_set, *, n: int = 1, temperature: float = 0.0,
                        max_tokens: int | None = None, seed: int = 0, trainer_state: Any = None) -> dict[str, float]:
    """Mean reward and pass@k (share of prompts with at least one sample scoring >= 1) on ``rows``.

    A collective engine (a disaggregated run's ``RemoteEngine``) is called even with no rows: every learner
    rank takes part in its generate."""
    if not rows and not engine.collective:
        return {}
    batch = engine.generate([r.prompt for r in rows], n=n, temperature=temperature, max_tokens=max_tokens, seed=seed)
    if not rows:
        return {}
    rewards, means, _ = score_samples(reward_set, rows, batch, trainer_state=trainer_state)
    finite = torch.nan_to_num(rewards, nan=0.0)
    passed = (finite.view(len(rows), n) >= 1.0).any(dim=1).float().mean().item()
    return {"reward": finite.mean().item(), f"pass@{n}": passed,
            "completion_tokens": batch.num_completion_tokens / max(len(batch), 1), **means}


# Rewards whose score is a pass/fail verdict (1 = correct): their share of 1s is logged as `accuracy`.
VERIFIER_REWARDS = ("math_verify", "unit_test")
