"""HAPO's history-aware length reward and OREAL's outcome advantages and loss: the pure functions against hand
computations; HAPO's history end to end (followed from the recorded completions, the same on 1 and 2 processes,
restored on resume); OREAL end to end from its shipped recipe."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.algorithms import (
    LENGTH_REWARDS,
    LengthHistory,
    compute_policy_loss,
    cosine_length_reward,
    group_advantages,
    length_reward,
    linear_length_reward,
    oreal_advantages,
    oreal_loss,
)
from tests.conftest import REPO, read_metrics, run_cli, write_jsonl
from tests.recipes.test_grpo import BAD_REWARDS, grpo_args

NONE = math.nan  # "no history yet" in a history tensor
HAPO_RECIPE = str(REPO / "recipes" / "hapo.yaml")
OREAL_RECIPE = str(REPO / "recipes" / "oreal.yaml")


def t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


# ------------------------------------------------------------------ HAPO: the length reward


def test_hapo_cosine_length_reward_by_hand():
    # h = 10; c = cos(min(pi/2 * L / 10, pi)): L = 5 -> cos(pi/4), 10 -> 0, 12 -> cos(0.6 pi), 15 -> cos(3pi/4),
    # 20 and 25 -> -1 (L >= 2h)
    lengths = t(5, 10, 12, 15, 25, 5, 10, 15, 20, 25, 5, 3)
    correct = t(1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, dtype=torch.bool)
    history = t(*[10.0] * 10, NONE, NONE)
    got = cosine_length_reward(lengths, correct, history)
    expected = [0.70710678,  # correct, L < h: a bonus
                0.0,  # correct, L = h: nothing
                -0.30901699,  # correct, h < L: a penalty above the floor
                -0.7, -0.7,  # correct: cos(3pi/4) = -0.707 and -1 are floored at -0.7
                0.0,  # incorrect and short: min(c, 0), never a bonus
                0.0,  # incorrect, L = h
                -0.70710678, -1.0, -1.0,  # incorrect and long: the full penalty, down to -1 at L >= 2h
                0.0, 0.0]  # no history yet: 0 for correct and incorrect alike
    assert got.tolist() == pytest.approx(expected, abs=1e-8)
    unfloored = cosine_length_reward(lengths, correct, history, correct_floor=-1.0)
    assert unfloored[3].item() == pytest.approx(-0.70710678) and unfloored[4].item() == pytest.approx(-1.0)
    assert torch.equal(length_reward("cosine", lengths, correct, history), got)


def test_hapo_linear_length_reward_by_hand():
    # c = max(1 - L / h, -1) with h = 8
    lengths, history = t(2, 8, 12, 20, 2, 12, 20), t(*[8.0] * 7)
    correct = t(1, 1, 1, 1, 0, 0, 0, dtype=torch.bool)
    got = linear_length_reward(lengths, correct, history)
    assert got.tolist() == pytest.approx([0.75, 0.0, -0.5, -0.7, 0.0, -0.5, -1.0])
    assert set(LENGTH_REWARDS.names()) == {"cosine", "linear"}


def test_hapo_length_reward_rejects_bad_inputs():
    with pytest.raises(ValueError, match="share one"):
        cosine_length_reward(t(1, 2), t(1, dtype=torch.bool), t(3, 3))
    with pytest.raises(ValueError, match="positive length"):
        cosine_length_reward(t(1.0), t(1, dtype=torch.bool), t(0.0))
    with pytest.raises(ValueError, match="correct_floor"):
        cosine_length_reward(t(1.0), t(1, dtype=torch.bool), t(2.0), correct_floor=-2.0)
    with pytest.raises(ValueError, match="Did you mean 'cosine'"):
        length_reward("cosin", t(1.0), t(1, dtype=torch.bool), t(2.0))


def test_hapo_history_keeps_the_shortest_correct_length_per_prompt():
    history = LengthHistory()
    assert torch.isnan(history.history(["a", "b"])).all() and len(history) == 0
    history.update(["a", "a", "a", "b", "b"], [7, 5, 3, 4, 6], [True, True, False, False, False])
    assert history.get("a") == 5.0  # the incorrect 3-token response does not count
    assert history.get("b") is None and len(history) == 1  # no correct response yet
    history.update(["a", "b", "b"], [6, 9, 8], [True, True, True])
    assert history.get("a") == 5.0  # min(5, 6): the history only shrinks
    assert history.get("b") == 8.0
    history.update(["a"], [2], [True])
    assert history.get("a") == 2.0 and history.mean() == pytest.approx(5.0)
    values = history.history(["b", "c", "a"])
    assert values[0] == 8.0 and math.isnan(values[1]) and values[2] == 2.0

    restored = LengthHistory()
    restored.load_state_dict(json.loads(json.dumps(history.state_dict())))  # as trainer_state.json holds it
    assert restored.state == history.state and restored.count == history.count == {"a": 4, "b": 2}


def test_hapo_history_mean_aggregate_and_errors():
    history = LengthHistory(aggregate="mean")
    history.update(["a", "a", "a"], [4, 8, 100], [True, True, False])
    assert history.get("a") == 6.0
    history.update(["a"], [12], [True])
    assert history.get("a") == pytest.approx(8.0)  # (4 + 8 + 12) / 3
    with pytest.raises(ValueError, match="aggregate"):
        LengthHistory(aggregate="median")
    with pytest.raises(ValueError, match="one length and one verdict per key"):
        history.update(["a", "b"], [1], [True])
    with pytest.raises(ValueError, match="must be positive"):
        history.update(["a"], [0], [True])


# ------------------------------------------------------------------ OREAL: advantages and loss


# Two groups of four. Group 0: [1, 0, 0, 0] (pass rate 1/4); group 1: [1, 1, 1, 0] (3/4). Response lengths
# 2 4 6 8 | 3 5 7 1 tokens: N = 36, N+ = 2 + 3 + 5 + 7 = 17, N- = 4 + 6 + 8 + 1 = 19.
OREAL_REWARDS = (1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0)
OREAL_LENGTHS = (2, 4, 6, 8, 3, 5, 7, 1)


def _mask(lengths) -> torch.Tensor:
    return (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).to(torch.float64)


def test_oreal_advantages_by_hand():
    rewards, mask = t(*OREAL_REWARDS), _mask(OREAL_LENGTHS)
    # leave-one-out pass rates p_-i: group 0: the correct row sees 0/3, the incorrect ones 1/3; group 1: the
    # correct rows see 2/3, the incorrect one 3/3. A = 1 - p (correct), -p (incorrect); then eta+ N / N+ =
    # 36/17 on the correct rows and eta- N / N- = 0.5 * 36/19 = 18/19 on the incorrect ones.
    got = group_advantages("oreal", rewards, 4, mask=mask)
    pos, neg = 36 / 17, 18 / 19
    expected = [1 * pos, -1 / 3 * neg, -1 / 3 * neg, -1 / 3 * neg, 1 / 3 * pos, 1 / 3 * pos, 1 / 3 * pos, -1 * neg]
    assert got.tolist() == pytest.approx(expected)
    # without a mask rows are counted: N = 8, N+ = N- = 4
    assert oreal_advantages(rewards, 4).tolist() == pytest.approx(
        [2, -1 / 3, -1 / 3, -1 / 3, 2 / 3, 2 / 3, 2 / 3, -1])
    # plain behaviour cloning: every correct response weighs 1 (times its normalisation)
    plain = oreal_advantages(rewards, 4, mask=mask, positive_advantage=False)
    assert plain[[0, 4, 5, 6]].tolist() == pytest.approx([pos] * 4)
    assert plain[[1, 7]].tolist() == pytest.approx(expected[1:2] + expected[7:8])
    # GRPO's shaping: group 0 has mean 1/4, unbiased std 1/2 -> (1 - 1/4) / (1/2) = 1.5 and -0.5
    grpo = oreal_advantages(rewards, 4, mask=mask, baseline="grpo", positive_weight=1.0, negative_weight=1.0)
    assert grpo[:4].tolist() == pytest.approx([1.5 * 36 / 17, -0.5 * 36 / 19, -0.5 * 36 / 19, -0.5 * 36 / 19])


def test_oreal_binarises_rewards_and_skips_unscored_rows():
    # 0.9 and 0.6 are correct at threshold 0.5, 0.4 is not; the NaN row is unscored: advantage 0, out of
    # the pass rate, but its 4 tokens are in N (the token-mean denominator). N = 20, N+ = 2, N- = 14.
    got = oreal_advantages(t(0.9, NONE, 0.4, 0.0), 4, mask=_mask((2, 4, 6, 8)))
    # the correct row sees 0/2 correct others -> 1; the incorrect ones see 1/2 -> -0.5
    assert got.tolist() == pytest.approx([1 * 20 / 2, 0.0, -0.5 * 0.5 * 20 / 14, -0.5 * 0.5 * 20 / 14])
    assert oreal_advantages(t(0.6, 0.0, 0.0, 0.0), 4).tolist() == pytest.approx(
        oreal_advantages(t(1.0, 0.0, 0.0, 0.0), 4).tolist())
    # a group that is all wrong (or all right) has no signal under the leave-one-out baseline
    assert oreal_advantages(t(0.0, 0.0, 1.0, 1.0), 2).tolist() == [0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="baseline"):
        oreal_advantages(t(1.0, 0.0), 2, baseline="mean")


def test_oreal_loss_is_the_papers_objective_on_policy():
    """With the oreal advantages and token-mean over the step's tokens, the loss is
    eta+ / N+ * sum over correct tokens of (1 - p) (-log pi) + eta- / N- * sum over incorrect tokens of p r,
    r = 1 on policy; the gradient on every token is -A, as a policy gradient's at ratio 1."""
    rewards, mask = t(*OREAL_REWARDS), _mask(OREAL_LENGTHS)
    generator = torch.Generator().manual_seed(0)
    logprobs = (-torch.rand(mask.shape, generator=generator, dtype=torch.float64) * 3).requires_grad_()
    advantages = oreal_advantages(rewards, 4, mask=mask)
    result = compute_policy_loss("oreal", logprobs, logprobs.detach(), advantages, mask, loss_agg_mode="token-mean",
                                 global_num_tokens=float(mask.sum()))
    p_others = [0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 1]
    positive = sum((1 - p_others[i]) * -logprobs[i, : OREAL_LENGTHS[i]].sum() for i in (0, 4, 5, 6)) / 17
    negative = sum(p_others[i] * OREAL_LENGTHS[i] for i in (1, 2, 3, 7)) / 19
    assert result.loss.item() == pytest.approx((1.0 * positive + 0.5 * negative).item())
    result.loss.backward()
    expected_grad = -advantages[:, None] * mask / mask.sum()
    torch.testing.assert_close(logprobs.grad, expected_grad)
    assert result.metrics["bc_token_frac"].item() == pytest.approx(17 / 36)


