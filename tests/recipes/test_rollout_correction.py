"""Rollout correction (``grpo.rollout_correction``, ``ppo.rollout_correction``, ``grpo.tis_cap``) end to end.

On CPU the engine samples with the learner's own weights, so the learner/sampler ratio of every token and
sequence is 1 to float rounding. With ``clip_max: 0.5`` truncation therefore weights every loss token by
exactly 0.5 (the first step's loss halves, whatever the level), and masking drops every token (the loss
is 0). Both follow from the definition and fail if the weights are not applied.
"""

from __future__ import annotations

import pytest

from tests.conftest import read_metrics, run_cli
from tests.recipes.test_grpo import BAD_REWARDS, grpo_args
from tests.recipes.test_grpo import RECIPE as GRPO_RECIPE
from tests.recipes.test_ppo import RECIPE as PPO_RECIPE
from tests.recipes.test_ppo import ppo_args


def _first_step(out) -> dict:
    return next(r for r in read_metrics(out) if "reward/mean" in r)


def _grpo(tiny_model, arithmetic_data, tmp_path, name, *extra) -> dict:
    (tmp_path / "r.py").write_text(BAD_REWARDS)
    result = run_cli("run", GRPO_RECIPE, *grpo_args(
        tiny_model, arithmetic_data, tmp_path / name, f"grpo.rewards=[{{name: '{tmp_path}/r.py:varied'}}]",
        "train.max_steps=1", "grpo.epochs=1", *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    return _first_step(tmp_path / name)


@pytest.mark.slow
def test_grpo_rollout_correction_weights_every_level_and_mode(tiny_model, arithmetic_data, tmp_path):
    # a separate old-log-prob pass, as any correction implies, so the baseline computes the loss the same way
    base = _grpo(tiny_model, arithmetic_data, tmp_path, "base", "grpo.rollout_correction.level=token",
                 "grpo.rollout_correction.clip_max=1e6")
    assert abs(base["loss"]) > 1e-4 and base["drift/tis_mean_weight"] == pytest.approx(1.0, abs=1e-3)
    for level in ("token", "sequence", "geometric"):
        half = _grpo(tiny_model, arithmetic_data, tmp_path, f"half-{level}", f"grpo.rollout_correction.level={level}",
                     "grpo.rollout_correction.clip_max=0.5")
        assert half["loss"] == pytest.approx(0.5 * base["loss"], rel=1e-4), level
        assert half["drift/tis_clipped_frac"] == 1.0 and half["drift/tis_mean_weight"] == pytest.approx(0.5)
    masked = _grpo(tiny_model, arithmetic_data, tmp_path, "mask", "grpo.rollout_correction.level=sequence",
                   "grpo.rollout_correction.mode=mask", "grpo.rollout_correction.clip_max=0.5")
    assert masked["loss"] == 0.0 and masked["drift/tis_mean_weight"] == 0.0
    short = _grpo(tiny_model, arithmetic_data, tmp_path, "short", "grpo.tis_cap=0.5")  # the short form
    assert short["loss"] == pytest.approx(0.5 * base["loss"], rel=1e-4)


@pytest.fixture
def ppo_rewards(tmp_path):
    path = tmp_path / "ppo_rewards.py"
    path.write_text("from reward_models.text import completion_text\ndef varied(prompts, completions, **kw):\n"
                    "    return [(len(completion_text(c)) % 5) / 4 for c in completions]\n")
    return path


@pytest.mark.slow
def test_ppo_rollout_correction_weights_the_policy_loss(tiny_model, arithmetic_data, ppo_rewards, tmp_path):
    def run(name, *extra):
        # one epoch and one mini-batch: the step's policy loss is computed on the weights that sampled
        result = run_cli("run", PPO_RECIPE, *ppo_args(tiny_model, arithmetic_data, tmp_path / name, ppo_rewards,
                                                      "train.max_steps=1", "ppo.epochs=1",
                                                      "train.global_batch_size=8", *extra))
        assert result.returncode == 0, result.stderr[-3000:]
        return _first_step(tmp_path / name)

    base = run("base")
    half = run("half", "ppo.rollout_correction.level=token", "ppo.rollout_correction.clip_max=0.5")
    # on policy the loss value is -mean(A) = 0 for whitened advantages; its gradient is not, and halves
    assert base["grad_norm"] > 1e-4
    assert half["grad_norm"] == pytest.approx(0.5 * base["grad_norm"], rel=1e-3)
    assert half["critic_grad_norm"] == pytest.approx(base["critic_grad_norm"], rel=1e-5)  # the critic is not reweighted
    masked = run("mask", "ppo.rollout_correction.level=geometric", "ppo.rollout_correction.mode=mask",
                 "ppo.rollout_correction.clip_max=0.5")
    assert masked["policy_loss"] == 0.0 and masked["grad_norm"] == 0.0


def test_tis_cap_and_rollout_correction_together_are_refused(tiny_model, arithmetic_data, tmp_path):
    result = run_cli("run", GRPO_RECIPE, *grpo_args(tiny_model, arithmetic_data, tmp_path / "run", "grpo.tis_cap=2",
                                                     "grpo.rollout_correction.level=sequence"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "tis_cap is the short form of rollout_correction" in result.stderr
    bad = run_cli("run", GRPO_RECIPE, *grpo_args(tiny_model, arithmetic_data, tmp_path / "run2",
                                                  "grpo.rollout_correction.level=token",
                                                  "grpo.rollout_correction.clip_min=3",
                                                  "grpo.rollout_correction.clip_max=2"))
    assert bad.returncode == 2 and "clip_min <= clip_max" in bad.stderr
