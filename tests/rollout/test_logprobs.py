"""Log-prob recomputation and drift statistics, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.learner.logprobs import drift_stats, token_logprobs


def test_token_logprobs_hand_computed():
    # One row, vocab 3, tokens [0, 2, 1]; completion = last two tokens.
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]]])
    input_ids = torch.tensor([[0, 2, 1]])
    mask = torch.tensor([[0, 1, 1]])
    out = token_logprobs(logits, input_ids, mask, temperature=1.0)
    expected_1 = 3.0 - math.log(math.exp(1) + math.exp(2) + math.exp(3))  # token 2 after logits[0]
    expected_2 = -math.log(3.0)  # token 1 after uniform logits[1]
    assert out.shape == (1, 3)
    assert out[0, 0].item() == 0.0
    assert out[0, 1].item() == pytest.approx(expected_1, abs=1e-6)
    assert out[0, 2].item() == pytest.approx(expected_2, abs=1e-6)


def test_temperature_scales_logits_and_zero_means_untempered():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    input_ids = torch.randint(0, 11, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    hot = token_logprobs(logits, input_ids, mask, temperature=0.5)
    manual = token_logprobs(logits * 2.0, input_ids, mask, temperature=1.0)
    assert torch.allclose(hot, manual, atol=1e-6)
    assert not torch.allclose(hot, token_logprobs(logits, input_ids, mask), atol=1e-3)
    assert torch.allclose(token_logprobs(logits, input_ids, mask, temperature=0.0), token_logprobs(logits, input_ids, mask))


def test_masked_positions_are_zero_and_gradients_flow():
    logits = torch.randn(3, 6, 7, requires_grad=True)
    input_ids = torch.randint(0, 7, (3, 6))
    mask = torch.zeros(3, 6, dtype=torch.long)
    mask[:, 3:] = 1
    out = token_logprobs(logits, input_ids, mask, temperature=0.7)
    assert (out[:, :3] == 0).all() and (out[:, 3:] < 0).all()
    out.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        token_logprobs(torch.randn(1, 4, 3), torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 5))


def test_drift_stats_hand_computed():
    sampler = torch.tensor([[0.0, -1.0, -2.0, -3.0]])
    learner = torch.tensor([[9.0, -1.5, -2.0, -2.0]])
    mask = torch.tensor([[0, 1, 1, 1]])
    stats = drift_stats(sampler, learner, mask)
    diffs = [-0.5, 0.0, 1.0]
    assert stats["tokens"] == 3
    assert stats["abs_diff_mean"] == pytest.approx(0.5)
    assert stats["abs_diff_max"] == pytest.approx(1.0)
    assert stats["ratio_mean"] == pytest.approx(sum(math.exp(d) for d in diffs) / 3)
    assert stats["kl"] == pytest.approx(sum(math.exp(d) - 1 - d for d in diffs) / 3)
    empty = drift_stats(sampler, learner, torch.zeros_like(mask))
    assert empty["tokens"] == 0 and empty["ratio_mean"] == 1.0


@pytest.mark.parametrize("chunk_elements", [1, 6 * 11, 3 * 6 * 11, 1 << 24])
def test_chunking_does_not_change_values_or_gradients(chunk_elements):
    torch.manual_seed(0)
    logits = torch.randn(5, 6, 11, requires_grad=True)
    input_ids = torch.randint(0, 11, (5, 6))
    mask = torch.randint(0, 2, (5, 6))
    reference = torch.stack([torch.cat([torch.zeros(1), torch.log_softmax(logits[b, :-1] / 0.7, -1)
                                        .gather(-1, input_ids[b, 1:, None]).squeeze(-1)]) for b in range(5)]) * mask
    out = token_logprobs(logits, input_ids, mask, temperature=0.7, chunk_elements=chunk_elements)
    assert torch.allclose(out, reference, atol=1e-6)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    (expected,) = torch.autograd.grad(reference.sum(), logits)
    assert torch.allclose(grad, expected, atol=1e-6)