def test_oreal_loss_clones_positives_and_clips_negatives_off_policy():
    logprobs = t(-1.0, -2.0).reshape(1, 2).repeat(2, 1).requires_grad_()
    old = torch.stack([t(-0.5, -0.5), torch.log(t(0.5, 1.5)) + logprobs.detach()[1]])  # row 1: r = 2, 2/3
    mask = torch.ones(2, 2, dtype=torch.float64)
    out = oreal_loss(logprobs, old, t(2.0, -1.0), mask, clip_low=0.2, clip_high=0.2)
    # row 0, A = 2 > 0: behaviour cloning -A log pi, whatever the old policy; row 1, A = -1: the PPO clip,
    # max(r, clip(r, 0.8, 1.2)) -> r = 2 stays 2 (unclipped side), r = 2/3 becomes 0.8 (no gradient)
    torch.testing.assert_close(out.per_token_loss, t(2.0, 4.0, 2.0, 0.8).reshape(2, 2))
    out.per_token_loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, t(-2.0, -2.0, 2.0, 0.0).reshape(2, 2))


def test_oreal_is_selectable_in_a_grpo_recipe():
    from posttrain.config.loader import load_recipe

    cfg = load_recipe(OREAL_RECIPE)
    assert (cfg.grpo.estimator, cfg.grpo.policy_loss, cfg.grpo.loss_agg) == ("oreal", "oreal", "token-mean")
    assert cfg.train.global_batch_size == cfg.grpo.prompts_per_step * cfg.rollout.n  # one update per rollout
    hapo = load_recipe(HAPO_RECIPE)
    assert hapo.grpo.hapo.enabled and hapo.grpo.hapo.weight == 1.0 and hapo.grpo.hapo.length_reward == "cosine"


