"""Per-token and per-sequence completion log-probs of a right-padded batch, against hand-computed values."""

from __future__ import annotations

import torch

from posttrain.learner.logprobs import completion_logprobs, token_logprobs


def test_alignment_matches_hand_computed_logprobs():
    torch.manual_seed(0)
    # prompts [1, 2, 3] and [4], completions [5, 6] and [7, 8, 9], right-padded with 0
    input_ids = torch.tensor([[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]])
    completion_mask = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]])
    logits = torch.randn(2, 5, 10, dtype=torch.float64)
    per_token = token_logprobs(logits, input_ids, completion_mask)
    log_softmax = logits.log_softmax(-1)
    # completion token 6 of row 0 is predicted from position 3; token 9 of row 1 from position 2
    assert torch.isclose(per_token[0, 4], log_softmax[0, 3, 6].to(per_token.dtype))
    assert torch.isclose(per_token[1, 3], log_softmax[1, 2, 9].to(per_token.dtype))
    sums, counts = completion_logprobs(logits, input_ids, completion_mask)
    expected = log_softmax[0, 2, 5] + log_softmax[0, 3, 6]
    assert torch.isclose(sums[0], expected) and counts.tolist() == [2, 3]
