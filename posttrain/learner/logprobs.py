"""Log-probabilities of given tokens under a causal LM's logits (pure tensor functions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for t < T-1, shape [B, T-1].

    Computed as a negated cross-entropy, which avoids materialising a second
    [B, T, V] tensor of log-softmax values.
    """
    shifted = logits[:, :-1]
    if shifted.dtype in (torch.float16, torch.bfloat16):  # log-softmax in low precision loses too much
        shifted = shifted.float()
    if temperature != 1.0:
        shifted = shifted / temperature
    targets = input_ids[:, 1:]
    flat = -F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1), reduction="none")
    return flat.view_as(targets)


def completion_logprobs(logits: torch.Tensor, input_ids: torch.Tensor,
                        completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of completion-token log-probs and the number of completion tokens."""
    mask = completion_mask[:, 1:].to(logits.dtype if logits.is_floating_point() else torch.float32)
    per_token = next_token_logprobs(logits, input_ids)
    return (per_token * mask).sum(dim=1), mask.sum(dim=1)
