"""Small random inputs for the algorithm tests (float64, fixed seeds)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DTYPE = torch.float64


@dataclass
class PreferenceBatch:
    chosen_tokens: list[Tensor]
    rejected_tokens: list[Tensor]
    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor


def preference_batch(seed: int, batch: int = 4, equal_chosen_lengths: bool = False) -> PreferenceBatch:
    g = torch.Generator().manual_seed(seed)
    c_len = [3] * batch if equal_chosen_lengths else torch.randint(1, 6, (batch,), generator=g).tolist()
    r_len = torch.randint(1, 6, (batch,), generator=g).tolist()
    ct = [-0.8 * torch.rand(n, generator=g, dtype=DTYPE) - 0.05 for n in c_len]
    rt = [-0.8 * torch.rand(n, generator=g, dtype=DTYPE) - 0.05 for n in r_len]
    chosen = torch.stack([t.sum() for t in ct])
    rejected = torch.stack([t.sum() for t in rt])
    ref_chosen = chosen + 0.5 * torch.randn(batch, generator=g, dtype=DTYPE)
    ref_rejected = rejected + 0.5 * torch.randn(batch, generator=g, dtype=DTYPE)
    return PreferenceBatch(
        ct,
        rt,
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        torch.tensor(c_len, dtype=DTYPE),
        torch.tensor(r_len, dtype=DTYPE),
    )


@dataclass
class PolicyBatch:
    logprobs: Tensor
    old_logprobs: Tensor
    ref_logprobs: Tensor
    advantages: Tensor
    mask: Tensor


def policy_batch(
    seed: int, batch: int = 4, width: int = 6, spread: float = 0.3, junk: bool = True
) -> PolicyBatch:
    """Right-padded sequences of random lengths 1..width. With ``junk``, padding holds large values on
    purpose (results must not depend on it); TRL comparisons use clean padding, since TRL multiplies by
    the mask."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (batch,), generator=g)
    lengths[0] = width  # at least one full row, so the padded width is the real maximum length
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
    logprobs = -torch.rand(batch, width, generator=g, dtype=DTYPE) * 2 - 0.01
    old = logprobs + spread * torch.randn(batch, width, generator=g, dtype=DTYPE)
    ref = logprobs + spread * torch.randn(batch, width, generator=g, dtype=DTYPE)
    adv = torch.randn(batch, generator=g, dtype=DTYPE)
    filler = torch.where(
        mask.bool(), torch.zeros((), dtype=DTYPE), torch.full((), 123.0 if junk else 0.0, dtype=DTYPE)
    )
    return PolicyBatch(logprobs + filler, old - filler, ref + filler, adv, mask)
