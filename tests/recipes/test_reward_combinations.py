"""Reward ensembles over real ``orm`` models and objective combinations (MaxMin-RLHF and the rest): the combined
column against each member scored on its own, batch statistics over ranks, recipe keys in GRPO and PPO, and
clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from reward_models import Ensemble, RewardSet
from tests.conftest import read_metrics, run_cli

PROMPTS = ["What is 2 + 3?"] * 4 + ["What is 7 + 1?"] * 2
COMPLETIONS = ["2 + 3 = 5. The answer is \\boxed{5}.", "5", "It is 6.", "\\boxed{5}", "8", "7 + 1 = 9"]


@pytest.fixture(scope="module")
def two_orms(tiny_model, tmp_path_factory):
    """Two 1-label sequence-classification models on the tiny backbone, with differently seeded heads."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        path = tmp_path_factory.mktemp(f"orm{seed}")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


def _orm_specs(paths):
    return [{"name": "orm", "label": f"rm{i}", "args": {"model": str(p)}} for i, p in enumerate(paths)]


@pytest.mark.parametrize("method", ["mean", "wco", "uwo"])
def test_ensemble_of_orm_models_reduces_each_members_own_scores(method, two_orms):
    alone = [RewardSet([spec]).score(PROMPTS, COMPLETIONS).totals for spec in _orm_specs(two_orms)]
    members = torch.tensor(alone, dtype=torch.float64)
    assert not torch.allclose(members[0], members[1])  # the heads differ, so the reduction matters
    expected = {"mean": members.mean(0), "wco": members.min(0).values,
                "uwo": members.mean(0) - 0.3 * members.var(0, unbiased=False)}[method]
    rewards = RewardSet(_orm_specs(two_orms), ensemble=Ensemble(["rm0", "rm1"], method, uwo_coef=0.3))
    result = rewards.score(PROMPTS, COMPLETIONS)
    torch.testing.assert_close(torch.tensor(result.scores["ensemble"], dtype=torch.float64), expected)
    torch.testing.assert_close(torch.tensor(result.totals, dtype=torch.float64), expected)
    assert result.scores["rm0"] == pytest.approx(alone[0])  # the members are still reported


def _fixed(values):
    def reward(prompts, completions, **kw):
        return list(values)
    return reward


def test_ensemble_takes_its_members_place_next_to_other_rewards():
    rewards = RewardSet([{"name": _fixed([1.0, 4.0]), "label": "a"}, {"name": _fixed([3.0, 2.0]), "label": "b"},
                         {"name": _fixed([10.0, 20.0]), "label": "c", "weight": 0.5}],
                        ensemble=Ensemble(["a", "b"], "wco", weight=2.0))
    assert rewards.score(["p", "q"], ["x", "y"]).totals == [2 * 1.0 + 5.0, 2 * 2.0 + 10.0]


def test_objectives_by_hand():
    columns = [{"name": _fixed([1.0, 3.0, None]), "label": "a"}, {"name": _fixed([2.0, 0.0, 5.0]), "label": "b",
                                                                   "weight": 2.0}]
    score = {m: RewardSet(columns, objectives=m, temperature=0.5).score(["p"] * 3, ["x"] * 3).totals
             for m in ("weighted_sum", "min", "softmin", "maxmin")}
    # objectives are weight x reward: a = [1, 3], b = [4, 0]; the third row has no score from a
    assert score["weighted_sum"] == [5.0, 3.0, None]
    assert score["min"] == [1.0, 0.0, None]
    soft = [-0.5 * math.log(math.exp(-1 / 0.5) + math.exp(-4 / 0.5)), -0.5 * math.log(math.exp(-3 / 0.5) + 1.0)]
    assert score["softmin"][:2] == pytest.approx(soft) and score["softmin"][2] is None
    assert score["maxmin"] == [1.0, 3.0, None]  # batch means a: 2, b: 2 -> the first lowest, a


