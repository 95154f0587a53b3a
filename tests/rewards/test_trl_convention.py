"""TRL's calling convention: every function ``trl.rewards`` ships gives, through ``posttrain score`` and a GRPO
run, the scores a direct call gives; the signature rule for other functions; the conversational form."""

from __future__ import annotations

import asyncio
import inspect
import json

import pytest
import trl.rewards

from posttrain.errors import UserError
from reward_models import RewardSet, load_reward, reward_factory
from reward_models.convention import TrainerState
from tests.conftest import REPO, read_metrics, run_cli
from tests.rewards.conftest import read_jsonl, run_score, write_jsonl

# Every reward function of trl.rewards, with the settings a recipe gives it (factories: get_*).
TRL_REWARDS = {
    "accuracy_reward": {},
    "reasoning_accuracy_reward": {},
    "think_format_reward": {},
    "get_cosine_scaled_reward": {"max_len": 10},
    "get_repetition_penalty_reward": {"ngram_size": 2, "max_penalty": -1.0},
    "get_soft_overlong_punishment": {"max_completion_len": 6, "soft_punish_cache": 2},
}


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# Conversational rows: a message prompt with a string completion (rewards get it as one assistant message,
# as TRL's GRPOTrainer gives it) or with a message completion; one unparseable solution (accuracy: None).
CHAT_ROWS = [
    {"prompt": [{"role": "user", "content": "1/3?"}], "completion": "<think>ok</think> so \\boxed{\\frac{1}{3}}",
     "solution": "\\frac{1}{3}", "completion_ids": [1, 2, 3]},
    {"prompt": [{"role": "user", "content": "1/3?"}], "completion": _assistant("\\boxed{\\frac{1}{2}}"),
     "solution": "\\frac{1}{3}", "completion_ids": [4, 4, 4, 4, 4, 4, 4]},
    {"prompt": [{"role": "user", "content": "2+2?"}], "completion": _assistant("<think>a</think>4 is \\boxed{4}"),
     "solution": "4", "completion_ids": [1, 2, 1, 2, 1]},
    {"prompt": [{"role": "user", "content": "?"}], "completion": "<think>x", "solution": "no math here",
     "completion_ids": [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]},
]
STRING_ROWS = [
    {"prompt": "2+2?", "completion": "<think>a</think> \\boxed{4}", "solution": "4", "completion_ids": [1, 2, 3]},
    {"prompt": "2+3?", "completion": "\\boxed{6}", "solution": "5", "completion_ids": [5, 5, 5, 5, 5, 5, 5]},
]


def _trl(name: str):
    obj = getattr(trl.rewards, name)
    return obj(**TRL_REWARDS[name]) if name.startswith("get_") else obj


def _direct(name: str, rows: list[dict]):
    """The scores TRL's trainer would get: a keyword call with the rows' columns (conversational completions as
    assistant messages), or the exception it raises."""
    def completion(row):
        chat = isinstance(row["prompt"], list)
        return _assistant(row["completion"]) if chat and isinstance(row["completion"], str) else row["completion"]

    try:
        return _trl(name)(prompts=[r["prompt"] for r in rows], completions=[completion(r) for r in rows],
                          completion_ids=[r["completion_ids"] for r in rows],
                          solution=[r["solution"] for r in rows], trainer_state=None)
    except Exception as err:  # noqa: BLE001 - compared with what posttrain reports
        return err


def _score_args(rows_file, out, on_error="fail"):
    args = []
    for name, settings in TRL_REWARDS.items():
        args += ["--reward", f"trl.rewards:{name}"]
        for key, value in settings.items():
            args += ["--reward-arg", f"{key}={json.dumps(value)}"]
    return [*args, str(rows_file), "--output", str(out), "--on-error", on_error]


def test_every_trl_reward_is_covered():
    shipped = {n for n in trl.rewards.__all__ if callable(getattr(trl.rewards, n)) and not n.endswith("_rewards")}
    assert shipped == set(TRL_REWARDS)
    for name in TRL_REWARDS:  # factories are recognised as such: settings go to them, not to the reward
        reward = load_reward(f"trl.rewards:{name}", **TRL_REWARDS[name])
        assert (reward.fn is getattr(trl.rewards, name)) == (not name.startswith("get_"))


def test_score_matches_direct_calls_on_conversational_rows(tmp_path):
    data, out = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS), tmp_path / "out.jsonl"
    result = run_score(*_score_args(data, out))
    assert result.returncode == 0, result.stderr[-3000:]
    scored = read_jsonl(out)
    assert [r["completion"] for r in scored] == [r["completion"] for r in CHAT_ROWS]  # rows written back as read
    for name in TRL_REWARDS:
        expected = _direct(name, CHAT_ROWS)
        assert isinstance(expected, list), f"{name} raised {expected!r}"
        assert [r["reward_info"]["scores"][name] for r in scored] == pytest.approx(expected), name
    # the data exercises each: a correct, a wrong and an unparseable solution; lengths on both sides of the limits
    assert _direct("accuracy_reward", CHAT_ROWS) == [1.0, 0.0, 1.0, None]
    assert _direct("think_format_reward", CHAT_ROWS) == [1.0, 0.0, 1.0, 0.0]
    assert _direct("get_soft_overlong_punishment", CHAT_ROWS) == [0.0, -1.0, -0.5, -1.0]


