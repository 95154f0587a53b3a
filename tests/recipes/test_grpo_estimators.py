"""Every advantage estimator a GRPO recipe can select, run end to end; batch statistics over ranks; SPO's
tracker; ReMax's greedy baseline; the logged KL with the penalty in the reward."""

from __future__ import annotations

import json
import math

import pytest

from posttrain.algorithms import ADVANTAGE_ESTIMATORS, TOKEN_ADVANTAGE_ESTIMATORS
from tests.conftest import REPO, read_metrics, run_cli, write_jsonl
from tests.recipes.test_grpo import BAD_REWARDS, RECIPE, grpo_args

RECORDING_REWARD = '''
import json, os
from reward_models.text import completion_text  # conversational completions are message lists

def recorded(prompts, completions, **kw):
    completions = [completion_text(c) for c in completions]
    with open(os.environ["REWARD_LOG"], "a") as f:
        f.write(json.dumps({"prompts": list(prompts), "completions": list(completions)}) + "\\n")
    return [(len(c) % 5) / 4 for c in completions]
'''

# (id, recipe settings): every estimator by name, plus the options that turn batch statistics on.
ESTIMATOR_RUNS = [(name, [f"grpo.estimator={name}"]) for name in ADVANTAGE_ESTIMATORS.names()] + [
    ("grpo-scale-batch", ["grpo.estimator=grpo", "grpo.estimator_args={scale: batch}"]),
    ("rloo-normalize", ["grpo.estimator=rloo", "grpo.estimator_args={normalize: true}"]),
]


def _uses_batch_statistics(settings: list[str]) -> bool:
    name = settings[0].split("=", 1)[1]
    if name in ("grpo", "rloo"):  # only with the options above
        return len(settings) > 1
    return "batch_stats" in ADVANTAGE_ESTIMATORS.needs(name)


def _steps(out) -> list[dict]:
    return [r for r in read_metrics(out) if "reward/mean" in r]


def _common(tiny_model, arithmetic_data, tmp_path, *extra):
    (tmp_path / "r.py").write_text(BAD_REWARDS)
    return grpo_args(tiny_model, arithmetic_data, tmp_path / "x", f"grpo.rewards=[{{name: '{tmp_path}/r.py:varied'}}]",
                     "train.micro_batch_size=4", "train.global_batch_size=16", "learner.lr=1e-3", *extra)


def test_the_matrix_covers_every_registered_estimator():
    covered = {settings[0].split("=", 1)[1] for _, settings in ESTIMATOR_RUNS}
    assert covered == set(ADVANTAGE_ESTIMATORS.names())


@pytest.mark.slow
@pytest.mark.parametrize("settings", [s for _, s in ESTIMATOR_RUNS],
                         ids=[f"{i}-1-and-2-processes" if _uses_batch_statistics(s) else f"{i}-1-process-per-group-only"
                              for i, s in ESTIMATOR_RUNS])
def test_every_estimator_trains_and_batch_statistics_match_over_ranks(settings, tiny_model, arithmetic_data, tmp_path):
    """Two steps in one process; an estimator with batch statistics also on two processes, where it must give
    the one-process losses (every rank computes the advantages on the gathered batch)."""
    common = _common(tiny_model, arithmetic_data, tmp_path, *settings)
    one = run_cli("run", RECIPE, *common, f"output_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    a = _steps(tmp_path / "one")
    assert len(a) == 2 and a[0]["reward/std"] > 0
    assert all(math.isfinite(r["loss"]) for r in a)
    if not _uses_batch_statistics(settings):
        return
    two = run_cli("run", RECIPE, "--nproc", "2", *common, f"output_dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    b = _steps(tmp_path / "two")
    for x, y in zip(a, b, strict=True):
        assert x["reward/mean"] == pytest.approx(y["reward/mean"], abs=1e-6)
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-4)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3)


def test_estimator_options_are_checked_before_launch(tiny_model, arithmetic_data, tmp_path):
    common = _common(tiny_model, arithmetic_data, tmp_path, f"output_dir={tmp_path / 'o'}")
    wrong = run_cli("run", RECIPE, *common, "grpo.estimator=grpo", "grpo.estimator_args={scael: batch}")
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "grpo has no option 'scael'" in wrong.stderr and "scale" in wrong.stderr
    supplied = run_cli("run", RECIPE, *common, "grpo.estimator=remax", "grpo.estimator_args={baseline_rewards: 0}")
    assert supplied.returncode == 2 and "the trainer supplies 'baseline_rewards'" in supplied.stderr
    remax_async = run_cli("run", RECIPE, *common, "grpo.estimator=remax", "rollout.placement=disaggregated",
                          "rollout.ranks=1", "rollout.schedule=one_step_async", "--nproc", "2")
    assert remax_async.returncode == 2 and "rollout.schedule: sync" in remax_async.stderr


