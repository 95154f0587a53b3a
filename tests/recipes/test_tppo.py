"""T-PPO (Truncated PPO, Fan et al., 2025): extended GAE against hand computations, its settings and their
errors, and the PPO trainer with a generation window on the real vLLM CPU engine -- the window cuts some
responses, their advantages are an independent EGAE computation from the saved tensors (bootstrapped at the
critic's value of the last generated state, recomputed from the saved critic), the value loss counts finished
responses only, and 2 processes match 1."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain import algorithms
from posttrain.config.loader import from_dict
from posttrain.errors import ConfigError
from posttrain.trainers.ppo import Config, final_state_values
from tests.conftest import REPO, read_metrics, run_cli

RECIPE = str(REPO / "recipes" / "ppo.yaml")
WINDOW = 4
REWARDS = '''
from reward_models.text import completion_text  # conversational completions are message lists
def varied(prompts, completions, **kw):
    return [(len(c) % 5) / 4 for c in map(completion_text, completions)]
'''
ENV = {"OMP_NUM_THREADS": "1"}
VOLATILE = ("time/", "sync/")


# ------------------------------------------------------------------------------------------- the pure function
def egae_by_hand(rewards: list[float], values: list[float], gamma: float, lam: float,
                 bootstrap: float | None) -> list[float]:
    """A_t = sum_k (gamma lam)^k delta_{t+k}, delta_t = r_t + gamma V_{t+1} - V_t, V after the last token:
    ``bootstrap`` (an incomplete response) or 0 (a finished one), written as the explicit sum."""
    n = len(rewards)
    nxt = [*values[1:], 0.0 if bootstrap is None else bootstrap]
    deltas = [rewards[t] + gamma * nxt[t] - values[t] for t in range(n)]
    return [sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) for t in range(n)]


def test_egae_bootstraps_incomplete_rows_by_hand():
    # row 0 incomplete (bootstrapped), row 1 finished, row 2 incomplete with a masked gap (tool output) and padding
    rewards = torch.tensor([[0.1, -0.2, 0.3, 0.0], [0.0, 0.5, 1.0, 9.0], [0.2, 7.0, -0.1, 3.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.4, 0.2, 0.0], [0.3, -0.1, 0.6, 9.0], [0.1, 5.0, 0.7, 4.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 0, 1, 0]])
    truncated = torch.tensor([True, False, True])
    boot = torch.tensor([0.8, 123.0, -0.4], dtype=torch.float64)  # row 1's is never read
    gamma, lam = 0.9, 0.7
    adv, ret = algorithms.egae_advantages(rewards, values, mask, truncated=truncated, bootstrap_values=boot,
                                          gamma=gamma, lam=lam)
    expected = [egae_by_hand([0.1, -0.2, 0.3], [0.5, 0.4, 0.2], gamma, lam, 0.8),
                egae_by_hand([0.0, 0.5, 1.0], [0.3, -0.1, 0.6], gamma, lam, None),
                egae_by_hand([0.2, -0.1], [0.1, 0.7], gamma, lam, -0.4)]
    for row, positions in enumerate(([0, 1, 2], [0, 1, 2], [0, 2])):
        assert adv[row, positions].tolist() == pytest.approx(expected[row], abs=1e-12)
        assert ret[row, positions].tolist() == pytest.approx(
            [a + float(values[row, t]) for a, t in zip(expected[row], positions)], abs=1e-12)
    assert adv[mask == 0].abs().sum() == 0 and ret[mask == 0].abs().sum() == 0
    # gamma = lam = 1: the partial return plus V(s_T), minus V_t; without the bootstrap, GAE would end at 0
    mc, _ = algorithms.egae_advantages(rewards, values, mask, truncated=truncated, bootstrap_values=boot,
                                       gamma=1.0, lam=1.0)
    assert mc[0, :3].tolist() == pytest.approx([0.2 + 0.8 - 0.5, 0.1 + 0.8 - 0.4, 0.3 + 0.8 - 0.2])
    gae, _ = algorithms.gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    assert (mc[0, :3] - gae[0, :3]).tolist() == pytest.approx([0.8] * 3)


@pytest.mark.parametrize("seed", range(5))
def test_egae_is_gae_when_nothing_is_truncated(seed):
    g = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    mask = (torch.rand(4, 7, generator=g) > 0.3).long()
    gamma, lam = 0.5 + 0.5 * torch.rand((), generator=g).item(), torch.rand((), generator=g).item()
    expected = algorithms.gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    got = algorithms.egae_advantages(rewards, values, mask, truncated=torch.zeros(4, dtype=torch.bool),
                                     bootstrap_values=torch.randn(4, generator=g) * 100, gamma=gamma, lam=lam)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    some = algorithms.egae_advantages(rewards, values, mask, truncated=torch.tensor([True, False, False, False]),
                                      bootstrap_values=torch.full((4,), 3.0), gamma=gamma, lam=lam)
    assert torch.equal(some[0][1:], expected[0][1:])  # other rows are untouched
    assert not torch.equal(some[0][0], expected[0][0])


def test_egae_is_registered_with_what_it_needs_and_checks_shapes():
    assert algorithms.TOKEN_ADVANTAGE_ESTIMATORS.get("egae") is algorithms.egae_advantages
    assert {"values", "truncated", "bootstrap_values"} <= algorithms.TOKEN_ADVANTAGE_ESTIMATORS.needs("egae")
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        algorithms.egae_advantages(x, x, x, truncated=torch.zeros(3, dtype=torch.bool),
                                   bootstrap_values=torch.zeros(2))


def test_final_state_values_reads_the_last_completion_token():
    logits = torch.arange(12, dtype=torch.float32).view(2, 6, 1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]])
    assert final_state_values(logits, mask).tolist() == [4.0, 0.0]  # row 1 has no completion


# ------------------------------------------------------------------------------------------------- settings
def _config(ppo: dict, max_tokens: int = 12) -> Config:
    return from_dict(Config, {"trainer": "ppo", "model": {"path": "m"}, "data": {"path": "x.jsonl"},
                              "rollout": {"max_tokens": max_tokens}, "ppo": ppo})


def test_settings_window_defaults_and_errors():
    assert _config({}).ppo.truncated.generation_cap(12) is None  # off: the rollouts are not capped
    assert _config({"truncated": {"enabled": True}}).ppo.truncated.generation_cap(12) == 12
    assert _config({"truncated": {"enabled": True, "window": 5}}).ppo.truncated.generation_cap(12) == 5
    with pytest.raises(ConfigError, match=r"window \(20\).*larger than rollout.max_tokens \(12\)"):
        _config({"truncated": {"enabled": True, "window": 20}})
    with pytest.raises(ConfigError, match="ppo.truncated.enabled is false"):
        _config({"truncated": {"window": 5}})
    with pytest.raises(ConfigError, match="value_lam"):
        _config({"truncated": {"enabled": True, "value_lam": 1.5}})
    with pytest.raises(ConfigError, match="unknown key 'ppo.truncated.windw'"):
        _config({"truncated": {"enabled": True, "windw": 5}})


def test_the_tppo_recipe_enables_a_window_below_max_tokens():
    from posttrain.config.loader import load_recipe

    cfg = load_recipe(REPO / "recipes" / "tppo.yaml")
    assert cfg.trainer == "ppo" and cfg.ppo.truncated.enabled
    assert cfg.ppo.truncated.window < cfg.rollout.max_tokens


# ---------------------------------------------------------------------------------------------- end to end
def tppo_args(tiny_model, data, out, rewards_file, *extra) -> list[str]:
    """16 samples a step in one mini-batch and one epoch: the logged value loss is the loss of the critic that
    computed the saved values (no update in between), so it can be recomputed from them."""
    return [f"model.path={tiny_model}", f"data.path={data['train']}", f"data.eval_path={data['test']}",
            f"output_dir={out}", "train.max_steps=2", "ppo.prompts_per_step=4", "rollout.n=4", "rollout.max_tokens=12",
            "rollout.stop=['e']", "ppo.truncated.enabled=true", f"ppo.truncated.window={WINDOW}", "ppo.epochs=1",
            "train.global_batch_size=16", "train.micro_batch_size=2", "ppo.eval_prompts=4", "train.eval_every=0",
            f"ppo.rewards=[{{name: '{rewards_file}:varied'}}]", "ppo.critic.lr=1e-3", "learner.lr=1e-3",
            "ppo.critic.pretrain_steps=0", "ppo.save_batches=true", "checkpoint.every_n_steps=1",
            "logging.progress=false", "logging.tensorboard=false", "logging.plots=false", *extra]


@pytest.fixture(scope="module")
def rewards_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tppo_rewards") / "rewards.py"
    path.write_text(REWARDS)
    return path


@pytest.fixture(scope="module")
def tppo_run(tiny_model, arithmetic_data, rewards_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("tppo") / "run"
    result = run_cli("run", RECIPE, *tppo_args(tiny_model, arithmetic_data, out, rewards_file), env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def steps(run_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in read_metrics(run_dir)
            if "reward/mean" in r]


def test_the_window_cuts_some_responses_and_the_metrics_say_so(tppo_run):
    records = steps(tppo_run)
    assert [r["step"] for r in records] == [1, 2]
    for step, record in enumerate(records, start=1):
        batch = torch.load(tppo_run / "batches" / f"step-{step:06d}-rank-0.pt")
        lengths = batch["loss_mask"].sum(1)
        cut = batch["truncated"]
        assert 0 < int(cut.sum()) < len(cut)  # the window cut some responses, not all
        assert (lengths[cut] == WINDOW).all() and (lengths <= WINDOW).all()  # capped at the window, not 12
        assert record["tppo/window"] == WINDOW
        assert record["tppo/incomplete_share"] == pytest.approx(float(cut.float().mean()))
        assert record["tppo/value_token_share"] == pytest.approx(
            float(batch["value_mask"].sum() / batch["loss_mask"].sum()))
        assert record["tppo/value_token_share"] < 1
        finished = ~cut
        assert record["tppo/finished_reward_mean"] == pytest.approx(float(batch["scores"][finished].mean()))
        assert all(math.isfinite(v) for v in record.values() if isinstance(v, float))
    assert records[1]["tppo/bootstrap_value_mean"] != 0  # the critic trained at step 1 gives V(s_T) != 0


def test_advantages_are_an_independent_egae_and_the_bootstrap_is_the_critics_last_state(tppo_run):
    """Step 2, recomputed in plain Python: finished responses get their score normalised by the statistics of
    every finished score so far (incomplete ones get no outcome reward and are not in the statistics), minus the
    KL penalty; the incomplete ones are bootstrapped at V(s_T), which the step-1 critic checkpoint (the critic
    that computed step 2's values) gives at the last generated token."""
    from transformers import AutoModelForTokenClassification

    first = torch.load(tppo_run / "batches" / "step-000001-rank-0.pt")
    batch = torch.load(tppo_run / "batches" / "step-000002-rank-0.pt")
    mask, cut = batch["loss_mask"].bool(), batch["truncated"]
    assert torch.equal(batch["value_mask"].bool(), mask & ~cut[:, None])
    beta, gamma, lam, value_lam = batch["kl_coef"], batch["gamma"], batch["lam"], batch["value_lam"]
    assert value_lam == 1.0 and lam == 0.95
    seen = [float(s) for s, c in zip(first["scores"], first["truncated"]) if not c] + \
        [float(s) for s, c in zip(batch["scores"], cut) if not c]
    mean = sum(seen) / len(seen)
    std = math.sqrt(sum((s - mean) ** 2 for s in seen) / len(seen))

    critic = AutoModelForTokenClassification.from_pretrained(tppo_run / "checkpoints" / "step-000001" / "critic").eval()
    for i in range(mask.shape[0]):
        positions = mask[i].nonzero().flatten().tolist()
        last = positions[-1]
        with torch.no_grad():
            v_last = critic(batch["input_ids"][i : i + 1, : last + 1]).logits[0, last, 0].item()
        assert float(batch["final_values"][i]) == pytest.approx(v_last, abs=1e-4)
        shaped = 0.0 if cut[i] else max(-5.0, min(5.0, (float(batch["scores"][i]) - mean) / (std + 1e-8)))
        assert float(batch["shaped_scores"][i]) == pytest.approx(shaped, abs=1e-5)
        rewards = [-beta * (float(batch["logprobs"][i, t]) - float(batch["ref_logprobs"][i, t])) for t in positions]
        rewards[-1] += shaped
        values = [float(batch["values"][i, t]) for t in positions]
        adv = egae_by_hand(rewards, values, gamma, lam, v_last if cut[i] else None)
        assert batch["advantages"][i, positions].tolist() == pytest.approx(adv, abs=1e-4)
        # the critic's targets: Monte Carlo returns (value_lam = 1) on finished responses, none on incomplete ones
        targets = [0.0] * len(positions) if cut[i] else [sum(rewards[k:]) for k in range(len(positions))]
        assert batch["returns"][i, positions].tolist() == pytest.approx(targets, abs=1e-4)
    assert not (batch["values"][mask] == 0).all() and (first["values"] == 0).all()
    assert batch["final_values"][cut].abs().min() > 0


def test_the_value_loss_counts_finished_responses_only(tppo_run):
    """One epoch of one mini-batch: the critic is not updated between the saved values and its loss, so the
    logged value loss is 0.5 x the mean over the finished responses' tokens of (V - R)^2 -- and not that mean
    over every token, which the incomplete responses (R = A + V under EGAE) would change."""
    for step, record in enumerate(steps(tppo_run), start=1):
        batch = torch.load(tppo_run / "batches" / f"step-{step:06d}-rank-0.pt")
        v, r, vmask, mask = batch["values"], batch["returns"], batch["value_mask"].bool(), batch["loss_mask"].bool()
        finished_only = 0.5 * float(((v - r)[vmask] ** 2).mean())
        assert record["value_loss"] == pytest.approx(finished_only, rel=1e-4, abs=1e-7)
        egae_returns = batch["advantages"] + v
        everything = 0.5 * float(((v - torch.where(vmask, r, egae_returns))[mask] ** 2).mean())
        assert abs(everything - finished_only) > 1e-3 * max(finished_only, 1e-3)


@pytest.mark.slow
def test_two_processes_match_one_process(tppo_run, tiny_model, arithmetic_data, rewards_file, tmp_path):
    """Same global batch and seed on 2 colocated processes: the same samples and cuts, the same advantages
    (whitened over both ranks), the same losses and T-PPO metrics."""
    out = tmp_path / "two"
    result = run_cli("run", RECIPE, "--nproc", "2", *tppo_args(tiny_model, arithmetic_data, out, rewards_file), env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = steps(tppo_run), steps(out)
    assert [r["step"] for r in two] == [1, 2]
    keys = ("reward/mean", "completion_tokens", "tppo/incomplete_share", "tppo/value_token_share",
            "tppo/finished_reward_mean", "tppo/bootstrap_value_mean", "advantages/mean", "advantages/std",
            "returns/mean", "explained_variance", "policy_loss", "value_loss", "kl")
    for a, b in zip(one, two, strict=True):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)
    for step in (1, 2):
        whole = torch.load(tppo_run / "batches" / f"step-{step:06d}-rank-0.pt")
        parts = [torch.load(out / "batches" / f"step-{step:06d}-rank-{r}.pt") for r in (0, 1)]
        assert torch.equal(torch.cat([p["truncated"] for p in parts]), whole["truncated"])
        for name in ("advantages", "whitened_advantages", "returns", "values"):
            width = whole[name].shape[1]
            joined = torch.cat([torch.nn.functional.pad(p[name], (0, width - p[name].shape[1])) for p in parts])
            torch.testing.assert_close(joined, whole[name], rtol=1e-4, atol=1e-5)
