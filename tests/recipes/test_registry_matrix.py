"""The registry matrix: every name a recipe can select runs 2 steps of its trainer on the tiny model in one
process; every name that uses batch statistics also runs on 2 processes and must match one process for the same
global batch and seed. (The advantage estimators have their own matrix in tests/recipes/test_grpo_estimators.py, the
ranking losses in tests/recipes/test_listwise_rm.py.) A name that cannot run says why in its test id."""

from __future__ import annotations

import math
from typing import get_args, get_type_hints

import pytest

from posttrain import algorithms
from posttrain.trainers.online import OnlineSettings
from tests.conftest import read_metrics, run_cli
from tests.recipes.test_dpo import RECIPE as DPO_RECIPE
from tests.recipes.test_dpo import dpo_args, pairs  # noqa: F401 - pytest fixture
from tests.recipes.test_grpo import RECIPE as GRPO_RECIPE
from tests.recipes.test_grpo import grpo_args
from tests.recipes.test_ppo import RECIPE as PPO_RECIPE
from tests.recipes.test_ppo import ppo_args

# Two rewards that disagree: a length-based one and a count of digits, on different scales.
TWO_REWARDS = '''
from reward_models.text import completion_text  # conversational completions are message lists
def by_length(prompts, completions, **kw):
    return [(len(c) % 5) / 4 for c in map(completion_text, completions)]

def by_digits(prompts, completions, **kw):
    return [sum(ch.isdigit() for ch in c) / 4 for c in map(completion_text, completions)]
'''


def _two_rewards(tmp_path) -> str:
    (tmp_path / "two.py").write_text(TWO_REWARDS)
    return (f"grpo.rewards=[{{name: '{tmp_path}/two.py:by_length', label: a}}, "
            f"{{name: '{tmp_path}/two.py:by_digits', label: b, weight: 0.5}}]")


def _steps(out) -> list[dict]:
    return [r for r in read_metrics(out) if "reward/mean" in r]


# (registry, name) -> the GRPO settings that select it; batch_stats marks the ones that need 2 processes too.
GRPO_RUNS: list[tuple[str, list[str], bool]] = (
    [(f"policy_loss={n}", [f"grpo.policy_loss={n}", "grpo.epochs=2"], False) for n in algorithms.POLICY_LOSSES]
    + [(f"loss_agg={n}", [f"grpo.loss_agg={n}"], False) for n in algorithms.LOSS_AGGREGATIONS]
    + [(f"kl_estimator={n}", [f"grpo.kl_estimator={n}", "grpo.kl_coef=0.1"], False) for n in algorithms.KL_ESTIMATORS]
    + [(f"reward_objectives={n}", [f"grpo.reward_objectives={n}", "REWARDS"],
        "batch_means" in algorithms.OBJECTIVE_COMBINATIONS.needs(n)) for n in algorithms.OBJECTIVE_COMBINATIONS]
    + [(f"reward_ensemble={n}", [f"grpo.reward_ensemble={{members: [a, b], method: {n}}}", "REWARDS"], False)
       for n in algorithms.ENSEMBLE_REDUCTIONS]
    # best_random draws its second sample: the draw must be the same on 1 and 2 processes
    + [(f"pf_ppo={n}", [f"grpo.pf_ppo={n}"], n == "best_random")
       for n in get_args(get_type_hints(OnlineSettings)["pf_ppo"]) if n != "off"]
    # HAPO (2 processes: its history is updated from the gathered batch); `a` stands in for the verifier
    + [(f"length_reward={n}", [f"grpo.hapo={{enabled: true, length_reward: {n}, correctness_reward: a}}"], True)
       for n in algorithms.LENGTH_REWARDS]
    + [(f"token_estimator={n}", [f"grpo.estimator={n}", "grpo.kl_coef=0.1", "grpo.kl_in=reward"],
        "batch_stats" in algorithms.TOKEN_ADVANTAGE_ESTIMATORS.needs(n))
       for n in algorithms.TOKEN_ADVANTAGE_ESTIMATORS if "values" not in algorithms.TOKEN_ADVANTAGE_ESTIMATORS.needs(n)]
)


CRITIC_ESTIMATORS = [n for n in algorithms.TOKEN_ADVANTAGE_ESTIMATORS
                     if "values" in algorithms.TOKEN_ADVANTAGE_ESTIMATORS.needs(n)]


