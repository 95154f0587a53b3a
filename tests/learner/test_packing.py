"""Padding-free forward passes (posttrain.learner.packing): the packing plan, the layout round trip, and the
same logits, values and gradients as the padded forward on real transformers models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

from posttrain.learner.packing import pack, padding_free_forward, plan_rows


def test_first_fit_decreasing_by_hand():
    # sorted: 5 (0), 4 (3), 3 (1), 2 (2), 1 (4); rows of 5: [5], [4, 1], [3, 2]
    assert plan_rows([5, 3, 2, 4, 1], capacity=5) == [[0], [3, 4], [1, 2]]
    assert plan_rows([7, 2], capacity=5) == [[0], [1]]  # too long for a row: a row of its own
    assert plan_rows([0, 2, 0], capacity=4) == [[1]]  # nothing to compute for empty rows


def right_padded(lengths: list[int], width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, 500, (len(lengths), width), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def test_pack_then_unpack_restores_the_padded_layout():
    ids, mask = right_padded([9, 3, 4, 1, 6], width=9)
    packed = pack(ids, mask)
    assert packed.input_ids.shape == (3, 9)  # [9], [6, 3], [4, 1]
    restored = packed.unpack(packed.input_ids[..., None].float())[..., 0].long()
    assert torch.equal(restored, ids * mask)
    # positions restart at 0 for every sequence
    assert packed.position_ids[1].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2]


@pytest.mark.parametrize("head", ["causal_lm", "token_classification"])
def test_padding_free_forward_matches_the_padded_one(head, tiny_model):
    cls = AutoModelForCausalLM if head == "causal_lm" else AutoModelForTokenClassification
    model = cls.from_pretrained(tiny_model, dtype=torch.float32, **({"num_labels": 1} if head != "causal_lm" else {}))
    model.eval()  # no dropout; the cache stays off in the packed call
    ids, mask = right_padded([20, 7, 13, 3, 20, 11], width=20, seed=1)
    padded = model(input_ids=ids, attention_mask=mask).logits
    packed = padding_free_forward(lambda **kw: model(**kw).logits, ids, mask)
    keep = mask.bool()
    assert packed.shape == padded.shape
    assert torch.allclose(packed[keep], padded[keep], atol=1e-5)
    assert packed[~keep].abs().sum() == 0

    weight = model.model.layers[0].self_attn.q_proj.weight
    grads = []
    for logits in (padded, packed):
        model.zero_grad()
        (logits[keep] ** 2).mean().backward(retain_graph=True)
        grads.append(weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)