# ------------------------------------------------------------------ end to end

JUDGE = '''
import json, os

def judged(prompts, completions, completion_ids, **kw):
    """Correct when the completion has an even number of tokens; every call is recorded."""
    with open(os.environ["REWARD_LOG"], "a") as f:
        f.write(json.dumps({"rank": int(os.environ.get("RANK", "0")), "prompts": list(prompts),
                            "lengths": [len(ids) for ids in completion_ids]}) + "\\n")
    return [1.0 if len(ids) % 2 == 0 else 0.0 for ids in completion_ids]
'''

PROMPTS = [f"Add {a} and {b}." for a, b in ((1, 2), (3, 4), (5, 6), (7, 8))]


def _steps(out) -> list[dict]:
    """The last record of each step (a resumed run appends to metrics.jsonl)."""
    return list({r["step"]: r for r in read_metrics(out) if "reward/mean" in r}.values())


def _history(run, step: int) -> dict[str, float]:
    """The saved HAPO history at ``step``, keyed by prompt text (the keys are 'file, row N')."""
    state = json.loads((run / "checkpoints" / f"step-{step:06d}" / "trainer_state.json").read_text())["hapo"]
    assert state["aggregate"] == "min"
    return {PROMPTS[int(key.rsplit("row ", 1)[1]) - 1]: value for key, value in state["state"].items()}