@pytest.mark.slow
def test_remax_baseline_is_the_reward_of_the_greedy_completion(tiny_model, arithmetic_data, tmp_path):
    (tmp_path / "rec.py").write_text(RECORDING_REWARD)
    log = tmp_path / "calls.jsonl"
    out = tmp_path / "run"
    result = run_cli("run", RECIPE, *grpo_args(tiny_model, arithmetic_data, out, "grpo.estimator=remax",
                                                f"grpo.rewards=[{{name: '{tmp_path}/rec.py:recorded'}}]",
                                                "train.max_steps=1", "rollout.temperature=1.0"),
                     env={"REWARD_LOG": str(log)})
    assert result.returncode == 0, result.stderr[-3000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    # evaluation (8 held-out prompts), then step 1: the 4 x 4 samples and, after them (a refill may change
    # the step's prompts), the greedy baseline (one completion per prompt, 4 prompts), then evaluation again
    sizes = [len(c["completions"]) for c in calls]
    assert sizes == [8, 16, 4, 8], sizes
    sampled, greedy = calls[1], calls[2]
    assert greedy["prompts"] == sampled["prompts"][::4]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.data.tokenize import render_chat

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    for prompt, completion in zip(greedy["prompts"], greedy["completions"], strict=True):
        text = render_chat(tokenizer, prompt, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        expected = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
        expected_text = tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
        # vLLM's detokenizer holds back a trailing incomplete UTF-8 sequence that decode() shows as U+FFFD
        assert completion.rstrip("\ufffd") == expected_text.rstrip("\ufffd")
    baseline = sum((len(c) % 5) / 4 for c in greedy["completions"]) / 4
    (step,) = _steps(out)
    assert step["remax/baseline_reward"] == pytest.approx(baseline)


@pytest.mark.slow
def test_kl_in_the_reward_is_logged(tiny_model, arithmetic_data, tmp_path):
    common = _common(tiny_model, arithmetic_data, tmp_path, "grpo.kl_coef=0.5", "grpo.kl_in=reward",
                     "grpo.kl_estimator=k1", "learner.lr=5e-3", "train.max_steps=3")
    result = run_cli("run", RECIPE, *common, f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = _steps(tmp_path / "run")
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference before any update
    assert abs(steps[2]["kl"]) > 1e-6  # and has moved away from it two updates later


def _spo_data(tmp_path):
    rows = [{"prompt": f"Add {a} and {b}.", "answer": str(a + b)} for a, b in ((1, 2), (3, 4), (5, 6), (7, 8))]
    return {"train": write_jsonl(tmp_path / "spo.jsonl", rows), "test": write_jsonl(tmp_path / "spo_test.jsonl", rows)}


def _tracker(run, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step-{step:06d}" / "trainer_state.json").read_text())["spo"]


@pytest.mark.slow
def test_spo_tracker_follows_the_papers_update_on_every_rank_and_survives_kill_and_resume(tiny_model, tmp_path):
    """4 prompts, all in every step, one sample each, 2 processes. With rho_max = 0.96 and the 0.5 / 0.5 prior,
    a prompt's first update gives alpha + beta = 0.96 * 1 + 1; the next one alpha' = rho alpha + r with
    rho = clip(2 ** (-D / 0.06), 0.875, 0.96), D the policy movement between the two updates."""
    data = _spo_data(tmp_path)
    (tmp_path / "r.py").write_text(BAD_REWARDS)
    common = grpo_args(tiny_model, data, tmp_path / "x", "grpo.estimator=spo", "rollout.n=1",
                       f"grpo.rewards=[{{name: '{tmp_path}/r.py:varied'}}]", "grpo.eval_prompts=0",
                       "train.global_batch_size=4", "train.micro_batch_size=2", "learner.lr=5e-3",
                       "train.max_steps=3", "checkpoint.every_n_steps=1", "checkpoint.keep_last=5", "--nproc", "2")
    whole = run_cli("run", RECIPE, *common, f"output_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    steps = _steps(tmp_path / "whole")
    assert [s["spo/rank_spread"] for s in steps] == [0.0, 0.0, 0.0]  # the same tracker on both ranks
    first, second = _tracker(tmp_path / "whole", 1), _tracker(tmp_path / "whole", 2)
    assert len(first["alpha"]) == 4 and first["movement"] > 0
    for key in first["alpha"]:
        assert first["alpha"][key] + first["beta"][key] == pytest.approx(1.96)
        reward = first["alpha"][key] - 0.48
        assert 0 <= reward <= 1
        rho = min(max(2 ** (-(first["movement"] - first["seen_at"][key]) / 0.06), 0.875), 0.96)
        total = second["alpha"][key] + second["beta"][key]
        assert total == pytest.approx(rho * 1.96 + 1)
        assert -1e-9 <= second["alpha"][key] - rho * first["alpha"][key] <= 1 + 1e-9  # + this step's reward
    assert second["alpha"] != first["alpha"]

    killed = run_cli("run", RECIPE, *common, f"output_dir={tmp_path / 'cut'}",
                     env={"POSTTRAIN_FAULT_KILL_AFTER_STEP": "2"})
    assert killed.returncode != 0
    resumed = run_cli("run", RECIPE, *common, f"output_dir={tmp_path / 'cut'}", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for key in ("alpha", "beta", "movement", "seen_at"):
        assert _tracker(tmp_path / "cut", 3)[key] == pytest.approx(_tracker(tmp_path / "whole", 3)[key], abs=1e-6)


def test_recipes_name_only_registered_estimators():
    import yaml

    for path in sorted((REPO / "recipes").glob("*.yaml")):
        section = yaml.safe_load(path.read_text()).get("grpo") or {}
        if "estimator" in section:
            assert section["estimator"] in ADVANTAGE_ESTIMATORS or section["estimator"] in TOKEN_ADVANTAGE_ESTIMATORS, \
                path.name
