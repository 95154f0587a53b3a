"""One rollout batch on the learner: mini- and micro-batches, loss aggregation over ranks, PF-PPO filtration,
the non-finite loss policy, and the "old" and reference log-probs before the update."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from posttrain.distributed import all_gather_rows, all_reduce_sum, own_rows
from posttrain.faults import maybe_poison_loss
from posttrain.learner.packing import forward_logits
from posttrain.trainers.common import check_finite_loss


def mini_batches(local: int, count: int, epochs: int, shuffle_seed: Callable[[int], int] | None = None
                 ) -> Iterator[tuple[int, torch.Tensor]]:
    """``(epoch, rows)`` for each optimizer step of a rollout batch: ``epochs`` passes over this rank's ``local``
    rows, each split into ``count`` mini-batches, in order or, with ``shuffle_seed(epoch)``, freshly shuffled
    by a generator with that seed (so a resumed run shuffles alike)."""
    per_mini = local // count
    for epoch in range(epochs):
        if shuffle_seed is None:
            order = torch.arange(local)
        else:
            order = torch.randperm(local, generator=torch.Generator().manual_seed(shuffle_seed(epoch)))
        for mb in range(count):
            yield epoch, order[mb * per_mini : (mb + 1) * per_mini]


def micro_batches(rows: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    """A mini-batch's rows in micro-batches of ``size``."""
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def loss_aggregation(mask: torch.Tensor, *, norm_constant: float, gradient_divisor: float
                     ) -> tuple[dict[str, float], float]:
    """The settings a mini-batch's losses are aggregated with, and its loss tokens over every rank: the loss
    tokens and sequences of ``mask`` (this rank's rows of the mini-batch) summed over every rank (at least 1),
    the constant of ``seq-mean-token-sum-norm`` and the gradient divisor (accumulation steps x ranks)."""
    num_tokens, num_seqs = all_reduce_sum([mask.sum().item(), float((mask.sum(1) > 0).sum())])
    return {"global_num_tokens": max(num_tokens, 1.0), "global_num_seqs": max(num_seqs, 1.0),
            "norm_constant": norm_constant, "gradient_divisor": gradient_divisor}, num_tokens


def policy_filtration_keep(strategy: str, rewards: torch.Tensor, n: int, *, seed: int, step: int,
                           rank: int) -> torch.Tensor:
    """This rank's PF-PPO keep mask [B] (``posttrain.algorithms.pf_ppo_filter``), drawn on the step's batch
    gathered from every rank with a generator seeded by the run seed and the step, so 1 and N processes keep
    the same samples. ``rewards`` [B]: this rank's rewards, group-major with ``n`` per prompt. (PF-PPO,
    "Policy Filtration in RLHF to Fine-Tune LLM for Code Generation", Shen et al., 2024.)"""
    from posttrain.algorithms import pf_ppo_filter

    everyone = all_gather_rows(rewards)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    keep = pf_ppo_filter(everyone, n, strategy=strategy, generator=generator)
    return own_rows(keep, rewards.shape[0], rank)


def guard_nonfinite(loss: torch.Tensor, policy: str, what: str, setting: str, *, step: int,
                    last_checkpoint: Path | None, anchor: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Apply the non-finite loss policy at (1-based) ``step``: ``stop`` raises ``TrainingDiverged`` naming the
    step and the last checkpoint; ``skip`` returns a stand-in loss whose gradients are exact zeros, and True,
    to be counted. ``setting`` names the recipe key, e.g. ``grpo.nonfinite_loss``.

    The stand-in is ``anchor.sum() * 0`` (``anchor``: this micro-batch's logits or values), not the bad loss
    times 0: back-propagating through a NaN gives NaN gradients even when multiplied by 0.

    Collective: every rank calls it for every micro-batch and all decide together (a rank that stopped alone
    would leave the others waiting in the next all-reduce).
    """
    loss = maybe_poison_loss(step, loss)
    if all_reduce_sum([0.0 if torch.isfinite(loss) else 1.0])[0] == 0:
        return loss, False
    if policy == "stop":
        check_finite_loss(math.nan, step, last_checkpoint, setting=setting)
    return anchor.nan_to_num(0.0, posinf=0.0, neginf=0.0).sum() * 0.0, True


@torch.no_grad()
def old_and_ref_logprobs(learner, reference, tensors: dict[str, torch.Tensor], micro_batch_size: int,
                         temperature: float, *, need_old: bool = True,
                         padding_free: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The learner's log-probs of the sampled tokens before this step's updates (the PPO "old" policy; None
    when not ``need_old``) and the frozen reference's (None without one), ``[B, L]`` in ``token_logprobs``'
    layout."""
    from posttrain.rollout import token_logprobs

    old, ref = [], []
    if not need_old and reference is None:
        return None, None
    learner.eval()
    for start in range(0, tensors["input_ids"].shape[0], micro_batch_size):
        part = {k: v[start : start + micro_batch_size] for k, v in tensors.items()}
        if need_old:
            logits = forward_logits(learner, part["input_ids"], part["attention_mask"], padding_free=padding_free)
            old.append(token_logprobs(logits, part["input_ids"], part["completion_mask"], temperature=temperature))
        if reference is not None:
            ref_logits = reference.logits(part["input_ids"], part["attention_mask"], padding_free=padding_free)
            ref.append(token_logprobs(ref_logits, part["input_ids"], part["completion_mask"], temperature=temperature))
    learner.train()
    return (torch.cat(old) if old else None), (torch.cat(ref) if ref else None)
