"""Log-probabilities and entropies of given tokens under a causal LM's logits, and how far two sets of
log-probs drift apart (pure tensor functions).

One layout: everything is ``[B, L]`` and position-aligned with ``input_ids`` (the
value at ``t`` concerns token ``input_ids[:, t]``), as ``RolloutBatch.collate``
produces. Token ``t`` is predicted by the logits at ``t - 1``, so position 0 is
always 0. ``completion_mask`` is ``[B, L]`` in the same layout.

The sampler (vLLM with ``logprobs_mode="processed"``) reports
``log_softmax(logits / T)`` of the sampled token when top-k/top-p are off;
``token_logprobs`` computes exactly that, so for the same weights the two
agree to float rounding, and any larger drift is a sync or numerics problem.
Temperature 0 (greedy) reports untempered log-probs on both sides.
"""

from __future__ import annotations

import torch


def token_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """Log-prob of each completion token under ``softmax(logits / temperature)``, ``[B, L]``.

    ``logits``: ``[B, L, V]`` from a causal LM over ``input_ids`` (prompt +
    completion). Positions where ``completion_mask`` is 0 (prompt, padding)
    are 0. Differentiable; computed in float32 (float64 logits: in float64) a few rows at a time, so the
    extra memory is about ``chunk_elements`` floats (at least one ``[L, V]``
    row): bounded for large vocabularies, and few operations for small ones
    (a loop over single rows costs more than the arithmetic on small models,
    and far more on a CPU shared with other work).
    """
    if logits.shape[:2] != input_ids.shape or completion_mask.shape != input_ids.shape:
        raise ValueError(f"shapes differ: logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)}, "
                         f"completion_mask {tuple(completion_mask.shape)}")
    scale = 1.0 / temperature if temperature > 0 else 1.0
    dtype = torch.promote_types(logits.dtype, torch.float32)  # low precision loses too much in log-softmax
    rows_per_chunk = max(1, chunk_elements // max(logits.shape[1] * logits.shape[2], 1))
    chunks = []
    for start in range(0, logits.shape[0], rows_per_chunk):
        block = logits[start : start + rows_per_chunk, :-1].to(dtype)  # predicts tokens 1..L-1
        if scale != 1.0:
            block = block * scale
        targets = input_ids[start : start + rows_per_chunk, 1:].unsqueeze(-1)
        picked = block.gather(-1, targets).squeeze(-1) - torch.logsumexp(block, dim=-1)
        chunks.append(torch.cat([picked.new_zeros(picked.shape[0], 1), picked], dim=1))
    out = torch.cat(chunks)
    return out * completion_mask.to(out.dtype)


def completion_logprobs(logits: torch.Tensor, input_ids: torch.Tensor,
                        completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of completion-token log-probs (``token_logprobs`` summed over ``L``) and the number
    of completion tokens, both ``[B]``."""
    mask = completion_mask.to(logits.dtype if logits.is_floating_point() else torch.float32, copy=True)
    mask[:, 0] = 0  # no logits predict the first token
    return token_logprobs(logits, input_ids, mask).sum(dim=1), mask.sum(dim=1)


def drift_stats(
    sampler_logprobs: torch.Tensor, learner_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """How far the learner's log-probs are from the sampler's, over masked tokens.

    ``abs_diff_mean`` / ``abs_diff_max``: |learner - sampler|; ``ratio_mean``:
    mean of ``exp(learner - sampler)`` (the importance ratio pi_learner /
    pi_sampler, 1 when they agree); ``kl``: the k3 estimate of
    KL(sampler || learner), ``mean(r - 1 - log r)`` with ``r`` that ratio;
    ``tokens``: how many tokens were compared.
    """
    keep = mask.bool()
    if sampler_logprobs.shape != learner_logprobs.shape or keep.shape != sampler_logprobs.shape:
        raise ValueError("sampler_logprobs, learner_logprobs and mask must have the same shape")
    tokens = int(keep.sum())
    if tokens == 0:
        return {"abs_diff_mean": 0.0, "abs_diff_max": 0.0, "ratio_mean": 1.0, "kl": 0.0, "tokens": 0}
    with torch.no_grad():
        log_ratio = (learner_logprobs.detach().double() - sampler_logprobs.detach().double())[keep]
        ratio = log_ratio.exp()
        return {
            "abs_diff_mean": float(log_ratio.abs().mean()),
            "abs_diff_max": float(log_ratio.abs().max()),
            "ratio_mean": float(ratio.mean()),
            "kl": float((ratio - 1 - log_ratio).mean()),
            "tokens": tokens,
        }


def token_entropy(
    logits: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Entropy of the distribution each completion token was sampled from, ``[B, L]``, in the layout of
    ``token_logprobs``: the value at ``t`` is H(softmax(logits[t - 1] / temperature)), 0 outside the
    completion. Differentiable; one ``[L, V]`` float32 block at a time."""
    if logits.shape[:2] != completion_mask.shape:
        raise ValueError(f"shapes differ: logits {tuple(logits.shape)}, completion_mask {tuple(completion_mask.shape)}")
    scale = 1.0 / temperature if temperature > 0 else 1.0
    rows = []
    for b in range(logits.shape[0]):
        row = logits[b, :-1].float() * scale
        entropy = torch.logsumexp(row, dim=-1) - (torch.softmax(row, dim=-1) * row).sum(-1)
        rows.append(torch.cat([entropy.new_zeros(1), entropy]))
    out = torch.stack(rows)
    return out * completion_mask.to(out.dtype)