def test_score_matches_direct_calls_on_string_rows(tmp_path):
    """String prompts give string completions, as in TRL: the rewards that read completion[0]["content"] fail
    there (directly and in posttrain alike, named in the errors); those reading completion_ids score."""
    data, out = write_jsonl(tmp_path / "text.jsonl", STRING_ROWS), tmp_path / "out.jsonl"
    result = run_score(*_score_args(data, out, on_error="zero"))
    assert result.returncode == 0, result.stderr[-3000:]
    scored = read_jsonl(out)
    failing = set()
    for name in TRL_REWARDS:
        expected = _direct(name, STRING_ROWS)
        if isinstance(expected, Exception):
            failing.add(name)
            for row in scored:
                errors = [e for e in row["reward_info"]["errors"] if e["reward"] == name]
                assert errors and errors[0]["message"].startswith(type(expected).__name__), (name, row)
        else:
            assert [r["reward_info"]["scores"][name] for r in scored] == pytest.approx(expected), name
    assert failing == {"accuracy_reward", "reasoning_accuracy_reward", "think_format_reward",
                       "get_cosine_scaled_reward"}
    stop = run_score("--reward", "trl.rewards:think_format_reward", str(data), "--output", str(out))
    assert stop.returncode != 0 and "think_format_reward" in stop.stderr and "TypeError" in stop.stderr


# -- the signature rule ---------------------------------------------------------------------------------


