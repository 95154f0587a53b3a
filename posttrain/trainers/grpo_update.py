"""GRPO's policy update on one rollout batch: the micro-batch loss and the epochs of mini-batch steps.

Per micro-batch (``g``: the ``grpo:`` settings; ``agg``: the mini-batch's loss tokens and sequences over every
rank, so every aggregation mode normalises by the global batch):

    L = policy_loss(log pi, log pi_old, A, mask; loss_agg)  [+ kl_coef * KL(pi || pi_ref)  with kl_in: loss]
        [- entropy_coef * H(pi)]

DeepSeekMath (Shao et al., 2024) for GRPO; the policy losses and aggregations are ``posttrain.algorithms``'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain import algorithms
from posttrain.distributed import all_reduce_sum
from posttrain.learner.packing import forward_logits
from posttrain.rollout import token_entropy, token_logprobs
from posttrain.trainers import online
from posttrain.trainers.grpo_config import GRPOSettings


@dataclass
class MicroBatchLoss:
    loss: torch.Tensor  # what is back-propagated: policy loss (+ kl_coef * KL) (+ entropy bonus)
    policy: algorithms.PolicyLossResult
    kl: torch.Tensor | None  # the KL term before kl_coef, when it is in the loss
    logits: torch.Tensor
    logprobs: torch.Tensor  # [b, L], token_logprobs' layout


def micro_batch_loss(model, g: GRPOSettings, input_ids, attention_mask, completion_mask, old_logprobs, ref_logprobs,
                     token_advantages, loss_mask, importance_weights, agg: dict, temperature: float) -> MicroBatchLoss:
    """One micro-batch's GRPO loss: the policy loss ``g.policy_loss`` aggregated by ``g.loss_agg`` over the global
    batch (``agg``: global token and sequence counts, the constant of ``seq-mean-token-sum-norm``, the gradient
    divisor), plus ``kl_coef`` times the KL to the reference when ``kl_in: loss``, plus the entropy bonus.
    ``old_logprobs`` None: one pass, the detached log-probs of this forward are the old ones (ratio 1)."""
    logits = forward_logits(model, input_ids, attention_mask, padding_free=g.padding_free)
    logprobs = token_logprobs(logits, input_ids, completion_mask, temperature=temperature)
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    policy = algorithms.compute_policy_loss(g.policy_loss, logprobs, old, token_advantages, loss_mask,
                                            loss_agg_mode=g.loss_agg, importance_weights=importance_weights,
                                            **agg, **g.policy_loss_args)
    loss, kl = policy.loss, None
    if g.kl_coef and g.kl_in == "loss":
        kl = algorithms.kl_loss(logprobs, ref_logprobs, loss_mask, kind=g.kl_estimator, loss_agg_mode=g.loss_agg, **agg)
        loss = loss + g.kl_coef * kl
    if g.entropy_coef:
        entropy = token_entropy(logits, completion_mask, temperature=temperature)
        loss = loss + algorithms.entropy_bonus(entropy, loss_mask, coef=g.entropy_coef, loss_agg_mode=g.loss_agg, **agg)
    return MicroBatchLoss(loss, policy, kl, logits, logprobs)


@dataclass
class PolicyUpdate:
    """What an update did, over every rank: the mean loss and KL of its optimizer steps, the clipped share of
    loss tokens, the micro-batches skipped as non-finite; and, in single-pass mode (no old log-probs given),
    the log-probs its own forwards computed, which are the old ones ([B, L])."""

    loss: float
    kl: float
    clipfrac: float
    nonfinite: float
    logprobs: torch.Tensor | None


def _select(tensor: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor | None:
    return None if tensor is None else tensor[part]


def update_policy(learner, cfg, plan: dict[str, int], tensors: dict[str, torch.Tensor], old_logprobs, ref_logprobs,
                  advantages: torch.Tensor, loss_mask: torch.Tensor, weights, *, step: int, world_size: int,
                  last_checkpoint) -> PolicyUpdate:
    """``grpo.epochs`` passes over the batch in ``plan["mini_batches"]`` optimizer steps, each of micro-batches of
    ``train.micro_batch_size`` (``world_size``: learner ranks); the non-finite loss policy applied per micro-batch (``grpo.nonfinite_loss``)."""
    g = cfg.grpo
    temperature = max(cfg.rollout.temperature, 1e-6)
    divisor = plan["grad_accum"] * world_size
    token_adv = (advantages if advantages.dim() == 2 else advantages[:, None].expand_as(loss_mask)).nan_to_num(0.0)
    sums = {"loss": 0.0, "kl": 0.0, "clipfrac": 0.0, "clip_tokens": 0.0, "nonfinite": 0.0}
    updates = 0
    first_logprobs = torch.zeros_like(loss_mask) if old_logprobs is None else None
    for _epoch, rows in online.mini_batches(tensors["input_ids"].shape[0], plan["mini_batches"], g.epochs):
        agg, _ = online.loss_aggregation(loss_mask[rows], norm_constant=float(cfg.rollout.max_tokens),
                                         gradient_divisor=divisor)
        for part in online.micro_batches(rows, cfg.train.micro_batch_size):
            out = micro_batch_loss(learner, g, tensors["input_ids"][part], tensors["attention_mask"][part],
                                   tensors["completion_mask"][part], _select(old_logprobs, part),
                                   _select(ref_logprobs, part), token_adv[part], loss_mask[part],
                                   _select(weights, part), agg, temperature)
            if first_logprobs is not None:  # one epoch, one mini-batch: this is the first and only pass
                first_logprobs[part] = out.logprobs.detach()
            if out.kl is not None:
                sums["kl"] += out.kl.item() / divisor
            loss, skipped = online.guard_nonfinite(out.loss, g.nonfinite_loss, "policy loss", "grpo.nonfinite_loss",
                                                   step=step + 1, last_checkpoint=last_checkpoint, anchor=out.logits)
            sums["nonfinite"] += float(skipped) / world_size  # all ranks skip together
            learner.backward(loss)
            learner.step()
            if not skipped:
                sums["loss"] += out.policy.loss.item() / divisor
            # metrics are means over this micro-batch's loss tokens: weight them back to sums
            sums["clipfrac"] += float(out.policy.metrics.get("clipfrac", 0.0)) * loss_mask[part].sum().item()
            sums["clip_tokens"] += loss_mask[part].sum().item()
        updates += 1
    total = dict(zip(sorted(sums), all_reduce_sum([sums[k] for k in sorted(sums)])))
    return PolicyUpdate(loss=total["loss"] / max(updates, 1), kl=total["kl"] / max(updates, 1),
                        clipfrac=total["clipfrac"] / max(total["clip_tokens"], 1.0), nonfinite=total["nonfinite"],
                        logprobs=first_logprobs)


def update_metrics(update: PolicyUpdate, learner, reward_kl: float | None) -> dict[str, float]:
    """The update's step metrics: ``kl`` is the KL in the loss, or with ``kl_in: reward`` (``reward_kl``) the
    mean KL subtracted from the rewards."""
    metrics = {"loss": update.loss, "kl": update.kl if reward_kl is None else reward_kl, "clipfrac": update.clipfrac,
               "nonfinite_skipped": update.nonfinite, "lr": learner.lr}
    if learner.grad_norm is not None:
        metrics["grad_norm"] = learner.grad_norm
    return metrics


def single_pass(cfg, plan: dict[str, int]) -> bool:
    """Whether the update's own forward can stand in for the "old" log-probs forward.

    With one epoch and one mini-batch, every micro-batch's forward runs on the weights that sampled (the
    optimizer steps once, after the last one), so its detached log-probs *are* the old log-probs: the ratio is
    exactly 1 and the gradient is the same, one forward fewer per step (TRL does the same). Truncated
    importance sampling and a KL penalty in the reward need the old log-probs before the update, so they keep
    the separate forward; so does one-step async, where the old log-probs are the current learner's (the
    proximal policy) and must exist before the update, apart from the stale sampler's.
    """
    g = cfg.grpo
    return (g.epochs == 1 and plan["mini_batches"] == 1 and not g.correction().enabled
            and not (g.kl_coef and g.kl_in == "reward") and cfg.rollout.schedule == "sync")