def _id(name: str, batch_stats: bool) -> str:
    return f"{name}-1-and-2-processes" if batch_stats else f"{name}-1-process-no-batch-statistics"


def test_the_grpo_matrix_covers_every_registry_name():
    selected = {run[0] for run in GRPO_RUNS}
    for prefix, registry in (("policy_loss", algorithms.POLICY_LOSSES), ("loss_agg", algorithms.LOSS_AGGREGATIONS),
                             ("kl_estimator", algorithms.KL_ESTIMATORS),
                             ("reward_objectives", algorithms.OBJECTIVE_COMBINATIONS),
                             ("reward_ensemble", algorithms.ENSEMBLE_REDUCTIONS),
                             ("length_reward", algorithms.LENGTH_REWARDS)):
        assert {f"{prefix}={n}" for n in registry} <= selected
    # gae and egae need a critic: GRPO rejects them before launch (test_critic_estimators_are_rejected_in_grpo)
    assert {f"token_estimator={n}" for n in algorithms.TOKEN_ADVANTAGE_ESTIMATORS} - selected == {
        f"token_estimator={n}" for n in CRITIC_ESTIMATORS}
    assert "gae" in CRITIC_ESTIMATORS


@pytest.mark.slow
@pytest.mark.parametrize("settings,batch_stats", [(s, b) for _, s, b in GRPO_RUNS],
                         ids=[_id(n, b) for n, _, b in GRPO_RUNS])
def test_every_grpo_name_trains(settings, batch_stats, tiny_model, arithmetic_data, tmp_path):
    settings = [_two_rewards(tmp_path) if s == "REWARDS" else s for s in settings]
    if not any(s.startswith("grpo.rewards=") for s in settings):
        settings = [_two_rewards(tmp_path), *settings]
    common = grpo_args(tiny_model, arithmetic_data, tmp_path / "x", "train.micro_batch_size=4",
                       "train.global_batch_size=16", "learner.lr=1e-3", *settings)
    one = run_cli("run", GRPO_RECIPE, *common, f"output_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    a = _steps(tmp_path / "one")
    assert len(a) == 2 and all(math.isfinite(r["loss"]) for r in a)
    assert a[0]["reward/a"] >= 0 and a[0]["reward/b"] >= 0  # both rewards scored every step
    pf = next((x.split("=", 1)[1] for x in settings if x.startswith("grpo.pf_ppo=")), None)
    if pf is not None:  # n = 4: best_of_n keeps 1 sample per prompt, the others 2 (1 where all rewards tie)
        shares = [r["filtered_share"] for r in a]
        assert all(x == pytest.approx(0.75) for x in shares) if pf == "best_of_n" else \
            all(0.5 - 1e-9 <= x <= 0.75 + 1e-9 for x in shares), shares
    if not batch_stats:
        return
    two = run_cli("run", GRPO_RECIPE, "--nproc", "2", *common, f"output_dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    for x, y in zip(a, _steps(tmp_path / "two"), strict=True):
        assert x["reward/mean"] == pytest.approx(y["reward/mean"], abs=1e-6)
        assert x["filtered_share"] == pytest.approx(y["filtered_share"], abs=1e-9)
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-4)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3)


