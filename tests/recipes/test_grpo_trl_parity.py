"""GRPO's first optimizer step against TRL's GRPOTrainer: same tiny model, batch, completions, rewards and
settings give the same loss and the same parameter gradients (as tests/recipes/test_dpo.py does for DPO).

TRL's side is its own ``GRPOTrainer.compute_loss`` on a trainer built by ``posttrain.compare.trl``; ours is the
micro-batch loss the GRPO trainer back-propagates (``posttrain.trainers.grpo_update.micro_batch_loss``) on a plain
transformers model. TRL's advantages come from TRL's own code (tests/algorithms/_trl_harness.py), ours from our
estimator; the reference log-probs (beta > 0) come from a second, different tiny model, so the KL term and its
gradient are not trivially zero.

TRL's default ``use_bias_correction_kl=True`` multiplies the k3 KL by the importance ratio: 1 in value, but on
policy its gradient becomes (log pi - log pi_ref) grad log pi, the gradient of k2. That is our ``k3+`` (k3's
value, k2's gradient); ``use_bias_correction_kl=False`` is our plain ``k3``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.algorithms._trl_harness import trl_grpo_advantages
from tests.conftest import assert_same_gradients

GROUP, PROMPTS, PROMPT_LEN, MAX_COMPLETION = 4, 2, 6, 10
REWARDS = torch.tensor([1.0, 0.0, 0.5, 0.25, 0.0, 0.0, 1.0, 0.75])

# TRL loss_type -> (our estimator, our loss_agg, TRL scale_rewards)
SETTINGS = {"grpo": ("grpo", "seq-mean-token-mean", "group"),
            "dapo": ("grpo", "token-mean", "group"),
            "dr_grpo": ("dr_grpo", "seq-mean-token-sum-norm", "none")}


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    from posttrain.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-ref") / "model", seed=1)


def _batch(vocab: int, eos: int):
    """Equal-length prompts (TRL left-pads, which would shift positions), completions of varied length."""
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(5, vocab, (PROMPTS, PROMPT_LEN), generator=generator).repeat_interleave(GROUP, 0)
    lengths = [10, 3, 7, 10, 1, 5, 9, 4]
    completion_ids = torch.full((GROUP * PROMPTS, MAX_COMPLETION), eos, dtype=torch.long)
    completion_mask = torch.zeros_like(completion_ids)
    for row, length in enumerate(lengths):
        completion_ids[row, :length] = torch.randint(5, vocab, (length,), generator=generator)
        completion_mask[row, :length] = 1
    return prompt_ids, completion_ids, completion_mask


def _logprobs(model, input_ids, attention_mask, completion_positions):
    from posttrain.rollout import token_logprobs

    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return token_logprobs(logits, input_ids, completion_positions)


@pytest.mark.parametrize("beta, kl_estimator, bias_correction", [(0.0, "k3", True), (0.04, "k3", False),
                                                                  (0.04, "k3+", True)],
                         ids=["beta0", "beta0.04-k3", "beta0.04-bias-corrected-k3+"])
@pytest.mark.parametrize("loss_type", sorted(SETTINGS))
def test_first_step_loss_and_gradients_equal_trl_grpo_trainer(loss_type, beta, kl_estimator, bias_correction,
                                                              tiny_model, other_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain import algorithms
    from posttrain.compare.trl import grpo_trainer
    from posttrain.trainers.grpo import GRPOSettings, micro_batch_loss

    estimator, loss_agg, scale = SETTINGS[loss_type]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt_ids, completion_ids, completion_mask = _batch(len(tokenizer), tokenizer.eos_token_id)
    batch = prompt_ids.shape[0]
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([torch.ones_like(prompt_ids), completion_mask], 1)
    completion_positions = torch.cat([torch.zeros_like(prompt_ids), completion_mask], 1)  # our [B, L] layout
    reference = AutoModelForCausalLM.from_pretrained(other_model).eval()
    ref_logprobs = _logprobs(reference, input_ids, attention_mask, completion_positions)

    # --- TRL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = grpo_trainer(str(tiny_model), [{"prompt": "x"}] * PROMPTS, tmp_path / "trl",
                               reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                               num_generations=GROUP, prompts_per_step=PROMPTS, max_completion_length=MAX_COMPLETION,
                               lr=1e-3, max_steps=1, loss_type=loss_type, beta=beta, scale_rewards=scale,
                               use_bias_correction_kl=bias_correction)
    trainer.current_gradient_accumulation_steps = 1
    theirs_advantages = trl_grpo_advantages(REWARDS, GROUP, scale_rewards=scale)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": theirs_advantages,
              "num_items_in_batch": completion_mask.sum(), "ref_per_token_logps": ref_logprobs[:, PROMPT_LEN:]}
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()

    # --- ours
    settings = GRPOSettings(estimator=estimator, loss_agg=loss_agg, kl_coef=beta, kl_estimator=kl_estimator,
                            estimator_args={"eps": 1e-4} if estimator == "grpo" else {}, padding_free=False)
    advantages = algorithms.group_advantages(estimator, REWARDS, GROUP, **settings.estimator_args)
    torch.testing.assert_close(advantages, theirs_advantages.float(), rtol=1e-5, atol=1e-6)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model).train()
    loss_mask = completion_positions.float()
    agg = {"global_num_tokens": float(loss_mask.sum()), "global_num_seqs": float(batch),
           "norm_constant": float(MAX_COMPLETION), "gradient_divisor": 1}
    out = micro_batch_loss(policy, settings, input_ids, attention_mask, completion_positions, None, ref_logprobs,
                           advantages[:, None].expand_as(loss_mask), loss_mask, None, agg, 1.0)
    out.loss.backward()

    # a batch with signal (on policy the loss value itself can be 0: -mean(A) over a group is 0)
    assert sum(p.grad.norm() for p in policy.parameters()) > 1e-3
    torch.testing.assert_close(out.loss, trl_loss.detach(), rtol=1e-5, atol=1e-7)
    assert_same_gradients(policy, trainer.model, rtol=1e-4)