def _calls(fn, **columns):
    """What ``fn`` receives through a RewardSet, with a trainer state."""
    seen = {}

    def spy(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        return fn(*args, **kwargs)

    spy.__signature__ = inspect.signature(fn)
    state = TrainerState(global_step=3, max_steps=10)
    with RewardSet([spy]) as rs:
        result = rs.score(["p1", "p2"], ["a", "bb"], completion_ids=[[1], [2, 3]], trainer_state=state, **columns)
    return seen, result.scores["spy"]


def test_trl_style_functions_get_keywords():
    seen, scores = _calls(lambda completions, **kwargs: [kwargs["trainer_state"].global_step + len(c)
                                                          for c in completions], answer=["x", "y"])
    assert seen["args"] == () and scores == [4.0, 5.0]
    assert set(seen["kwargs"]) == {"prompts", "completions", "completion_ids", "answer", "trainer_state"}
    # a column named like a required parameter (TRL's accuracy_reward: solution) reaches it by name
    seen, scores = _calls(lambda completions, solution: [float(c == s) for c, s in zip(completions, solution)],
                          solution=["a", "b"])
    assert seen["kwargs"] == {"completions": ["a", "bb"], "solution": ["a", "b"]} and scores == [1.0, 0.0]


def test_posttrain_style_and_positional_fallback():
    seen, scores = _calls(lambda prompts, completions, **columns: [float(len(columns)) for _ in completions])
    assert seen["args"] == () and scores == [2.0, 2.0]  # completion_ids and trainer_state
    # other names for the first two parameters: positional, with what else the function takes
    seen, scores = _calls(lambda p, c, answer: [float(a in x) for x, a in zip(c, answer)], answer=["a", "z"])
    assert seen["args"] == (["p1", "p2"], ["a", "bb"]) and seen["kwargs"] == {"answer": ["a", "z"]}
    assert scores == [1.0, 0.0]
    seen, _ = _calls(lambda p, c, **kw: [0.0, 0.0])
    assert seen["args"] == (["p1", "p2"], ["a", "bb"]) and set(seen["kwargs"]) == {"completion_ids", "trainer_state"}


def test_signatures_that_cannot_fit_name_the_reward():
    def only_one(text):
        return [0.0]

    with pytest.raises(UserError, match="reward 'only_one' cannot take its arguments"):
        load_reward(only_one)

    def strict(prompts, completions, answer):
        return [0.0 for _ in completions]

    # a configuration error, not a row failure: it is raised even when failing rows would score 0
    with RewardSet([strict], on_error="zero") as rs, \
            pytest.raises(UserError, match="reward 'strict' cannot be called .*unexpected keyword argument 'topic'"):
        rs.score(["p"], ["c"], answer=["a"], topic=["t"])
    with RewardSet(["trl.rewards:accuracy_reward"]) as rs, \
            pytest.raises(UserError, match="reward 'accuracy_reward' .*missing a required argument: 'solution'"):
        rs.score(["p"], [_assistant("1")], answer=["1"])


def test_classes_factories_async_and_process_workers(tmp_path):
    class Scaled:
        def __call__(self, completions, completion_ids, **kwargs):
            return [float(len(ids)) for ids in completion_ids]

    @reward_factory
    def bonus(*, amount: float):
        def reward(prompts, completions, trainer_state=None, **columns):
            return [amount * trainer_state.global_step for _ in completions]
        return reward

    async def later(completions, trainer_state, **kwargs):
        await asyncio.sleep(0)
        return [float(trainer_state.max_steps) for _ in completions]

    (tmp_path / "mine.py").write_text(
        "def steps(completions, trainer_state, **kwargs):\n"
        "    return [float(trainer_state.global_step) + len(c[0]['content']) for c in completions]\n")
    rewards = [Scaled(), {"name": bonus, "args": {"amount": 2.0}}, later,
               {"name": f"{tmp_path}/mine.py:steps", "isolation": "process"}]
    with RewardSet(rewards) as rs:
        result = rs.score(["p"] * 2, [_assistant("a"), _assistant("bcd")], completion_ids=[[1], [2, 3]],
                          trainer_state=TrainerState(global_step=4, max_steps=9))
    assert result.scores == {"Scaled": [1.0, 2.0], "bonus": [8.0, 8.0], "later": [9.0, 9.0], "steps": [5.0, 7.0]}


def test_trainer_state_is_none_outside_a_trainer_and_reserved_as_a_column(tmp_path):
    (tmp_path / "mine.py").write_text(
        "def no_state(completions, trainer_state, **kwargs):\n"
        "    return [float(trainer_state is None) for _ in completions]\n")
    data, out = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "completion": "c"}]), tmp_path / "out.jsonl"
    result = run_score("--reward", f"{tmp_path}/mine.py:no_state", str(data), "-o", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_jsonl(out)[0]["reward"] == 1.0
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": "c", "trainer_state": 1}])
    result = run_score("--reward", f"{tmp_path}/mine.py:no_state", str(bad), "-o", str(out))
    assert result.returncode != 0 and "'trainer_state' is reserved" in result.stderr


# -- a GRPO run -----------------------------------------------------------------------------------------

RECORDER = '''
import json, os

def record(prompts, completions, completion_ids, trainer_state, solution, **kwargs):
    with open(os.environ["REWARD_LOG"], "a") as f:
        f.write(json.dumps({"completions": completions, "completion_ids": completion_ids, "solution": solution,
                            "state": [trainer_state.global_step, trainer_state.max_steps]}) + "\\n")
    return [None] * len(completions)
'''


@pytest.mark.slow
def test_grpo_run_scores_trl_rewards_as_direct_calls(tiny_model, arithmetic_data, tmp_path):
    from tests.recipes.test_grpo import grpo_args

    rows = [json.loads(line) for line in arithmetic_data["train"].read_text().splitlines()][:40]
    train = write_jsonl(tmp_path / "train.jsonl", [dict(r, solution=r["answer"]) for r in rows])
    test = write_jsonl(tmp_path / "test.jsonl", [dict(r, solution=r["answer"]) for r in rows[:8]])
    (tmp_path / "rec.py").write_text(RECORDER)
    log, out = tmp_path / "calls.jsonl", tmp_path / "run"
    rewards = ("grpo.rewards=[{name: 'trl.rewards:think_format_reward'}, {name: 'trl.rewards:accuracy_reward'}, "
               "{name: 'trl.rewards:get_soft_overlong_punishment', args: {max_completion_len: 12, "
               f"soft_punish_cache: 8}}}}, {{name: '{tmp_path}/rec.py:record'}}]")
    result = run_cli("run", str(REPO / "recipes" / "grpo_trl_rewards.yaml"),
                     *grpo_args(tiny_model, {"train": train, "test": test}, out, rewards),
                     env={"REWARD_LOG": str(log)})
    assert result.returncode == 0, result.stderr[-3000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    # evaluation before training (8 prompts), the two steps (4 prompts x 4 samples), evaluation after them
    assert [(len(c["completions"]), c["state"]) for c in calls] == [(8, [0, 2]), (16, [0, 2]), (16, [1, 2]),
                                                                    (8, [2, 2])]
    for call in calls:  # conversational prompts: TRL's form, one assistant message per completion
        assert all(len(c) == 1 and c[0]["role"] == "assistant" and isinstance(c[0]["content"], str)
                   for c in call["completions"])
    overlong = trl.rewards.get_soft_overlong_punishment(max_completion_len=12, soft_punish_cache=8)
    steps = [r for r in read_metrics(out) if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for record, call in zip(steps, calls[1:3], strict=True):
        direct = {"think_format_reward": trl.rewards.think_format_reward(completions=call["completions"]),
                  "accuracy_reward": trl.rewards.accuracy_reward(completions=call["completions"],
                                                                 solution=call["solution"]),
                  "get_soft_overlong_punishment": overlong(completion_ids=call["completion_ids"])}
        for label, values in direct.items():
            values = [v for v in values if v is not None]
            assert record[f"reward/{label}"] == pytest.approx(sum(values) / len(values)), label
        assert min(direct["get_soft_overlong_punishment"]) < 0  # 12-token completions are punished
