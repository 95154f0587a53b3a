"""PPO with a critic on the real vLLM CPU engine and DeepSpeed learners: end to end, the advantage wiring
checked by hand, kill -9 and resume, the critic from a reward model, and the batch rules."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import REPO, read_metrics, run_cli

RECIPE = str(REPO / "recipes" / "ppo.yaml")

REWARDS = '''
from reward_models.text import completion_text  # conversational completions are message lists
def varied(prompts, completions, **kw):
    return [(len(c) % 5) / 4 for c in map(completion_text, completions)]
'''

# Timings, sync costs and the memory high-water mark differ between runs; everything else must not.
VOLATILE = ("time/", "sync/")
# Tiny models: one intra-op thread is as fast as two, and does not spin when the cores are shared.
ENV = {"OMP_NUM_THREADS": "1"}


def ppo_args(tiny_model, data, out, rewards_file, *extra):
    return [f"model.path={tiny_model}", f"data.path={data['train']}", f"data.eval_path={data['test']}",
            f"output_dir={out}", "train.max_steps=3", "ppo.prompts_per_step=4", "rollout.n=2", "rollout.max_tokens=12",
            "train.global_batch_size=4", "train.micro_batch_size=2", "ppo.eval_prompts=4", "train.eval_every=0",
            f"ppo.rewards=[{{name: '{rewards_file}:varied'}}, {{name: math_verify, weight: 0.0}}]",
            "ppo.kl_target=0.5", "ppo.kl_horizon=20", "ppo.value_clip=0.01", "ppo.critic.lr=1e-3", "learner.lr=1e-3",
            "ppo.critic.pretrain_steps=0",
            "checkpoint.every_n_steps=1", "checkpoint.keep_last=3", "logging.progress=false",
            "logging.tensorboard=false", "logging.plots=false", *extra]


def steps(run_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in read_metrics(run_dir)
            if "reward/mean" in r]


@pytest.fixture(scope="module")
def rewards_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppo_rewards") / "rewards.py"
    path.write_text(REWARDS)
    return path


@pytest.fixture(scope="module")
def ppo_run(tiny_model, arithmetic_data, rewards_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo") / "run"
    result = run_cli("run", RECIPE, *ppo_args(tiny_model, arithmetic_data, out, rewards_file, "ppo.save_batches=true"),
                     env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_ppo_runs_end_to_end_and_saves_policy_and_critic(ppo_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    records = steps(ppo_run)
    assert [r["step"] for r in records] == [1, 2, 3]
    expected = {"reward/mean", "accuracy", "kl", "kl_coef", "policy_loss", "value_loss", "clipfrac", "vf_clipfrac",
                "approx_kl", "explained_variance", "advantages/mean", "advantages/std", "entropy",
                "drift/abs_diff_max", "reward/running_std", "critic_grad_norm"}
    for record in records:
        assert expected <= set(record), expected - set(record)
        assert all(math.isfinite(v) for v in record.values() if isinstance(v, float))
        assert record["entropy"] > 0 and 0 <= record["clipfrac"] <= 1
        assert record["drift/abs_diff_max"] < 1e-3  # sampler and learner agree on the same weights
    assert any(r["vf_clipfrac"] > 0 for r in records)  # value_clip=0.01 is active
    assert [r["kl_coef"] for r in records][0] == 0.05 and records[-1]["kl_coef"] != 0.05  # adaptive
    timings = [r for r in read_metrics(ppo_run) if "time/generate_s" in r]
    assert all(r[f"time/{k}_s"] > 0 for r in timings for k in ("generate", "reward", "train", "sync"))

    checkpoint = ppo_run / "checkpoints" / "last"
    assert (checkpoint / "model" / "model.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(checkpoint / "model")
    critic = AutoModelForTokenClassification.from_pretrained(checkpoint / "critic").eval()
    assert critic.config.num_labels == 1
    saved = load_file(str(checkpoint / "critic" / "model.safetensors"))
    for name, tensor in critic.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    with torch.no_grad():
        assert critic(torch.tensor([[5, 17, 42]])).logits.shape == (1, 3, 1)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["kl_controller"]["value"] == pytest.approx(records[-1]["kl_coef"], rel=0.25)
    assert state["reward_stats"]["count"] == 3 * 8


def test_advantages_returns_and_whitening_match_a_hand_computation(ppo_run):
    """Step 2's logged tensors, recomputed in plain Python: the score normalised by the statistics of every
    score so far, at the last token, minus the per-token KL penalty; GAE over the critic's values (after one
    step of critic training, so not the zeros it starts with); whitening over every token of the batch."""
    first = torch.load(ppo_run / "batches" / "step-000001-rank-0.pt")
    batch = torch.load(ppo_run / "batches" / "step-000002-rank-0.pt")
    mask = batch["loss_mask"].bool()
    beta, gamma, lam = batch["kl_coef"], batch["gamma"], batch["lam"]
    assert (first["values"] == 0).all()  # the value head starts at zero
    seen = [float(s) for s in first["scores"]] + [float(s) for s in batch["scores"]]
    mean = sum(seen) / len(seen)
    std = math.sqrt(sum((s - mean) ** 2 for s in seen) / len(seen))
    scores = [float(s) for s in batch["scores"]]
    all_adv, all_ret = [], []
    for i in range(mask.shape[0]):
        positions = mask[i].nonzero().flatten().tolist()
        shaped = max(-5.0, min(5.0, (scores[i] - mean) / (std + 1e-8)))
        assert float(batch["shaped_scores"][i]) == pytest.approx(shaped, abs=1e-5)
        logp = [float(batch["logprobs"][i, t]) for t in positions]
        ref = [float(batch["ref_logprobs"][i, t]) for t in positions]
        values = [float(batch["values"][i, t]) for t in positions]
        rewards = [-beta * (a - b) for a, b in zip(logp, ref)]
        rewards[-1] += shaped
        adv, next_value, next_adv = [0.0] * len(positions), 0.0, 0.0
        for k in reversed(range(len(positions))):
            delta = rewards[k] + gamma * next_value - values[k]
            adv[k] = next_adv = delta + gamma * lam * next_adv
            next_value = values[k]
        for k, t in enumerate(positions):
            assert float(batch["token_rewards"][i, t]) == pytest.approx(rewards[k], abs=1e-5)
            assert float(batch["advantages"][i, t]) == pytest.approx(adv[k], abs=1e-4)
            assert float(batch["returns"][i, t]) == pytest.approx(adv[k] + values[k], abs=1e-4)
        all_adv += adv
        all_ret += [a + v for a, v in zip(adv, values)]
    adv_mean = sum(all_adv) / len(all_adv)
    adv_std = math.sqrt(sum((a - adv_mean) ** 2 for a in all_adv) / len(all_adv))
    whitened = batch["whitened_advantages"][mask].tolist()
    assert whitened == pytest.approx([(a - adv_mean) / adv_std for a in all_adv], abs=1e-4)
    assert (batch["whitened_advantages"][~mask] == 0).all()
    assert not (batch["values"][mask] == 0).all()  # the critic's values really entered
    logged = steps(ppo_run)[1]
    assert logged["kl_coef"] == pytest.approx(beta)
    assert logged["advantages/mean"] == pytest.approx(adv_mean, abs=1e-5)
    assert logged["returns/mean"] == pytest.approx(sum(all_ret) / len(all_ret), abs=1e-5)


def test_kill_9_then_resume_matches_uninterrupted(ppo_run, tiny_model, arithmetic_data, rewards_file, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "killed"
    args = ppo_args(tiny_model, arithmetic_data, out, rewards_file)
    killed = run_cli("run", RECIPE, *args, env={**ENV, "POSTTRAIN_FAULT_KILL_AFTER_STEP": "2"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert [r["step"] for r in steps(out)] == [1, 2]
    assert not (out / "checkpoints" / "step-000003").exists()
    resumed = run_cli("run", RECIPE, *args, "resume=auto", env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step-000002" in resumed.stderr
    fresh, again = steps(ppo_run), steps(out)
    assert [r["step"] for r in again] == [1, 2, 3]
    for a, b in zip(fresh, again, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    for part in ("model", "critic"):
        one = load_file(str(ppo_run / "checkpoints" / "step-000003" / part / "model.safetensors"))
        two = load_file(str(out / "checkpoints" / "step-000003" / part / "model.safetensors"))
        assert all(torch.allclose(one[k], two[k], atol=1e-6) for k in one), part


def test_batch_rule_is_one_clear_line(tiny_model, arithmetic_data, rewards_file, tmp_path):
    result = run_cli("run", RECIPE, *ppo_args(tiny_model, arithmetic_data, tmp_path / "r", rewards_file,
                                              "train.global_batch_size=6", "train.micro_batch_size=2"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(message) == 1
    assert "ppo.prompts_per_step x rollout.n = 8 sequences" in message[0] and "global_batch_size (6)" in message[0]


def test_critic_from_a_reward_model_reuses_its_backbone_and_head(tiny_model, tmp_path):
    """The critic's value at the last token of a sequence is the reward model's score of that sequence."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.config.loader import from_dict
    from posttrain.errors import UserError
    from posttrain.trainers.ppo import Config, check_critic_source, load_critic

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    rm.config.pad_token_id = 0
    rm.save_pretrained(tmp_path / "rm")
    cfg = from_dict(Config, {"trainer": "ppo", "model": {"path": str(tiny_model)}, "data": {"path": "x.jsonl"},
                             "ppo": {"critic": {"init": "reward_model", "path": str(tmp_path / "rm")}}})
    check_critic_source(cfg)
    critic = load_critic(cfg, pad_token_id=0).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        score = rm.eval()(ids).logits[0, 0]
        values = critic(ids).logits[0, :, 0]
    assert values[-1].item() == pytest.approx(score.item(), abs=1e-5)
    assert not torch.allclose(values, values[-1].expand_as(values))  # a value per token, not one score

    bad = from_dict(Config, {"trainer": "ppo", "model": {"path": str(tiny_model)}, "data": {"path": "x.jsonl"},
                             "ppo": {"critic": {"init": "reward_model", "path": str(tiny_model)}}})
    with pytest.raises(UserError, match="is not a reward model"):
        check_critic_source(bad)


