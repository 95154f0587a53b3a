"""Calling TRL's own loss code on given tensors, without models or datasets.

TRL 1.x inlines its losses in trainer methods that expect a model and an accelerator. We build the
trainers with ``object.__new__`` (skipping ``__init__``), set only the attributes those methods
read, and feed them a fake model whose per-token log-probabilities come from a lookup table: token
id ``k`` at a labelled position has log-prob ``table[k]``. The trainer code under test is TRL's,
unchanged; only its inputs are synthetic. If a TRL release renames an attribute these helpers
fail loudly, which is the point.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from types import SimpleNamespace

import torch
from torch import Tensor

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl import DPOTrainer, GRPOTrainer, KTOTrainer, RewardTrainer, RLOOTrainer
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer


class FakeAccelerator:
    device = torch.device("cpu")
    num_processes = 1
    process_index = 0
    sync_gradients = True
    is_main_process = True

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x

    def unwrap_model(self, m):
        return m


class TableModel:
    """A causal 'LM' whose log-prob for label id k is table[k]; other outputs are zeros."""

    training = True
    is_gradient_checkpointing = False

    def __init__(self, table: Tensor, rewards: Tensor | None = None) -> None:
        self.table = table
        self.rewards = rewards

    def __call__(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if labels is None:  # reward-model call: one scalar "logit" per row
            return SimpleNamespace(logits=self.rewards.unsqueeze(-1))
        lab = labels[:, 1:]
        valid = lab != -100
        lp = torch.where(valid, self.table[lab.clamp(min=0)], torch.zeros((), dtype=self.table.dtype))
        zeros = torch.zeros_like(lp)
        return SimpleNamespace(
            log_probs=lp,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=torch.zeros_like(lp, dtype=torch.bool),
            log_sum_sq_probs=zeros,
            aux_loss=None,
        )


def pack_sequences(token_logps: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Lay out sequences as [prompt token, response tokens..., padding] with ids indexing a table.

    Returns (table, input_ids [N, T], completion_mask [N, T]); sequence i's summed response log-prob
    under TableModel is token_logps[i].sum()."""
    width = 1 + max(len(t) for t in token_logps) + 1  # one prompt token, one column of padding
    table = torch.cat([torch.zeros(1, dtype=token_logps[0].dtype)] + list(token_logps))
    ids = torch.zeros(len(token_logps), width, dtype=torch.long)
    mask = torch.zeros(len(token_logps), width, dtype=torch.long)
    start = 1
    for i, t in enumerate(token_logps):
        n = len(t)
        ids[i, 1 : 1 + n] = torch.arange(start, start + n)
        mask[i, 1 : 1 + n] = 1
        start += n
    return table, ids, mask


def _metrics():
    return defaultdict(lambda: defaultdict(list))


def trl_dpo_loss(
    loss_types: list[str],
    chosen_tokens: list[Tensor],
    rejected_tokens: list[Tensor],
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    loss_weights: list[float] | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha: float = 1.0,
    discopop_tau: float = 0.05,
    return_metrics: bool = False,
):
    """TRL DPOTrainer._compute_loss on a batch: the batch-mean loss (scalar), and with ``return_metrics``
    also the metrics TRL logs (rewards/chosen, rewards/margins, ...)."""
    table, ids, mask = pack_sequences(list(chosen_tokens) + list(rejected_tokens))
    t = object.__new__(DPOTrainer)
    model = TableModel(table)
    t.model = model
    t.accelerator = FakeAccelerator()
    t.aux_loss_enabled = False
    t.ld_alpha = None
    t.precompute_ref_logps = True
    t.f_divergence_type = f_divergence_type
    t.f_alpha_divergence_coef = f_alpha
    t.loss_types = list(loss_types)
    t.loss_weights = list(loss_weights) if loss_weights is not None else [1.0] * len(loss_types)
    t.beta = beta
    t.label_smoothing = label_smoothing
    t.use_weighting = False
    t.args = SimpleNamespace(discopop_tau=discopop_tau, max_length=None)
    t._metrics = _metrics()
    t._total_train_tokens = 0
    t._tp_size = 1
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "completion_mask": mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = t._compute_loss(model, inputs, return_outputs=False)
    return (loss, t._metrics["train"]) if return_metrics else loss


def trl_dpo_per_example(
    loss_type: str, chosen_tokens, rejected_tokens, ref_chosen, ref_rejected, **kw
) -> Tensor:
    """Per-example DPO losses, by calling TRL on one pair at a time."""
    return torch.stack(
        [
            trl_dpo_loss(
                [loss_type],
                [chosen_tokens[i]],
                [rejected_tokens[i]],
                ref_chosen[i : i + 1],
                ref_rejected[i : i + 1],
                **kw,
            )
            for i in range(len(chosen_tokens))
        ]
    )