def test_maxmin_takes_the_worst_objective_of_the_whole_step_over_ranks():
    """On its own, this rank's part of the batch makes b the worst objective; the other rank's sums (given by
    reduce_sum, as all_reduce does) make a the worst over the step, and every rank must then train on a."""
    rewards = RewardSet([{"name": _fixed([1.0, 1.0]), "label": "a"}, {"name": _fixed([1.0, 0.0]), "label": "b"}],
                        objectives="maxmin")
    assert rewards.score(["p", "q"], ["x", "y"]).totals == [1.0, 0.0]  # local means: a 1.0, b 0.5 -> b
    other_rank = [0.0, 10.0, 2.0]  # sums of a, of b, and the row count on the other rank: a 0.5, b 2.75

    def reduce_sum(values):
        return [v + o for v, o in zip(values, other_rank, strict=True)]

    assert rewards.score(["p", "q"], ["x", "y"], reduce_sum=reduce_sum).totals == [1.0, 1.0]


@pytest.mark.parametrize("kwargs,message", [
    ({"ensemble": Ensemble(["a", "zz"])}, "ensemble member 'zz' is not a reward"),
    ({"ensemble": Ensemble(["a"])}, "at least two different members"),
    ({"ensemble": Ensemble(["a", "b"], "median")}, "Unknown reward ensemble reduction 'median'"),
    ({"ensemble": Ensemble(["a", "b"], label="a")}, "already a reward's label"),
    ({"objectives": "maxmean"}, "Unknown multi-objective combination 'maxmean'"),
    ({"objectives": "maxmin", "rule": "mean"}, "replace the combination rule"),
])
def test_bad_combinations_are_user_errors(kwargs, message):
    from posttrain.errors import UserError

    with pytest.raises(UserError, match=message):
        RewardSet([{"name": _fixed([1.0]), "label": "a"}, {"name": _fixed([2.0]), "label": "b"}], **kwargs)


def test_bad_ensemble_in_a_recipe_stops_before_launch(tiny_model, arithmetic_data, tmp_path):
    from tests.recipes.test_grpo import RECIPE, grpo_args

    result = run_cli("run", RECIPE, *grpo_args(tiny_model, arithmetic_data, tmp_path / "o",
                                               "grpo.reward_ensemble={members: [math_verify, nope]}"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "ensemble member 'nope' is not a reward" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["grpo", "ppo"])
def test_orm_ensemble_trains_in_grpo_and_ppo(trainer, two_orms, tiny_model, arithmetic_data, tmp_path):
    """The recipe key end to end: with wco the logged ensemble reward is the mean of per-sample minima, so it
    cannot exceed either member's mean, and it is the reward trained on (reward/mean)."""
    from tests.recipes.test_grpo import RECIPE as GRPO_RECIPE
    from tests.recipes.test_grpo import grpo_args
    from tests.recipes.test_ppo import RECIPE as PPO_RECIPE
    from tests.recipes.test_ppo import REWARDS, ppo_args

    specs = ", ".join(f"{{name: orm, label: rm{i}, args: {{model: '{p}'}}}}" for i, p in enumerate(two_orms))
    settings = [f"{trainer}.rewards=[{specs}]", f"{trainer}.reward_ensemble={{members: [rm0, rm1], method: wco}}"]
    out = tmp_path / "run"
    if trainer == "grpo":
        args = grpo_args(tiny_model, arithmetic_data, out, *settings)
        recipe = GRPO_RECIPE
    else:
        (tmp_path / "r.py").write_text(REWARDS)
        args = ppo_args(tiny_model, arithmetic_data, out, tmp_path / "r.py", "train.max_steps=2",
                        "ppo.reward_norm=false", "ppo.kl_coef=0.0", "ppo.kl_target=null", *settings)
        recipe = PPO_RECIPE
    result = run_cli("run", recipe, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [r for r in read_metrics(out) if "reward/mean" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["reward/ensemble"] <= min(r["reward/rm0"], r["reward/rm1"]) + 1e-6
        assert r["reward/mean"] == pytest.approx(r["reward/ensemble"], abs=1e-5)
