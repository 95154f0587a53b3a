"""Alignment of per-token rollout values with the learner's next-token log-probs."""

from __future__ import annotations

import torch

from posttrain.learner.logprobs import completion_logprobs, next_token_logprobs
from posttrain.learner.sequences import pad_sequences


def test_alignment_matches_hand_computed_logprobs():
    torch.manual_seed(0)
    prompts, completions = [[1, 2, 3], [4]], [[5, 6], [7, 8, 9]]
    batch = pad_sequences(prompts, completions, pad_token_id=0, per_token={"adv": [[0.5, 0.5], [1.0, 2.0, 3.0]]})
    assert batch["input_ids"].tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    assert batch["adv"].tolist() == [[0, 0, 0.5, 0.5], [1, 2, 3, 0]]
    logits = torch.randn(2, 5, 10, dtype=torch.float64)
    per_token = next_token_logprobs(logits, batch["input_ids"])
    log_softmax = logits.log_softmax(-1)
    # completion token 6 of row 0 is predicted from position 3; token 9 of row 1 from position 2
    assert torch.isclose(per_token[0, 3], log_softmax[0, 3, 6])
    assert torch.isclose(per_token[1, 2], log_softmax[1, 2, 9])
    sums, counts = completion_logprobs(logits, batch["input_ids"], torch.nn.functional.pad(batch["completion_mask"], (1, 0)))
    expected = log_softmax[0, 2, 5] + log_softmax[0, 3, 6]
    assert torch.isclose(sums[0], expected) and counts.tolist() == [2, 3]


def test_temperature_scales_logits():
    logits = torch.randn(1, 3, 7, dtype=torch.float64)
    ids = torch.tensor([[1, 2, 3]])
    hot = next_token_logprobs(logits, ids, temperature=0.5)
    assert torch.allclose(hot, (logits[:, :-1] / 0.5).log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0])