def _recorded_steps(log) -> list[tuple[list[str], list[int]]]:
    """Per step, the (prompt, completion length) of every sample in one-process order: each rank's k-th call is
    its share of step k, and rank order is the one-process order."""
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    ranks = sorted({c["rank"] for c in calls})
    by_rank = [[c for c in calls if c["rank"] == r] for r in ranks]
    steps = []
    for parts in zip(*by_rank, strict=True):
        steps.append(([p for c in parts for p in c["prompts"]], [n for c in parts for n in c["lengths"]]))
    return steps


def _follow_the_paper(steps, weight: float):
    """HAPO computed independently from the recorded completions: per step, the mean length reward and mean
    trained reward (read from the history before the step), and the history after it."""
    history: dict[str, int] = {}
    out = []
    for prompts, lengths in steps:
        bonus = []
        for prompt, length in zip(prompts, lengths, strict=True):
            if prompt not in history:
                bonus.append(0.0)
                continue
            c = math.cos(min(math.pi / 2 * length / history[prompt], math.pi))
            bonus.append(max(c, -0.7) if length % 2 == 0 else min(c, 0.0))
        for prompt, length in zip(prompts, lengths, strict=True):
            if length % 2 == 0:
                history[prompt] = min(history.get(prompt, length), length)
        trained = [float(length % 2 == 0) + weight * b for length, b in zip(lengths, bonus, strict=True)]
        out.append({"length_reward": sum(bonus) / len(bonus), "reward": sum(trained) / len(trained),
                    "history": {p: float(v) for p, v in history.items()}, "bonus": bonus})
    return out


def _hapo_args(tiny_model, tmp_path, out):
    rows = [{"prompt": p, "answer": "0"} for p in PROMPTS]
    data = {"train": write_jsonl(tmp_path / "hapo.jsonl", rows), "test": write_jsonl(tmp_path / "hapo_test.jsonl", rows)}
    (tmp_path / "judge.py").write_text(JUDGE)
    return grpo_args(tiny_model, data, out, f"grpo.rewards=[{{name: '{tmp_path}/judge.py:judged'}}]",
                     "grpo.hapo.correctness_reward=judged", "grpo.hapo.weight=0.5", "grpo.eval_prompts=0",
                     "train.global_batch_size=16", "train.micro_batch_size=4", "learner.lr=5e-3",
                     "train.max_steps=3", "checkpoint.every_n_steps=1", "checkpoint.keep_last=5")


