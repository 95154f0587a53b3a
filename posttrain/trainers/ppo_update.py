"""PPO's update on one rollout batch: ``ppo.epochs`` passes of shuffled mini-batches, each one optimizer step of
the policy and one of the critic, losses aggregated over the global mini-batch (counts summed over ranks):

    L_policy = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))  [- entropy_coef * H]
    L_value  = 0.5 mean_t max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -eps_v, eps_v) - R_t)^2)

(Schulman et al., 2017, "Proximal Policy Optimization Algorithms"; Zheng et al., 2023, PPO-max.)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from posttrain import algorithms
from posttrain.distributed import all_reduce_sum
from posttrain.learner.packing import forward_logits
from posttrain.rollout import token_entropy, token_logprobs
from posttrain.trainers import online
from posttrain.trainers.ppo_critic import token_values

# guard(loss, what, anchor) -> (loss to back-propagate, skipped): the run's non-finite loss policy
Guard = Callable[[torch.Tensor, str, torch.Tensor], tuple[torch.Tensor, bool]]


@dataclass
class Targets:
    """What a PPO update trains towards, ``[B, L]`` each: the old policy's log-probs, the (whitened) advantages,
    the critic's old values and its targets; the policy's loss tokens, the value loss's (T-PPO: finished
    responses only); the rollout correction's weights (None: off)."""

    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    old_values: torch.Tensor
    returns: torch.Tensor
    loss_mask: torch.Tensor
    value_mask: torch.Tensor
    weights: torch.Tensor | None = None


def policy_micro_step(learner, p, ids, attention, completion, targets: Targets, part, agg: dict, *,
                      temperature: float, guard: Guard) -> dict[str, float]:
    """One policy micro-step on rows ``part``; its sums: the loss (0 when skipped), skipped, and the clipped
    share, approximate KL and entropy weighted by its loss tokens."""
    mask = targets.loss_mask[part]
    logits = forward_logits(learner, ids, attention, padding_free=p.padding_free)
    logprobs = token_logprobs(logits, ids, completion, temperature=temperature)
    weights = None if targets.weights is None else targets.weights[part]
    result = algorithms.compute_policy_loss("ppo", logprobs, targets.old_logprobs[part], targets.advantages[part],
                                            mask, loss_agg_mode=p.loss_agg, clip_low=p.clip_range,
                                            clip_high=p.clip_range, importance_weights=weights, **agg)
    loss = result.loss
    if p.entropy_coef:
        entropy = token_entropy(logits, completion, temperature=temperature)
        loss = loss + algorithms.entropy_bonus(entropy, mask, coef=p.entropy_coef, loss_agg_mode=p.loss_agg, **agg)
    else:
        with torch.no_grad():
            entropy = token_entropy(logits.detach(), completion, temperature=temperature)
    loss, skipped = guard(loss, "policy loss", logits)
    learner.backward(loss)
    learner.step()
    tokens = mask.sum().item()
    return {"policy_loss": 0.0 if skipped else result.loss.item(), "nonfinite_skipped": float(skipped),
            "clipfrac": float(result.metrics["clipfrac"]) * tokens, "approx_kl": float(result.metrics["approx_kl"]) * tokens,
            "entropy": float(algorithms.masked_sum(entropy.detach(), mask))}


def value_micro_step(critic, p, ids, attention, completion, targets: Targets, part, agg: dict, *,
                     guard: Guard) -> dict[str, float]:
    """One critic micro-step on rows ``part``; its sums: the loss (0 when skipped), skipped, and the clipped
    share weighted by its value tokens, and those tokens."""
    vmask = targets.value_mask[part]
    values = token_values(forward_logits(critic, ids, attention, padding_free=p.padding_free), completion)
    loss, metrics = algorithms.value_loss(values, targets.old_values[part], targets.returns[part], vmask,
                                          clip_range=p.value_clip, loss_agg_mode=p.loss_agg, **agg)
    loss, skipped = guard(loss, "value loss", values)
    critic.backward(loss)
    critic.step()
    return {"value_loss": 0.0 if skipped else loss.item(), "nonfinite_skipped": float(skipped),
            "vf_clipfrac": float(metrics.get("vf_clipfrac", 0.0)) * vmask.sum().item(),
            "value_tokens": vmask.sum().item()}


def update_actor_critic(learner, critic, cfg, plan: dict[str, int], tensors: dict[str, torch.Tensor],
                        targets: Targets, *, step: int, rank: int, world_size: int,
                        last_checkpoint) -> dict[str, float]:
    """The update's metrics over every rank: mean policy and value losses per optimizer step, the non-finite
    micro-batches skipped, the value loss's clipped share; once the policy trains (after
    ``ppo.critic.pretrain_steps``), its clipped share, approximate KL and entropy per loss token. A mini-batch
    with no value token on any rank leaves the critic untouched."""
    p = cfg.ppo
    temperature = max(cfg.rollout.temperature, 1e-6)
    train_policy = step >= p.critic.pretrain_steps
    divisor = plan["grad_accum"] * world_size

    def guard(loss: torch.Tensor, what: str, anchor: torch.Tensor) -> tuple[torch.Tensor, bool]:
        return online.guard_nonfinite(loss, p.nonfinite_loss, what, "ppo.nonfinite_loss", step=step + 1,
                                      last_checkpoint=last_checkpoint, anchor=anchor)

    def shuffle_seed(epoch: int) -> int:  # (run, step, epoch, rank) alone: a resumed run shuffles alike
        return cfg.seed * 1_000_003 + step * 1009 + epoch * 101 + rank

    sums: dict[str, float] = defaultdict(float)
    updates = critic_updates = 0
    norm = float(cfg.rollout.max_tokens)
    for _epoch, rows in online.mini_batches(tensors["input_ids"].shape[0], plan["mini_batches"], p.epochs,
                                            shuffle_seed):
        agg, _ = online.loss_aggregation(targets.loss_mask[rows], norm_constant=norm, gradient_divisor=divisor)
        value_agg, value_tokens = online.loss_aggregation(targets.value_mask[rows], norm_constant=norm,
                                                          gradient_divisor=divisor)
        for part in online.micro_batches(rows, cfg.train.micro_batch_size):
            inputs = tensors["input_ids"][part], tensors["attention_mask"][part], tensors["completion_mask"][part]
            sums["tokens"] += targets.loss_mask[part].sum().item()
            steps = []
            if train_policy:
                steps.append(policy_micro_step(learner, p, *inputs, targets, part, agg, temperature=temperature,
                                               guard=guard))
            if value_tokens > 0:  # decided alike on every rank: no collective is left waiting
                steps.append(value_micro_step(critic, p, *inputs, targets, part, value_agg, guard=guard))
            for out in steps:
                for key, value in out.items():
                    sums[key] += value / (divisor if key.endswith("_loss") else 1.0)
        updates += 1
        critic_updates += value_tokens > 0
    keys = sorted(sums)
    out = dict(zip(keys, all_reduce_sum([sums[k] for k in keys])))
    tokens = max(out.pop("tokens", 0.0), 1.0)
    result = {"policy_loss": out.get("policy_loss", 0.0) / max(updates, 1),
              "value_loss": out.get("value_loss", 0.0) / max(critic_updates, 1),
              "nonfinite_skipped": out.get("nonfinite_skipped", 0.0) / world_size,  # all ranks skip together
              "vf_clipfrac": out.get("vf_clipfrac", 0.0) / max(out.get("value_tokens", 0.0), 1.0)}
    if train_policy:
        result.update({k: out.get(k, 0.0) / tokens for k in ("clipfrac", "approx_kl", "entropy")})
    return result
