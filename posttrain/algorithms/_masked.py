"""Masked reductions shared by the algorithm modules.

Masked-out positions are replaced with zeros through ``torch.where`` rather
than multiplied by the mask, so padding may hold anything (even inf or NaN)
without leaking into results or gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_fill_zero(x: Tensor, mask: Tensor) -> Tensor:
    """x where mask is set, 0 elsewhere."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum over the masked-in entries (masked-out entries may hold anything, even NaN)."""
    x = masked_fill_zero(x, mask)
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean over the masked-in entries; 0 where there are none (rather than NaN)."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, *, unbiased: bool = False) -> Tensor:
    """Variance over all masked-in entries."""
    mean = masked_mean(x, mask)
    count = mask.bool().sum().to(x.dtype)
    sq = masked_sum((x - mean) ** 2, mask)
    denom = (count - 1) if unbiased else count
    return sq / denom.clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8,
                  mean: float | Tensor | None = None, var: float | Tensor | None = None) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked-in entries; masked-out entries become 0.

    ``mean`` / ``var`` (population variance) replace the statistics of ``x`` when given, e.g. the
    statistics of the whole batch over every rank, so each rank's share is whitened alike."""
    mean = masked_mean(x, mask) if mean is None else torch.as_tensor(mean, dtype=x.dtype, device=x.device)
    var = masked_var(x, mask) if var is None else torch.as_tensor(var, dtype=x.dtype, device=x.device)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return masked_fill_zero(out, mask)


def group_view(values: Tensor, group_size: int) -> Tensor:
    """Reshape a flat [B] tensor laid out group by group into [B // group_size, group_size]."""
    if values.dim() != 1:
        raise ValueError(f"expected a 1-D tensor of per-sequence values, got shape {tuple(values.shape)}")
    if group_size < 1 or values.numel() % group_size != 0:
        raise ValueError(f"batch of {values.numel()} rewards is not a whole number of groups of {group_size}")
    return values.view(-1, group_size)


def broadcast_to_tokens(values: Tensor, like: Tensor) -> Tensor:
    """Per-sequence values [B] (or [B, 1]) broadcast against a per-token tensor [B, T]."""
    if values.dim() == 1:
        values = values.unsqueeze(-1)
    if values.dim() != like.dim():
        raise ValueError(f"cannot broadcast values of shape {tuple(values.shape)} to {tuple(like.shape)}")
    return values.expand_as(like) if values.shape != like.shape else values
