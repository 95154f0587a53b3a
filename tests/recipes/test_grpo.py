"""GRPO end to end on the real vLLM CPU engine and DeepSpeed learner, and its failure policies."""

from __future__ import annotations

import json
import math
import string

import pytest

from tests.conftest import REPO, read_metrics, run_cli, write_jsonl

RECIPE = str(REPO / "recipes" / "grpo.yaml")

BAD_REWARDS = '''
import math, time
from reward_models.text import completion_text  # conversational completions are message lists

def raises(prompts, completions, **kw):
    raise RuntimeError("boom")

def nan(prompts, completions, **kw):
    return [math.nan for _ in completions]

def hangs(prompts, completions, **kw):
    time.sleep(60)
    return [0.0 for _ in completions]

def short(prompts, completions, **kw):
    return [1.0 if len(c) < 20 else 0.0 for c in map(completion_text, completions)]

def varied(prompts, completions, **kw):
    return [(len(c) % 5) / 4 for c in map(completion_text, completions)]
'''


def grpo_args(tiny_model, data, out, *extra):
    return [f"model.path={tiny_model}", f"data.path={data['train']}", f"data.eval_path={data['test']}",
            f"output_dir={out}", "train.max_steps=2", "grpo.prompts_per_step=4", "rollout.n=4", "rollout.max_tokens=12",
            "train.global_batch_size=8", "train.micro_batch_size=8", "grpo.eval_prompts=8", "train.eval_every=0",
            "logging.progress=false", "logging.tensorboard=false", *extra]


