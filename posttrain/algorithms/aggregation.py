"""Reducing a per-token loss matrix [B, T] to the scalar that is backpropagated.

Four modes, registered in ``LOSS_AGGREGATIONS`` under the names verl uses:

- ``token-mean``: sum over all loss tokens / number of loss tokens. Every token
  weighs the same (DAPO's token-level loss; TRL ``bnpo``/``dapo``).
- ``seq-mean-token-sum``: each sequence's token sum, averaged over sequences.
- ``seq-mean-token-mean``: each sequence's token mean, averaged over sequences
  (the original GRPO loss; TRL ``grpo``). Long sequences weigh less per token.
- ``seq-mean-token-sum-norm``: token sums divided by a constant (the maximum
  response length) and averaged over sequences, Dr. GRPO's unbiased form
  (TRL ``dr_grpo``). The constant must be given: using the padded width would
  make the loss depend on padding.

Global-batch normalisation. With gradient accumulation and several ranks, the
mean should be over the whole optimizer step (every micro-batch on every rank),
not a mean of per-micro-batch means, which differ when micro-batches hold
different numbers of tokens. Pass the global denominator, summed over all
micro-batches of the step and all ranks (``local_loss_counts`` gives each
micro-batch's share to all-reduce):

- ``global_num_tokens`` for ``token-mean``;
- ``global_num_seqs`` for the three ``seq-mean-*`` modes.

Each micro-batch then returns ``local_sum / global_count``, and the sum of
these over micro-batches and ranks is exactly the global mean. Engines that
average gradients over ranks (DDP, ZeRO) or scale each micro-batch by
1 / gradient_accumulation_steps (DeepSpeed) divide that sum again; pass the
product of those divisors as ``gradient_divisor`` to undo it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.algorithms._masked import masked_sum
from posttrain.algorithms.registry import LOSS_AGGREGATIONS

TOKEN_MODES = ("token-mean",)
SEQUENCE_MODES = ("seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _denominator(local: Tensor, global_count: float | Tensor | None) -> Tensor:
    if global_count is None:
        return local.clamp(min=1)
    count = torch.as_tensor(global_count, dtype=local.dtype, device=local.device)
    return count.clamp(min=1)


@LOSS_AGGREGATIONS.register("token-mean")
def token_mean(
    loss_mat: Tensor,
    mask: Tensor,
    *,
    global_count: float | Tensor | None = None,
    norm_constant: float | None = None,
) -> Tensor:
    """token-mean: L = sum_{i,t} m_it * l_it / sum_{i,t} m_it  (DAPO, 2025: "DAPO: An Open-Source LLM
    Reinforcement Learning System at Scale")."""
    num_tokens = mask.bool().sum().to(loss_mat.dtype)
    return masked_sum(loss_mat, mask) / _denominator(num_tokens, global_count)


def _num_seqs(mask: Tensor, dtype: torch.dtype) -> Tensor:
    # Sequences with no loss token (fully masked rows) do not count.
    return (mask.bool().sum(-1) > 0).sum().to(dtype)


@LOSS_AGGREGATIONS.register("seq-mean-token-sum")
def seq_mean_token_sum(
    loss_mat: Tensor,
    mask: Tensor,
    *,
    global_count: float | Tensor | None = None,
    norm_constant: float | None = None,
) -> Tensor:
    """seq-mean-token-sum: L = (1/N) sum_i sum_t m_it * l_it, N = number of non-empty sequences (each token of a
    sequence weighs fully, as in the REINFORCE objective; discussed in "Understanding R1-Zero-Like Training:
    A Critical Perspective", 2025)."""
    seq_sums = masked_sum(loss_mat, mask, dim=-1)
    return seq_sums.sum() / _denominator(_num_seqs(mask, loss_mat.dtype), global_count)


@LOSS_AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean(
    loss_mat: Tensor,
    mask: Tensor,
    *,
    global_count: float | Tensor | None = None,
    norm_constant: float | None = None,
) -> Tensor:
    """seq-mean-token-mean: L = (1/N) sum_i [ sum_t m_it * l_it / sum_t m_it ]  (GRPO as in "DeepSeekMath:
    Pushing the Limits of Mathematical Reasoning in Open Language Models", 2024)."""
    lengths = mask.bool().sum(-1).to(loss_mat.dtype)
    seq_means = masked_sum(loss_mat, mask, dim=-1) / lengths.clamp(min=1)
    return seq_means.sum() / _denominator(_num_seqs(mask, loss_mat.dtype), global_count)


@LOSS_AGGREGATIONS.register("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(
    loss_mat: Tensor,
    mask: Tensor,
    *,
    global_count: float | Tensor | None = None,
    norm_constant: float | None = None,
) -> Tensor:
    """seq-mean-token-sum-norm: L = (1/N) sum_i sum_t m_it * l_it / C, C a constant such as the maximum
    response length ("Understanding R1-Zero-Like Training: A Critical Perspective", Dr. GRPO, 2025).

    N counts every sequence, as in the paper's 1/G and TRL's ``dr_grpo`` (B * max_completion_length);
    verl omits the 1/N, which only rescales the learning rate.
    """
    if norm_constant is None:
        raise ValueError(
            "seq-mean-token-sum-norm needs norm_constant (e.g. the maximum response length); "
            "the padded width would make the loss depend on padding"
        )
    num_seqs = torch.tensor(float(mask.shape[0]), dtype=loss_mat.dtype, device=loss_mat.device)
    return masked_sum(loss_mat, mask) / (_denominator(num_seqs, global_count) * norm_constant)


def aggregate_loss(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str = "token-mean",
    *,
    global_num_tokens: float | Tensor | None = None,
    global_num_seqs: float | Tensor | None = None,
    norm_constant: float | None = None,
    gradient_divisor: float = 1.0,
) -> Tensor:
    """Reduce a per-token loss ``loss_mat`` [B, T] under ``mask`` [B, T] to a scalar.

    ``mode`` is one of ``LOSS_AGGREGATIONS`` (see the module docstring). ``global_num_tokens`` /
    ``global_num_seqs`` replace the local denominator with the global one for the optimizer step
    (token-mean uses the former, the seq-mean modes the latter); ``gradient_divisor`` multiplies
    the result back by whatever the engine divides gradients by (world size under DDP averaging,
    times gradient-accumulation steps under DeepSpeed).

    For ``seq-mean-token-sum-norm``, ``global_num_seqs`` counts all sequences, empty ones included.
    """
    if loss_mat.shape != mask.shape:
        raise ValueError(
            f"loss of shape {tuple(loss_mat.shape)} and mask of shape {tuple(mask.shape)} differ"
        )
    fn = LOSS_AGGREGATIONS.get(mode)
    global_count = global_num_tokens if mode in TOKEN_MODES else global_num_seqs
    loss = fn(loss_mat, mask, global_count=global_count, norm_constant=norm_constant)
    return loss * gradient_divisor if gradient_divisor != 1.0 else loss


def local_loss_counts(mask: Tensor) -> dict[str, Tensor]:
    """This micro-batch's contribution to the global denominators: ``num_tokens`` (loss tokens),
    ``num_seqs`` (sequences with at least one loss token) and ``num_rows`` (all sequences).
    Sum them over the micro-batches of an optimizer step and all-reduce over ranks."""
    m = mask.bool()
    return {
        "num_tokens": m.sum(),
        "num_seqs": (m.sum(-1) > 0).sum(),
        "num_rows": torch.tensor(m.shape[0], device=m.device),
    }
