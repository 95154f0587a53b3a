"""Pack sampled (prompt, completion) token sequences into padded learner tensors.

Per-token values that belong to completion tokens (sampler log-probs,
advantages) are aligned to the *next-token* positions used by
``next_token_logprobs``: completion token j of a sequence with P prompt tokens
sits at shifted position P - 1 + j.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_sequences(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_token_id: int,
                  per_token: dict[str, Sequence[Sequence[float]]] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` [N, T], ``attention_mask`` [N, T] and, on shifted positions [N, T-1],
    ``completion_mask`` plus one float tensor per entry of ``per_token`` (zeros off-completion).
    """
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    width = max(max(lengths), 2)
    n = len(prompts)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    completion_mask = torch.zeros((n, width - 1), dtype=torch.float32)
    extra = {name: torch.zeros((n, width - 1), dtype=torch.float32) for name in (per_token or {})}
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        ids = list(prompt) + list(completion)
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
        start, end = len(prompt) - 1, len(prompt) - 1 + len(completion)
        completion_mask[i, start:end] = 1.0
        for name, values in (per_token or {}).items():
            row = values[i]
            if len(row) != len(completion):
                raise ValueError(f"{name}[{i}] has {len(row)} values for {len(completion)} completion tokens")
            extra[name][i, start:end] = torch.as_tensor(row, dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask, **extra}