@pytest.mark.slow
def test_hapo_history_follows_the_recorded_completions_on_1_and_2_processes_and_survives_resume(tiny_model, tmp_path):
    """4 prompts, all in every step, 4 samples each, 3 steps, from the shipped recipe. The judge marks
    even-length completions correct; from what it recorded the test recomputes HAPO's history and length
    rewards, and checks the saved history and logged metrics against them: on 1 process, on 2 (the same
    history on both ranks, and the same as on 1), and after a kill at step 2 and resume=auto."""
    weight = 0.5
    one_log = tmp_path / "one.jsonl"
    one = run_cli("run", HAPO_RECIPE, *_hapo_args(tiny_model, tmp_path, tmp_path / "one"),
                  env={"REWARD_LOG": str(one_log)})
    assert one.returncode == 0, one.stderr[-3000:]
    expected = _follow_the_paper(_recorded_steps(one_log), weight)
    assert len(expected) == 3
    assert any(b != 0 for step in expected[1:] for b in step["bonus"])  # the history acted from step 2 on
    logged = _steps(tmp_path / "one")
    for step, (want, got) in enumerate(zip(expected, logged, strict=True), start=1):
        assert _history(tmp_path / "one", step) == want["history"]  # exact: lengths are integers
        assert got["hapo/length_reward"] == pytest.approx(want["length_reward"], abs=1e-6)
        assert got["reward/mean"] == pytest.approx(want["reward"], abs=1e-6)  # the trained reward includes it
        assert got["hapo/tracked_prompts"] == len(want["history"])
        assert got["hapo/history_mean"] == pytest.approx(sum(want["history"].values()) / len(want["history"]))
    assert logged[0]["hapo/length_reward"] == 0.0  # no history before the first step

    two_log = tmp_path / "two.jsonl"
    two = run_cli("run", HAPO_RECIPE, *_hapo_args(tiny_model, tmp_path, tmp_path / "two"), "--nproc", "2",
                  env={"REWARD_LOG": str(two_log)})
    assert two.returncode == 0, two.stderr[-3000:]
    expected_two = _follow_the_paper(_recorded_steps(two_log), weight)
    for step, (want, got, base) in enumerate(zip(expected_two, _steps(tmp_path / "two"), logged, strict=True), start=1):
        assert got["hapo/rank_spread"] == 0.0  # both ranks hold the same history
        assert _history(tmp_path / "two", step) == want["history"] == _history(tmp_path / "one", step)
        assert got["hapo/length_reward"] == pytest.approx(base["hapo/length_reward"], abs=1e-6)

    cut = tmp_path / "cut"
    killed = run_cli("run", HAPO_RECIPE, *_hapo_args(tiny_model, tmp_path, cut),
                     env={"REWARD_LOG": str(tmp_path / "cut.jsonl"), "POSTTRAIN_FAULT_KILL_AFTER_STEP": "2"})
    assert killed.returncode != 0
    resumed = run_cli("run", HAPO_RECIPE, *_hapo_args(tiny_model, tmp_path, cut), "resume=auto",
                      env={"REWARD_LOG": str(tmp_path / "cut.jsonl")})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # step 3's length rewards are read from the restored history: without it they would all be 0
    assert _steps(cut)[-1]["hapo/length_reward"] == pytest.approx(logged[2]["hapo/length_reward"], abs=1e-6)
    assert _history(cut, 3) == _history(tmp_path / "one", 3)


def test_hapo_settings_are_checked(tiny_model, arithmetic_data, tmp_path):
    from posttrain.distributed import DistInfo
    from posttrain.errors import ConfigError
    from posttrain.trainers.hapo import HAPOSettings, HAPOShaping

    typo = run_cli("run", HAPO_RECIPE, *grpo_args(tiny_model, arithmetic_data, tmp_path / "o"),
                   "grpo.hapo.length_reward=cosin")
    assert typo.returncode == 2 and "Did you mean 'cosine'" in typo.stderr and "Traceback" not in typo.stderr
    dist = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo")
    with pytest.raises(ConfigError, match="grpo.hapo.correctness_reward"):  # no verifier among the rewards
        HAPOShaping(HAPOSettings(enabled=True), ["varied"], None, dist)
    with pytest.raises(ConfigError, match="'nope' is not the label of one of this run's rewards \\(math_verify"):
        HAPOShaping(HAPOSettings(enabled=True, correctness_reward="nope"), ["math_verify"], "math_verify", dist)
    with pytest.raises(ConfigError, match="weight"):
        HAPOSettings(enabled=True, weight=-1.0).check("grpo.hapo", "r.yaml")