def trl_cpo_loss(
    loss_type: str, chosen: Tensor, rejected: Tensor, *, beta, label_smoothing=0.0, simpo_gamma=0.5
):
    """TRL CPOTrainer.cpo_loss (per example) on policy log-probs."""
    t = object.__new__(CPOTrainer)
    t.alpha = 0.0
    t.accelerator = FakeAccelerator()
    t.loss_type = loss_type
    t.beta = beta
    t.label_smoothing = label_smoothing
    t.simpo_gamma = simpo_gamma
    return t.cpo_loss(chosen, rejected)


def trl_orpo_odds_ratio(chosen_avg: Tensor, rejected_avg: Tensor, *, beta: float):
    """TRL ORPOTrainer.odds_ratio_loss: (beta * log sigma(log odds ratio), chosen_rewards, rejected_rewards)."""
    t = object.__new__(ORPOTrainer)
    t.beta = beta
    t.accelerator = FakeAccelerator()
    losses, chosen_rewards, rejected_rewards, _, _ = t.odds_ratio_loss(chosen_avg, rejected_avg)
    return losses, chosen_rewards, rejected_rewards


def trl_kto_loss(
    tokens: list[Tensor],
    labels: list[bool],
    ref_logps: Tensor,
    kl_tokens: list[Tensor],
    ref_kl_logps: Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> Tensor:
    """TRL KTOTrainer._compute_loss: the mean loss over the batch."""
    table, ids, mask = pack_sequences(list(tokens) + list(kl_tokens))
    n = len(tokens)
    t = object.__new__(KTOTrainer)
    model = TableModel(table)
    t.model = model
    t.accelerator = FakeAccelerator()
    t.calculate_KL = loss_type == "kto"
    t.precompute_ref_logps = True
    t.aux_loss_enabled = False
    t.loss_type = loss_type
    t.beta = beta
    t.desirable_weight = desirable_weight
    t.undesirable_weight = undesirable_weight
    t._metrics = _metrics()
    t._total_train_tokens = 0
    t._tp_size = 1
    batch = {
        "input_ids": ids[:n],
        "attention_mask": torch.ones_like(ids[:n]),
        "completion_mask": mask[:n],
        "KL_input_ids": ids[n:],
        "KL_attention_mask": torch.ones_like(ids[n:]),
        "KL_completion_mask": mask[n:],
        "label": torch.tensor(labels, dtype=torch.bool),
        "ref_logps": ref_logps,
        "ref_KL_logps": ref_kl_logps,
    }
    return t._compute_loss(model, batch, return_outputs=False)


def trl_reward_loss(
    chosen: Tensor, rejected: Tensor, *, margin: Tensor | None, center_coef: float | None
) -> Tensor:
    """TRL RewardTrainer.compute_loss (batch mean)."""
    t = object.__new__(RewardTrainer)
    model = TableModel(torch.zeros(1), rewards=torch.cat([chosen, rejected]))
    t.model = model
    t.accelerator = FakeAccelerator()
    t.args = SimpleNamespace(center_rewards_coefficient=center_coef)
    t._metrics = _metrics()
    t._total_train_tokens = 0
    t._tp_size = 1
    inputs = {"input_ids": torch.zeros(2 * len(chosen), 2, dtype=torch.long)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if margin is not None:
        inputs["margin"] = margin
    return t.compute_loss(model, inputs)


def _online_trainer(cls, rewards: Tensor, group_size: int, **attrs):
    b = rewards.shape[0]
    t = object.__new__(cls)
    t.accelerator = FakeAccelerator()
    t.model = TableModel(torch.zeros(1))
    t.environment_factories = None
    t.tools = None
    t.environments = []
    t._generate = lambda prompts: ([[1]] * b, [[2, 3]] * b, None, ["c"] * b, None, {}, None, None)
    t._tokenizer = SimpleNamespace(pad_token_id=0)
    t.pad_to_multiple_of = None
    t.mask_truncated_completions = False
    t.args = SimpleNamespace(
        per_device_train_batch_size=b,
        steps_per_generation=1,
        gradient_accumulation_steps=1,
        gradient_checkpointing_kwargs=None,
    )
    t.num_iterations = 1
    t.use_vllm = False
    t.vllm_importance_sampling_correction = False
    t.beta = 0.0
    t._calculate_rewards = lambda inputs, prompts, completions, ids: rewards.unsqueeze(1).clone()
    t.reward_weights = torch.ones(1, dtype=rewards.dtype)
    t.num_generations = group_size
    t.reward_func_names = ["r"]
    t._metrics = _metrics()
    t._logs = {
        "prompt": [],
        "completion": [],
        "rewards": defaultdict(list),
        "advantages": [],
        "extra": defaultdict(list),
        "images": [],
    }
    t._pending_extra_logs = {}
    t._pending_metrics = {}
    t.log_multimodal = False
    t.reward_clip_range = None
    for k, v in attrs.items():
        setattr(t, k, v)
    return t


def trl_grpo_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group") -> Tensor:
    """Advantages from TRL GRPOTrainer._generate_and_score_completions (generation and rewards stubbed)."""
    t = _online_trainer(
        GRPOTrainer,
        rewards,
        group_size,
        multi_objective_aggregation="sum_then_normalize",
        scale_rewards=scale_rewards,
    )
    return t._generate_and_score_completions([{"prompt": "p"}] * rewards.shape[0])["advantages"]


def trl_rloo_advantages(
    rewards: Tensor,
    group_size: int,
    normalize: bool = False,
    *,
    beta: float = 0.0,
    logps: Tensor | None = None,
    ref_logps: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Advantages from TRL RLOOTrainer._generate_and_score_completions (generation and rewards stubbed).

    With ``beta`` > 0, TRL subtracts beta * sum_t (logp - ref_logp) from each reward first; ``logps``,
    ``ref_logps`` and a right-padded ``mask`` [B, T] give those per-token values."""
    b = rewards.shape[0]
    t = _online_trainer(RLOOTrainer, rewards, group_size, normalize_advantages=normalize, beta=beta)
    if mask is None:
        mask = torch.ones(b, 2, dtype=torch.long)
        logps = torch.zeros(b, 2, dtype=rewards.dtype)
        ref_logps = logps
    lengths = mask.sum(-1).tolist()
    t._generate = lambda prompts: ([[1]] * b, [[2] * n for n in lengths], ["c"] * b)
    t.ref_model = object()
    t._get_per_token_logps_and_entropies = lambda model, *a, **k: (
        (logps if model is t.model else ref_logps),
        None,
        None,
    )
    return t._generate_and_score_completions([{"prompt": "p"}] * b)["advantages"]


def trl_importance_sampling_ratio(
    learner_logps: Tensor,
    sampler_logps: Tensor,
    mask: Tensor,
    *,
    mode: str,
    clip_min: float | None,
    clip_max: float,
) -> Tensor:
    """TRL GRPOTrainer's vLLM importance-sampling ratio (token_* or sequence_* modes), generation stubbed.

    Sequences have the given per-token log-probs; ``mask`` must be right-padded."""
    b, width = learner_logps.shape
    lengths = mask.sum(-1).tolist()
    rewards = torch.zeros(b, dtype=learner_logps.dtype)
    t = _online_trainer(
        GRPOTrainer,
        rewards,
        1,
        multi_objective_aggregation="sum_then_normalize",
        scale_rewards="none",
        use_vllm=True,
        vllm_importance_sampling_correction=True,
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=clip_min,
        vllm_importance_sampling_clip_max=clip_max,
    )
    sampler_lists = [sampler_logps[i, : lengths[i]].tolist() for i in range(b)]
    t._generate = lambda prompts: (
        [[1]] * b,
        [[2] * lengths[i] for i in range(b)],
        None,
        ["c"] * b,
        sampler_lists,
        {},
        None,
        None,
    )
    t._get_per_token_logps_and_entropies = lambda *a, **k: (learner_logps, None, None)
    out = t._generate_and_score_completions([{"prompt": "p"}] * b)
    return out["importance_sampling_ratio"]


def trl_grpo_loss(
    loss_type: str,
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    importance_sampling_level: str = "token",
    beta: float = 0.0,
    ref_logps: Tensor | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch: float | None = None,
    entropies: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> Tensor:
    """TRL GRPOTrainer._compute_loss on given per-token log-probs (the model forward stubbed); with
    ``entropy_coef`` its (static) entropy bonus on the given per-token ``entropies``."""
    t = object.__new__(GRPOTrainer)
    ent = torch.zeros_like(logps) if entropies is None else entropies
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logps, ent, None)
    t.top_entropy_quantile = 1.0
    t.off_policy_mask_threshold = None
    t.importance_sampling_level = importance_sampling_level
    t.beta = beta
    t.args = SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
    t.loss_type = loss_type
    t.epsilon_low = epsilon_low
    t.epsilon_high = epsilon_high
    t.use_vllm = False
    t.vllm_importance_sampling_correction = False
    t.model = TableModel(torch.zeros(1))
    t.current_gradient_accumulation_steps = 1
    t.max_completion_length = max_completion_length or mask.shape[1]
    t.accelerator = FakeAccelerator()
    t._entropy_bonus_enabled = entropy_coef != 0.0
    t.entropy_coef = entropy_coef
    t.use_adaptive_entropy = False
    t.aux_loss_enabled = False
    t._metrics = _metrics()
    b = logps.shape[0]
    inputs = {
        "prompt_ids": torch.ones(b, 1, dtype=torch.long),
        "prompt_mask": torch.ones(b, 1, dtype=torch.long),
        "completion_ids": torch.ones_like(mask, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": advantages,
        "old_per_token_logps": old_logps,
        "num_items_in_batch": torch.tensor(
            float(mask.sum() if num_items_in_batch is None else num_items_in_batch)
        ),
    }
    if ref_logps is not None:
        inputs["ref_per_token_logps"] = ref_logps
    return t._compute_loss(t.model, inputs)
