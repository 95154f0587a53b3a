"""PPO's critic: the value model, its values per completion token and of the final state."""

from __future__ import annotations

import torch

from posttrain.errors import UserError
from posttrain.learner.packing import forward_logits
from posttrain.trainers.ppo_config import Config


def load_critic(cfg: Config, pad_token_id: int | None) -> torch.nn.Module:
    """The value model: ``AutoModelForTokenClassification`` with one label and no dropout.

    From the policy checkpoint the value head is new and starts at zero, so every first value is 0 --
    the mean of normalised scores -- rather than noise that would steer the first policy updates. From a
    reward model (``AutoModelForSequenceClassification``, 1 label, ``score`` without bias) the backbone and
    the ``score`` head load unchanged, and the head is applied at every position instead of the last.
    """
    from transformers import AutoConfig, AutoModelForTokenClassification

    critic = cfg.ppo.critic
    path = cfg.model.path if critic.init == "policy" else critic.path
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    config.num_labels = 1
    config.classifier_dropout = 0.0  # old and new values must come from the same function
    if critic.init == "reward_model":
        config.token_classification_bias = False  # the reward model's score head has none
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
    try:
        model = AutoModelForTokenClassification.from_pretrained(path, config=config, dtype=dtype,
                                                                trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load {path!r} as a value model: {err}") from None
    if critic.init == "policy":
        with torch.no_grad():
            model.score.weight.zero_()
            if model.score.bias is not None:
                model.score.bias.zero_()
    model.config.pad_token_id = pad_token_id
    model.config.architectures = [type(model).__name__]
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def token_values(logits: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """V_t for each completion token t, ``[B, L]`` in ``token_logprobs``' layout: the value head's output at
    position t - 1, the state token t was sampled from; 0 outside the completion."""
    v = logits[..., 0].float()
    shifted = torch.cat([v.new_zeros(v.shape[0], 1), v[:, :-1]], dim=1)
    return torch.where(completion_mask.bool(), shifted, torch.zeros_like(shifted))


def final_state_values(logits: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """V(s_T) per row, ``[B]``: the value head's output at the last completion token, i.e. the value of the
    state after the whole (possibly cut) response -- the bootstrap of extended GAE (T-PPO). 0 for a row with no
    completion token. ``completion_mask`` marks a contiguous run of tokens per row (right-padded batches)."""
    v = logits[..., 0].float()
    on = completion_mask.bool()
    positions = torch.arange(on.shape[1], device=on.device).expand_as(on)
    last = torch.where(on, positions, torch.full_like(positions, -1)).max(dim=1).values
    picked = v.gather(1, last.clamp(min=0)[:, None])[:, 0]
    return torch.where(last >= 0, picked, torch.zeros_like(picked))


def build_critic(cfg: Config, dist, plan: dict[str, int], pad_token_id: int | None):
    """The critic's own DeepSpeed learner (``ppo.critic.lr``; the policy's ZeRO stage and batch plan)."""
    import dataclasses

    from posttrain.learner import build_learner

    model = load_critic(cfg, pad_token_id)
    return build_learner(model, dataclasses.replace(cfg.learner, lr=cfg.ppo.critic.lr), world_size=dist.world_size,
                         micro_batch_size=cfg.train.micro_batch_size, grad_accum=plan["grad_accum"],
                         total_steps=plan["optimizer_steps"])


@torch.no_grad()
def critic_values(critic, tensors: dict[str, torch.Tensor], micro_batch_size: int, *,
                  padding_free: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The critic's values before this step's updates: V_old ``[B, L]``, and V(s_T) ``[B]``, the value of the
    state after each whole response (T-PPO's bootstrap), from the same forward passes."""
    out, final = [], []
    critic.eval()
    for start in range(0, tensors["input_ids"].shape[0], micro_batch_size):
        part = {k: v[start : start + micro_batch_size] for k, v in tensors.items()}
        logits = forward_logits(critic, part["input_ids"], part["attention_mask"], padding_free=padding_free)
        out.append(token_values(logits, part["completion_mask"]))
        final.append(final_state_values(logits, part["completion_mask"]))
    critic.train()
    return torch.cat(out), torch.cat(final)
