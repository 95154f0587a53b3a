"""Loss aggregation modes and global-batch normalisation across micro-batches and ranks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.algorithms import LOSS_AGGREGATIONS, aggregate_loss, local_loss_counts

from ._data import DTYPE

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0], [99.0, 99.0, 99.0]], dtype=DTYPE)
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # the third row is empty


def test_modes_by_hand():
    assert aggregate_loss(LOSS, MASK, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(LOSS, MASK, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate_loss(LOSS, MASK, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    # Dr. GRPO: every row counts, each divided by the constant.
    assert aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm", norm_constant=5).item() == pytest.approx(
        10 / (3 * 5)
    )


def test_global_counts_and_divisor():
    assert aggregate_loss(LOSS, MASK, "token-mean", global_num_tokens=8).item() == pytest.approx(10 / 8)
    assert aggregate_loss(LOSS, MASK, "seq-mean-token-mean", global_num_seqs=6).item() == pytest.approx(6 / 6)
    assert aggregate_loss(
        LOSS, MASK, "token-mean", global_num_tokens=8, gradient_divisor=4
    ).item() == pytest.approx(5.0)
    counts = local_loss_counts(MASK)
    assert (counts["num_tokens"].item(), counts["num_seqs"].item(), counts["num_rows"].item()) == (4, 2, 3)


def test_errors():
    with pytest.raises(ValueError, match="norm_constant"):
        aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="Did you mean 'token-mean'"):
        aggregate_loss(LOSS, MASK, "token_mean")
    with pytest.raises(ValueError, match="shape"):
        aggregate_loss(LOSS, MASK[:, :2], "token-mean")


def test_all_zero_mask_gives_zero_not_nan():
    for mode in LOSS_AGGREGATIONS:
        out = aggregate_loss(LOSS, torch.zeros_like(MASK), mode, norm_constant=3)
        assert out.item() == 0.0, mode


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    mode=st.sampled_from(sorted(LOSS_AGGREGATIONS)),
    ranks=st.integers(1, 3),
    micro=st.integers(1, 3),
)
def test_global_normalisation_reproduces_the_full_batch_loss(seed, mode, ranks, micro):
    """Split a batch over `ranks` ranks x `micro` accumulation steps. Each micro-batch aggregates with the
    global counts and gradient_divisor = ranks; DDP then averages over ranks. The result -- and its
    gradient -- equals the loss of the whole batch at once, whatever the micro-batch token counts."""
    g = torch.Generator().manual_seed(seed)
    n = ranks * micro * 2
    loss = torch.randn(n, 5, generator=g, dtype=DTYPE).requires_grad_(True)
    lengths = torch.randint(0, 6, (n,), generator=g)
    mask = (torch.arange(5) < lengths.unsqueeze(1)).long()
    full = aggregate_loss(loss, mask, mode, norm_constant=5)
    counts = local_loss_counts(mask)
    global_seqs = counts["num_rows"] if mode == "seq-mean-token-sum-norm" else counts["num_seqs"]
    per_rank = []
    for r in range(ranks):
        total = 0.0
        for m in range(micro):
            rows = slice((r * micro + m) * 2, (r * micro + m + 1) * 2)
            total = total + aggregate_loss(
                loss[rows],
                mask[rows],
                mode,
                global_num_tokens=counts["num_tokens"],
                global_num_seqs=global_seqs,
                norm_constant=5,
                gradient_divisor=ranks,
            )
        per_rank.append(total)
    ddp = sum(per_rank) / ranks
    torch.testing.assert_close(ddp, full)
    (g_full,) = torch.autograd.grad(full, loss)
    (g_split,) = torch.autograd.grad(ddp, loss)
    torch.testing.assert_close(g_split, g_full)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), mode=st.sampled_from(sorted(LOSS_AGGREGATIONS)), pad=st.integers(1, 4))
def test_padding_invariance(seed, mode, pad):
    g = torch.Generator().manual_seed(seed)
    loss = torch.randn(3, 4, generator=g, dtype=DTYPE)
    mask = (torch.rand(3, 4, generator=g) > 0.3).long()
    base = aggregate_loss(loss, mask, mode, norm_constant=4)
    padded = aggregate_loss(
        torch.cat([loss, torch.full((3, pad), float("inf"), dtype=DTYPE)], 1),
        torch.cat([mask, torch.zeros(3, pad, dtype=mask.dtype)], 1),
        mode,
        norm_constant=4,
    )
    torch.testing.assert_close(padded, base)


def test_docs_worked_example():
    """The example in docs/algorithms.md: micro-batches [1, 3] and six 1s."""
    a_loss, a_mask = torch.tensor([[1.0, 3.0]], dtype=DTYPE), torch.ones(1, 2)
    b_loss, b_mask = torch.ones(1, 6, dtype=DTYPE), torch.ones(1, 6)
    mean_of_means = (aggregate_loss(a_loss, a_mask) + aggregate_loss(b_loss, b_mask)) / 2
    assert mean_of_means.item() == pytest.approx(1.5)
    a = aggregate_loss(a_loss, a_mask, global_num_tokens=8)
    b = aggregate_loss(b_loss, b_mask, global_num_tokens=8)
    assert (a.item(), b.item()) == (pytest.approx(0.5), pytest.approx(0.75))
    assert (a + b).item() == pytest.approx(1.25)