def test_hapo_shaping_adds_the_weighted_length_reward_then_updates_the_history():
    """The trainer's step on one process: two prompts x 3 samples; prompt b already has h = 10."""
    from types import SimpleNamespace as NS

    from posttrain.distributed import DistInfo
    from posttrain.trainers.hapo import HAPOSettings, HAPOShaping

    shaping = HAPOShaping(HAPOSettings(enabled=True, weight=0.5), ["math_verify"], "math_verify",
                          DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo"))
    shaping.load_state_dict({"aggregate": "min", "state": {"b": 10.0}, "count": {"b": 1}})
    rows = [NS(where="a"), NS(where="b")]
    lengths = [4, 6, 9, 5, 15, 30]
    batch = [NS(group=i // 3, completion_ids=list(range(n))) for i, n in enumerate(lengths)]
    verdicts = [1.0, 1.0, 0.0, 1.0, 0.0, None]  # None: the verifier abstained, not correct
    rewards = t(1.0, 1.0, 0.0, 1.0, 0.0, math.nan, dtype=torch.float32)
    shaped, metrics = shaping.shape(rows, batch, rewards, NS(scores={"math_verify": verdicts}))
    # prompt a has no history: 0; prompt b, h = 10: correct L = 5 -> cos(pi/4); incorrect L = 15 -> cos(3pi/4)
    bonus = [0.0, 0.0, 0.0, 0.70710678, -0.70710678, -1.0]
    assert shaped[:5].tolist() == pytest.approx([r + 0.5 * b for r, b in zip([1, 1, 0, 1, 0], bonus, strict=False)])
    assert math.isnan(shaped[5].item())  # unscored stays unscored
    assert metrics["hapo/length_reward"] == pytest.approx(sum(bonus[:5]) / 5)  # over the scored samples
    assert shaping.history.state == {"a": 4.0, "b": 5.0}  # the step's shortest correct responses
    assert metrics["hapo/tracked_prompts"] == 2 and metrics["hapo/history_mean"] == 4.5
    assert metrics["hapo/rank_spread"] == 0.0


def _oreal_steps(tiny_model, arithmetic_data, tmp_path, name, *extra):
    (tmp_path / "r.py").write_text(BAD_REWARDS)
    out = tmp_path / name
    result = run_cli("run", OREAL_RECIPE, *grpo_args(tiny_model, arithmetic_data, out,
                                                     f"grpo.rewards=[{{name: '{tmp_path}/r.py:varied'}}]",
                                                     "train.global_batch_size=16", "train.micro_batch_size=8",
                                                     "learner.lr=1e-3", *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    return _steps(out)


@pytest.mark.slow
def test_oreal_trains_from_its_recipe_with_the_policy_gradient_of_its_advantages(tiny_model, arithmetic_data, tmp_path):
    """Two steps of the shipped recipe (one on-policy update per rollout, k3 KL to the reference). Its loss is
    behaviour cloning on the positives, -A log pi > 0, where PPO's surrogate on the same advantages is -A r; at
    r = 1 both have the gradient -A grad log pi, so the gradient norms agree and the losses do not."""
    oreal = _oreal_steps(tiny_model, arithmetic_data, tmp_path, "oreal")
    assert len(oreal) == 2 and oreal[0]["reward/std"] > 0
    for step in oreal:
        assert math.isfinite(step["loss"]) and step["loss"] > 0 and step["grad_norm"] > 0
    ppo = _oreal_steps(tiny_model, arithmetic_data, tmp_path, "ppo", "grpo.policy_loss=ppo")
    for a, b in zip(oreal, ppo, strict=True):
        assert a["reward/mean"] == pytest.approx(b["reward/mean"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["loss"] > b["loss"] + 0.1