def test_grpo_runs_with_vllm_and_syncs(tiny_model, arithmetic_data, tmp_path):
    out = tmp_path / "run"
    result = run_cli("run", RECIPE, *grpo_args(tiny_model, arithmetic_data, out, "checkpoint.every_n_steps=1",
                                                "grpo.kl_coef=0.05", "grpo.epochs=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [r for r in read_metrics(out) if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        assert record["completion_tokens"] > 0 and 0 <= record["reward/mean"] <= 1
        assert record["sync/seconds"] > 0 and 0 < record["time/sync_share"] < 1
        assert record["drift/abs_diff_max"] < 1e-3  # sampler and learner agree on the same weights
        assert record["kl"] >= 0 and record["time/samples_per_s"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["eval_end"]) >= {"accuracy", "reward", "completion_tokens"}
    assert (out / "checkpoints" / "last" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_padding_free_updates_match_padded_ones(tiny_model, arithmetic_data, tmp_path):
    """grpo.padding_free (the default) packs the learner's, the old policy's and the reference's forwards:
    the same losses, KL, gradient norms and sampler agreement as padding every sequence to the longest."""
    (tmp_path / "r.py").write_text(BAD_REWARDS)
    runs = {}
    for padding_free in ("true", "false"):
        out = tmp_path / padding_free
        result = run_cli("run", RECIPE, *grpo_args(tiny_model, arithmetic_data, out, "grpo.kl_coef=0.05",
                                                    "grpo.epochs=2", "grpo.entropy_coef=0.01", "learner.lr=1e-3",
                                                    f"grpo.rewards=[{{name: '{tmp_path}/r.py:varied'}}]",
                                                    f"grpo.padding_free={padding_free}", "logging.plots=false"))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[padding_free] = {r["step"]: r for r in read_metrics(out) if "reward/mean" in r}
    packed, padded = runs["true"], runs["false"]
    assert sorted(packed) == sorted(padded) == [1, 2]
    for step in (1, 2):
        assert packed[step]["reward/mean"] == pytest.approx(padded[step]["reward/mean"], abs=1e-6)
        for key in ("loss", "kl", "drift/abs_diff_mean"):
            assert packed[step][key] == pytest.approx(padded[step][key], rel=1e-3, abs=1e-6), key
        assert packed[step]["grad_norm"] == pytest.approx(padded[step]["grad_norm"], rel=1e-3)
    assert packed[1]["grad_norm"] > 0 and packed[1]["kl"] >= 0


def test_grpo_batch_rule_names_the_numbers(tiny_model, arithmetic_data, tmp_path):
    result = run_cli("run", RECIPE, *grpo_args(tiny_model, arithmetic_data, tmp_path / "r", "train.global_batch_size=6"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "prompts_per_step x rollout.n = 16" in result.stderr and "global_batch_size (6)" in result.stderr


# "raises" takes the recipe's stop path in the default tier; nan and timeout detection are the same RewardFailure
# there, unit-tested in tests/rewards/test_reward_set.py, and run end to end in the slow tier.
@pytest.mark.parametrize("reward", ["raises", pytest.param("nan", marks=pytest.mark.slow),
                                    pytest.param("hangs", marks=pytest.mark.slow)])
def test_failing_reward_stops_with_its_name(reward, tiny_model, arithmetic_data, tmp_path):
    (tmp_path / "bad.py").write_text(BAD_REWARDS)
    spec = f"grpo.rewards=[{{name: '{tmp_path}/bad.py:{reward}'}}]"
    result = run_cli("run", RECIPE, *grpo_args(tiny_model, arithmetic_data, tmp_path / "r", spec,
                                               "grpo.reward_timeout=3"))
    assert result.returncode != 0
    assert reward in result.stderr and "row" in result.stderr


def test_failing_reward_scores_zero_when_asked(tiny_model, arithmetic_data, tmp_path):
    (tmp_path / "bad.py").write_text(BAD_REWARDS)
    spec = f"grpo.rewards=[{{name: '{tmp_path}/bad.py:raises'}}, {{name: '{tmp_path}/bad.py:short'}}]"
    out = tmp_path / "r"
    result = run_cli("run", RECIPE, *grpo_args(tiny_model, arithmetic_data, out, spec, "grpo.reward_on_error=zero"))
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [r for r in read_metrics(out) if "reward/mean" in r]
    assert all(r["reward/issues"] == 16 for r in steps)  # every row of the raising reward, counted
    assert "reward/short" in steps[0]


def test_overlong_prompts_are_dropped_and_counted_or_stop(tiny_model, arithmetic_data, tmp_path):
    rows = [json.loads(line) for line in arithmetic_data["train"].read_text().splitlines()][:40]
    rows[3]["prompt"] = [{"role": "user", "content": "What is " + " + ".join(["1"] * 200) + "?"}]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    args = grpo_args(tiny_model, {"train": data, "test": arithmetic_data["test"]}, tmp_path / "r", "grpo.max_prompt_length=64")
    stop = run_cli("run", RECIPE, *args, "data.overlong=error", "--check")
    assert stop.returncode == 2 and "train.jsonl, row 4" in stop.stderr and "max_prompt_length=64" in stop.stderr
    check = run_cli("run", RECIPE, *args, "data.overlong=drop", "--check")
    assert check.returncode == 0, check.stderr[-2000:]
    assert "1 dropped as too long" in check.stdout


def test_entry_point_and_file_rewards_work_from_a_recipe(tiny_model, arithmetic_data, tmp_path):
    """A reward registered by an installed package's `posttrain.rewards` entry point, named in a recipe."""
    from tests.rewards.test_loading import make_dist

    site = tmp_path / "site"
    site.mkdir()
    make_dist(site, "exact_plugin", "exact_plugin", "from reward_models.text import completion_text\ndef exact(prompts, completions, answer, **kw):\n"
              "    return [1.0 if a in completion_text(c) else 0.0 for c, a in zip(completions, answer)]\n",
              {"exact_answer": "exact_plugin:exact"})
    (tmp_path / "mine.py").write_text("from reward_models.text import completion_text\n"
                                      "def brevity(prompts, completions, **kw):\n"
                                      "    return [-len(completion_text(c)) / 100 for c in completions]\n")
    spec = f"grpo.rewards=[{{name: exact_answer}}, {{name: '{tmp_path}/mine.py:brevity', weight: 0.5}}]"
    out = tmp_path / "r"
    result = run_cli("run", RECIPE, *grpo_args(tiny_model, arithmetic_data, out, spec, "train.max_steps=1"),
                     env={"PYTHONPATH": f"{REPO}:{site}"})
    assert result.returncode == 0, result.stderr[-3000:]
    step = [r for r in read_metrics(out) if "reward/mean" in r][0]
    assert "reward/exact_answer" in step and "reward/brevity" in step and step["reward/brevity"] < 0


@pytest.mark.slow
def test_two_processes_zero3_match_one_process(tiny_model, arithmetic_data, tmp_path):
    """Colocated placement: each rank samples its share with prompt-derived seeds and holds a ZeRO-3 shard.

    One optimizer step per rollout: with several mini-batches their composition depends on the rank split.
    """
    (tmp_path / "r.py").write_text(BAD_REWARDS)
    common = grpo_args(tiny_model, arithmetic_data, tmp_path / "x", f"grpo.rewards=[{{name: '{tmp_path}/r.py:varied'}}]",
                       "train.micro_batch_size=4", "train.global_batch_size=16", "learner.lr=1e-3")
    one = run_cli("run", RECIPE, *common, f"output_dir={tmp_path / 'one'}")
    two = run_cli("run", RECIPE, "--nproc", "2", "learner.zero_stage=3", *common, f"output_dir={tmp_path / 'two'}")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    a = [r for r in read_metrics(tmp_path / "one") if "reward/mean" in r]
    b = [r for r in read_metrics(tmp_path / "two") if "reward/mean" in r]
    assert len(a) == len(b) == 2
    assert a[0]["reward/std"] > 0  # the reward separates samples, so the update is not trivially zero
    for x, y in zip(a, b):
        assert x["reward/mean"] == pytest.approx(y["reward/mean"], abs=1e-6)
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-4)


@pytest.mark.slow
def test_nonfinite_loss_stops_with_a_clear_error_or_is_skipped(tiny_model, arithmetic_data, tmp_path):
    """A NaN loss at step 2 (injected, as a diverging run would produce): ``stop`` ends the run with exit 3,
    a one-line message and the step-1 checkpoint intact; ``skip`` drops those micro-batches, counts them and
    finishes."""
    poison = {"POSTTRAIN_FAULT_NAN_LOSS_AT_STEP": "2"}
    out = tmp_path / "stop"
    stop = run_cli("run", RECIPE, *grpo_args(tiny_model, arithmetic_data, out, "checkpoint.every_n_steps=1"),
                   env=poison)
    assert stop.returncode == 3 and "Traceback" not in stop.stderr, stop.stderr[-3000:]
    assert "the loss is nan at step 2" in stop.stderr and "step-000001" in stop.stderr
    assert "grpo.nonfinite_loss=skip" in stop.stderr
    assert (out / "checkpoints" / "step-000001" / "COMPLETE").is_file()
    assert not (out / "checkpoints" / "step-000002").exists()

    out = tmp_path / "skip"
    skip = run_cli("run", RECIPE, *grpo_args(tiny_model, arithmetic_data, out, "grpo.nonfinite_loss=skip"), env=poison)
    assert skip.returncode == 0, skip.stderr[-3000:]
    steps = {r["step"]: r for r in read_metrics(out) if "reward/mean" in r}
    # 16 samples, 2 mini-batches of 8, one micro-batch each: both of step 2 are dropped
    assert steps[1]["nonfinite_skipped"] == 0 and steps[2]["nonfinite_skipped"] == 2
    assert all(math.isfinite(r["loss"]) for r in steps.values())
    from safetensors.torch import load_file  # a skipped micro-batch must leave the weights finite

    weights = load_file(str(out / "checkpoints" / "last" / "model" / "model.safetensors"))
    assert all(bool(t.isfinite().all()) for t in weights.values())


def test_empty_completions_are_scored_counted_and_trained_on(tiny_model, arithmetic_data, tmp_path):
    """Completions cut to nothing by stop strings (every printable ASCII character; the random model's rare
    non-ASCII text survives): the rewards see "" (math_verify gives 0), the share is logged, and the step
    still trains (on the end-of-text / stop token vLLM produced)."""
    stops = json.dumps([c for c in string.printable])
    out = tmp_path / "r"
    result = run_cli("run", RECIPE, *grpo_args(tiny_model, arithmetic_data, out, f"rollout.stop={stops}",
                                               "train.max_steps=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    (step,) = [r for r in read_metrics(out) if "reward/mean" in r]
    assert 0.75 <= step["completion/empty_share"] <= 1.0
    assert step["reward/mean"] == 0.0 and step["reward/unscored"] == 0
    assert math.isfinite(step["loss"])


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_uninterrupted_run(tiny_model, arithmetic_data, tmp_path):
    """kill -9 right after the step-2 checkpoint, then ``resume=auto``: steps 3-4 match the uninterrupted run
    (sampling seeds derive from the step, the engine is re-synced from the checkpoint's weights)."""
    (tmp_path / "r.py").write_text(BAD_REWARDS)
    common = grpo_args(tiny_model, arithmetic_data, tmp_path / "x", f"grpo.rewards=[{{name: '{tmp_path}/r.py:varied'}}]",
                       "train.max_steps=4", "checkpoint.every_n_steps=2", "learner.lr=1e-3")
    whole = run_cli("run", RECIPE, *common, f"output_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = run_cli("run", RECIPE, *common, f"output_dir={tmp_path / 'cut'}",
                     env={"POSTTRAIN_FAULT_KILL_AFTER_STEP": "2"})
    assert killed.returncode != 0
    resumed = run_cli("run", RECIPE, *common, f"output_dir={tmp_path / 'cut'}", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = {r["step"]: r for r in read_metrics(tmp_path / "whole") if "reward/mean" in r}
    b = {r["step"]: r for r in read_metrics(tmp_path / "cut") if "reward/mean" in r}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert a[3]["reward/std"] > 0
    for step in (3, 4):
        assert b[step]["reward/mean"] == pytest.approx(a[step]["reward/mean"], abs=1e-6)
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], abs=1e-5)


def test_grpo_with_lora_syncs_only_the_adapter(tiny_model, arithmetic_data, tmp_path):
    """A LoRA learner's engine serves the adapter; the sampler still agrees with the learner after each sync."""
    (tmp_path / "r.py").write_text(BAD_REWARDS)
    out = tmp_path / "run"
    result = run_cli("run", RECIPE, *grpo_args(tiny_model, arithmetic_data, out, "model.lora.enabled=true",
                                                "rollout.lora_sync=adapter",  # auto merges on CPU
                                                f"grpo.rewards=[{{name: '{tmp_path}/r.py:varied'}}]",
                                                "learner.lr=2e-2", "grpo.kl_coef=0.05"))
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = [r for r in read_metrics(out) if "reward/mean" in r]
    model_bytes = sum(p.stat().st_size for p in tiny_model.glob("*.safetensors"))
    for record in (first, second):
        assert record["sync/adapter_only"] == 1.0
        assert record["drift/abs_diff_max"] < 1e-3  # sampler and learner agree: the engine served the adapter
    assert first["sync/base_bytes"] > 0  # the first adapter sync sends the frozen base once
    assert second["sync/base_bytes"] == 0 and second["sync/bytes"] < model_bytes / 10
    assert second["kl"] > 0  # the adapter moved the policy away from the base, so step 2 sampled from it
    print(f"\nLoRA GRPO: sync {first['sync/seconds'] * 1000:.0f} / {second['sync/seconds'] * 1000:.0f} ms, "
          f"{first['sync/bytes'] / 2**20:.2f} / {second['sync/bytes'] / 2**10:.0f} KiB; drift "
          f"{first['drift/abs_diff_max']:.1e} / {second['drift/abs_diff_max']:.1e}; kl {second['kl']:.2e}")