@pytest.mark.parametrize("name", CRITIC_ESTIMATORS)
def test_critic_estimators_are_rejected_in_grpo(name, tiny_model, arithmetic_data, tmp_path):
    result = run_cli("run", GRPO_RECIPE, *grpo_args(tiny_model, arithmetic_data, tmp_path / "o", f"grpo.estimator={name}"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "needs a critic" in result.stderr and "trainer: ppo" in result.stderr


# PPO: the KL estimators of its per-token penalty, PF-PPO and the combinations of its rewards.
PPO_RUNS = ([(f"kl_estimator={n}", [f"ppo.kl_estimator={n}"]) for n in algorithms.KL_ESTIMATORS]
            + [(f"loss_agg={n}", [f"ppo.loss_agg={n}"]) for n in algorithms.LOSS_AGGREGATIONS]
            + [("pf_ppo=best_worst", ["ppo.pf_ppo=best_worst", "rollout.n=4", "train.global_batch_size=8"]),
               ("reward_objectives=maxmin", ["ppo.reward_objectives=maxmin"]),
               ("reward_ensemble=wco", ["ppo.reward_ensemble={members: [varied, math_verify], method: wco}"])])


@pytest.mark.slow
@pytest.mark.parametrize("settings", [s for _, s in PPO_RUNS], ids=[n for n, _ in PPO_RUNS])
def test_every_ppo_name_trains(settings, tiny_model, arithmetic_data, tmp_path):
    from tests.recipes.test_ppo import REWARDS

    (tmp_path / "r.py").write_text(REWARDS)
    args = ppo_args(tiny_model, arithmetic_data, tmp_path / "run", tmp_path / "r.py", "train.max_steps=2", *settings)
    result = run_cli("run", PPO_RECIPE, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = _steps(tmp_path / "run")
    assert len(steps) == 2 and all(math.isfinite(r["policy_loss"]) for r in steps)


# DPO: every preference loss, on pairs.


# What some losses need besides the loss name: EXO's epsilon; MODPO's weights and the other objectives' rewards.
LOSS_SETTINGS = {"exo_pair": ["dpo.label_smoothing=0.001"], "kto": ["dpo.loss_args={kl: 0.0}"], "modpo": ["dpo.loss_args={modpo_weights: [0.5, 0.5]}"]}


def _with_margin_rewards(source: dict, tmp_path) -> dict:
    """The pairs plus a second objective's rewards (here: the completions' lengths), as MODPO reads them."""
    import json

    out = {}
    for split, path in source.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            row["margin_rewards_chosen"] = len(json.dumps(row["chosen"])) / 100
            row["margin_rewards_rejected"] = len(json.dumps(row["rejected"])) / 100
        out[split] = tmp_path / f"{split}.jsonl"
        out[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("loss", algorithms.PREFERENCE_LOSSES.names())
def test_every_preference_loss_trains(loss, tiny_model, pairs, tmp_path):  # noqa: F811 - fixture
    data = _with_margin_rewards(pairs, tmp_path) if loss == "modpo" else pairs
    result = run_cli("run", DPO_RECIPE, *dpo_args(tiny_model, data, tmp_path / "run", f"dpo.loss_type=[{loss}]",
                                                  "train.max_steps=2", *LOSS_SETTINGS.get(loss, [])))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r and "step" in r]
    assert [r["step"] for r in records][:2] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)


def test_policy_loss_options_are_checked_before_launch(tiny_model, arithmetic_data, tmp_path):
    result = run_cli("run", GRPO_RECIPE, *grpo_args(tiny_model, arithmetic_data, tmp_path / "o", "grpo.policy_loss=kl_cov",
                                                    "grpo.policy_loss_args={clip_low: 0.2}"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "kl_cov has no option 'clip_low'" in result.stderr and "kl_cov_ratio" in result.stderr


def test_losses_that_need_more_say_so_before_launch(tiny_model, pairs, tmp_path):  # noqa: F811 - fixture
    exo = run_cli("run", DPO_RECIPE, *dpo_args(tiny_model, pairs, tmp_path / "a", "dpo.loss_type=[exo_pair]"))
    assert exo.returncode == 2 and "needs 0 < dpo.label_smoothing < 1" in exo.stderr and "Traceback" not in exo.stderr
    kto = run_cli("run", DPO_RECIPE, *dpo_args(tiny_model, pairs, tmp_path / "k", "dpo.loss_type=[kto]"))
    assert kto.returncode == 2 and "dpo.loss_args.kl" in kto.stderr and "Traceback" not in kto.stderr
    modpo = run_cli("run", DPO_RECIPE, *dpo_args(tiny_model, pairs, tmp_path / "b", "dpo.loss_type=[modpo]"))
    assert modpo.returncode == 2 and "modpo_weights" in modpo.stderr
    no_columns = run_cli("run", DPO_RECIPE, *dpo_args(tiny_model, pairs, tmp_path / "c", "dpo.loss_type=[modpo]",
                                                      "dpo.loss_args={modpo_weights: [0.5, 0.5]}"))
    assert no_columns.returncode == 2 and "margin_rewards_chosen" in no_columns.stderr
    assert "Traceback" not in no_columns.stderr
