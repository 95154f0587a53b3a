"""Padding-free forward passes: pack a right-padded micro-batch into fewer, fuller rows.

A rollout batch is right-padded to its longest sequence, so a forward over it spends compute on padding in
proportion to how much the lengths vary (in RL they vary a lot: some completions stop after a few tokens,
others run to ``max_tokens``). Packing places several sequences one after another in a row (first-fit
decreasing, rows no longer than the longest sequence), restarts ``position_ids`` at 0 for each, and passes no
attention mask: transformers then builds a block-diagonal causal mask from the position ids, so each token
attends only to the earlier tokens of its own sequence and the outputs are those of the padded forward, up to
float rounding. The model's outputs are scattered back to the padded ``[B, T, ...]`` layout, so everything
downstream (log-probs, entropies, values, losses) is unchanged. The same idea as verl's "remove padding" and
OpenRLHF's packed samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def plan_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Sequence indices per packed row: first-fit decreasing into rows of at most ``capacity`` tokens (a
    longer sequence gets a row of its own). Zero-length sequences are left out."""
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        if length <= 0:
            continue
        slot = next((r for r, room in enumerate(free) if room >= length), None)
        if slot is None:
            rows.append([index])
            free.append(capacity - length)
        else:
            rows[slot].append(index)
            free[slot] -= length
    return rows


@dataclass(frozen=True)
class Packed:
    """A packed micro-batch: ``input_ids`` and ``position_ids`` ``[R, W]``, and ``source``: for each position of
    the padded ``[B, T]`` layout, its flat index in ``[R * W]``, or ``R * W`` (a zero row) for padding."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    source: torch.Tensor
    padded_shape: tuple[int, int]

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """``[R, W, ...]`` model outputs -> ``[B, T, ...]``, zeros at padding; differentiable."""
        flat = values.reshape(-1, *values.shape[2:])
        flat = torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])
        return flat.index_select(0, self.source.reshape(-1)).reshape(*self.padded_shape, *values.shape[2:])


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int = 0) -> Packed:
    """Pack right-padded ``input_ids`` (real tokens where ``attention_mask`` is 1, a prefix of each row)."""
    batch, width = input_ids.shape
    lengths = attention_mask.sum(1).tolist()
    rows = plan_rows(lengths, width)
    row_width = max((sum(lengths[i] for i in row) for row in rows), default=1)
    ids = torch.full((max(len(rows), 1), row_width), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    # filler after the last sequence of a row counts up from 0: a segment of its own that nothing reads
    positions = torch.arange(row_width, device=input_ids.device).repeat(ids.shape[0], 1)
    dummy = ids.numel()
    source = torch.full((batch, width), dummy, dtype=torch.long, device=input_ids.device)
    for r, row in enumerate(rows):
        offset = 0
        for i in row:
            n = lengths[i]
            ids[r, offset : offset + n] = input_ids[i, :n]
            positions[r, offset : offset + n] = torch.arange(n, device=input_ids.device)
            source[i, :n] = r * row_width + offset + torch.arange(n, device=input_ids.device)
            offset += n
        positions[r, offset:] = torch.arange(row_width - offset, device=input_ids.device)
    return Packed(ids, positions, source, (batch, width))


def padding_free_forward(call: Callable[..., torch.Tensor], input_ids: torch.Tensor,
                         attention_mask: torch.Tensor) -> torch.Tensor:
    """``call(input_ids=..., position_ids=..., use_cache=False)`` on the packed batch (it returns
    ``[R, W, ...]``, e.g. a model's logits), scattered back to the padded ``[B, T, ...]`` layout of
    ``input_ids``. Without the cache: transformers looks for packed sequences only when there is none."""
    packed = pack(input_ids, attention_mask)
    return packed.unpack(call(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False))


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, padding_free: bool) -> torch.Tensor:
    """``model``'s logits (or a critic's per-token outputs) over a right-padded micro-batch, ``[B, T, ...]``;
    with ``padding_free`` computed on the packed sequences, in the same layout."""
    if not padding_free:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    return padding_free_forward(lambda **packed: model(**packed).logits, input_ids, attention_mask)