def test_token_values_and_running_moments_by_hand():
    from posttrain.algorithms import RunningMoments, masked_whiten, normalize_rewards
    from posttrain.trainers.ppo import token_values

    logits = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])
    mask = torch.tensor([[0, 0, 1, 1]])
    # token t was sampled from the state at t - 1
    assert token_values(logits, mask).tolist() == [[0.0, 0.0, 2.0, 3.0]]

    stats = RunningMoments()
    stats.update(torch.tensor([1.0, 2.0, 3.0]))
    stats.update(torch.tensor([4.0, float("nan")]))  # NaN (unscored) is left out
    stats.update_from_sums(2.0, 5.0 + 6.0, 25.0 + 36.0)
    assert (stats.count, stats.mean) == (6.0, pytest.approx(3.5))
    assert stats.var == pytest.approx(sum((x - 3.5) ** 2 for x in range(1, 7)) / 6)
    restored = RunningMoments()
    restored.load_state_dict(json.loads(json.dumps(stats.state_dict())))
    assert restored.state_dict() == stats.state_dict()
    shaped = normalize_rewards(torch.tensor([3.5, 100.0, -100.0]), mean=3.5, std=2.0, clip=5.0)
    assert shaped.tolist() == pytest.approx([0.0, 5.0, -5.0])

    # whitening with given (global) statistics instead of the local ones
    x = torch.tensor([[1.0, 2.0, 9.0]])
    m = torch.tensor([[1, 1, 0]])
    out = masked_whiten(x, m, mean=0.0, var=4.0, eps=0.0)
    assert out.tolist() == [[0.5, 1.0, 0.0]]
