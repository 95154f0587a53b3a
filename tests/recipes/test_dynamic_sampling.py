"""DAPO dynamic sampling with refill: selection rule, end to end on 1 and 2 processes."""

from __future__ import annotations

import math

import pytest

from posttrain.trainers.dynamic_sampling import ScoredGroup, fill_with_informative_groups, refill_prompt_ids
from tests.conftest import read_metrics, run_cli
from tests.recipes.test_grpo import RECIPE, grpo_args

# Prompts with an even answer get the same reward for every sample (no signal); odd ones vary with the text.
HALF_INFORMATIVE = '''
from reward_models.text import completion_text  # conversational completions are message lists
def half(prompts, completions, answer, **kw):
    return [float(len(completion_text(c)) % 2) if int(a) % 2 else 0.0 for c, a in zip(completions, answer)]
'''


def group(name: str, rewards: list[float]) -> ScoredGroup:
    return ScoredGroup(row=name, samples=[], rewards=rewards, scores={}, issues=[])


def test_informative_groups_come_first_in_global_order_and_the_rest_is_padded():
    first = [group("a", [1, 1]), group("b", [0, 1]), group("c", [0, 0]), group("d", [math.nan, 1])]
    rounds = {1: [group("e", [1, 0]), group("f", [2, 2]), group("g", [0.5, 0]), group("h", [3, 1])]}
    calls = []

    def more(round_):
        calls.append(round_)
        return rounds.get(round_, [group(f"x{round_}", [1, 1])] * 4)

    mine, metrics = fill_with_informative_groups(first, more, target=4, max_rounds=3, rank=0, world_size=1)
    assert [g.row for g in mine] == ["b", "e", "g", "h"] and calls == [1]
    assert metrics == {"dynamic_sampling/rounds": 1.0, "dynamic_sampling/generated_groups": 8.0,
                       "dynamic_sampling/informative_groups": 4.0, "dynamic_sampling/padded_groups": 0.0}
    # with no informative refills, the cap ends the search and round-0 groups without signal fill the step
    mine, metrics = fill_with_informative_groups(first, lambda k: [group("z", [1, 1])] * 4, target=4, max_rounds=2,
                                                 rank=0, world_size=1)
    assert [g.row for g in mine] == ["b", "a", "c", "d"]
    assert metrics["dynamic_sampling/rounds"] == 2 and metrics["dynamic_sampling/padded_groups"] == 3


def test_refill_draws_depend_on_seed_step_and_round_only():
    a = refill_prompt_ids(100, 8, seed=0, step=3, round_=1)
    assert a == refill_prompt_ids(100, 8, seed=0, step=3, round_=1) and len(set(a)) == 8
    assert a != refill_prompt_ids(100, 8, seed=0, step=3, round_=2) != refill_prompt_ids(100, 8, seed=1, step=3, round_=1)
    assert len(refill_prompt_ids(3, 8, seed=0, step=0, round_=1)) == 8  # a dataset smaller than a step


def _run(tiny_model, arithmetic_data, tmp_path, name, *extra):
    (tmp_path / "half.py").write_text(HALF_INFORMATIVE)
    out = tmp_path / name
    result = run_cli("run", RECIPE, *grpo_args(tiny_model, arithmetic_data, out, "grpo.dynamic_sampling=true",
                                                f"grpo.rewards=[{{name: '{tmp_path}/half.py:half'}}]",
                                                "train.micro_batch_size=4", "train.global_batch_size=16",
                                                "learner.lr=1e-3", *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    return [r for r in read_metrics(out) if "reward/mean" in r]


@pytest.mark.slow
def test_refill_fills_the_step_with_informative_groups(tiny_model, arithmetic_data, tmp_path):
    masked = _run(tiny_model, arithmetic_data, tmp_path, "mask", "grpo.dynamic_sampling_max_rounds=0")
    assert max(r["filtered_share"] for r in masked) > 0  # without refill, groups without signal are dropped
    refilled = _run(tiny_model, arithmetic_data, tmp_path, "refill", "grpo.dynamic_sampling_max_rounds=8")
    for record in refilled:
        assert record["dynamic_sampling/informative_groups"] >= 4
        assert record["dynamic_sampling/padded_groups"] == 0 and record["filtered_share"] == 0
    assert sum(r["dynamic_sampling/rounds"] for r in refilled) >= 1  # some step needed more prompts


@pytest.mark.slow
def test_refill_on_two_processes_matches_one(tiny_model, arithmetic_data, tmp_path):
    one = _run(tiny_model, arithmetic_data, tmp_path, "one", "grpo.dynamic_sampling_max_rounds=8")
    two = _run(tiny_model, arithmetic_data, tmp_path, "two", "grpo.dynamic_sampling_max_rounds=8", "--nproc", "2")
    for x, y in zip(one, two, strict=True):
        for key in ("reward/mean", "dynamic_sampling/rounds", "dynamic_sampling/informative_groups", "filtered_share"):
            assert x[key] == pytest.approx(y[key], abs=1e-6), key
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-4)
