"""Finding rewards: registry names, dotted paths, file paths, entry points, and their arguments."""

from __future__ import annotations

import textwrap

import pytest

from posttrain.errors import UserError
from reward_models import (
    RewardOutput,
    available_rewards,
    load_reward,
    register_reward,
    reward_factory,
    unregister_reward,
)
from reward_models.loading import parse_spec
from tests.rewards.conftest import read_jsonl, run_score, write_jsonl

USER_FILE = textwrap.dedent('''
    from helper_for_rewards import BONUS   # a sibling module: the file's directory is importable

    def contains_word(prompts, completions, word="yes", **columns):
        return [1.0 + BONUS if word in c else 0.0 for c in completions]

    class Counter:
        def __init__(self, scale=1.0):
            self.scale = scale

        def __call__(self, prompts, completions, **columns):
            return [self.scale * len(c) for c in completions]
''')


@pytest.fixture
def user_file(tmp_path):
    (tmp_path / "helper_for_rewards.py").write_text("BONUS = 0.5\n")
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_FILE)
    return path


def make_dist(root, dist: str, module: str, source: str, entry_points: dict[str, str]):
    """A real installed distribution on ``root``: a module and a dist-info with entry_points.txt."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[posttrain.rewards]\n{lines}")


PLUGIN = '''
    from reward_models import reward_factory

    def shout(prompts, completions, **columns):
        return [float(c.isupper()) for c in completions]

    @reward_factory
    def ends_with(*, suffix):
        def reward(prompts, completions, **columns):
            return [float(c.endswith(suffix)) for c in completions]
        return reward
'''


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    make_dist(root, "posttrain_test_plugin", "posttrain_test_plugin",
              PLUGIN, {"shout_ep": "posttrain_test_plugin:shout", "ends_with_ep": "posttrain_test_plugin:ends_with"})
    monkeypatch.syspath_prepend(str(root))
    return root


def test_parse_spec_forms():
    assert parse_spec("bleu") == ("name", "bleu", "")
    assert parse_spec("pkg.mod:fn") == ("dotted", "pkg.mod:fn", "fn")
    assert parse_spec("./r.py:fn") == ("file", "./r.py", "fn")
    assert parse_spec("/abs/dir/r.py:fn") == ("file", "/abs/dir/r.py", "fn")
    with pytest.raises(UserError, match="name the function"):
        parse_spec("./r.py")


def test_builtin_names_are_listed():
    names = available_rewards()
    for name in ("math_verify", "bleu", "unit_test", "format", "length", "orm", "prm"):
        assert names[name] == "builtin"


def test_unknown_name_suggests_closest():
    with pytest.raises(UserError, match="Did you mean 'bleu'"):
        load_reward("bleau")


def test_file_path_function_with_bound_args(user_file):
    reward = load_reward(f"{user_file}:contains_word", word="ok")
    assert reward.name == "contains_word"
    assert reward(["p", "p"], ["it is ok", "no"]) == [1.5, 0.0]
    assert reward.spec == f"{user_file.resolve()}:contains_word"


def test_file_path_class_is_instantiated_with_args(user_file):
    reward = load_reward(f"{user_file}:Counter", scale=2.0)
    assert reward(["p"], ["abc"]) == [6.0]


def test_relative_file_path(user_file, monkeypatch):
    monkeypatch.chdir(user_file.parent)
    assert load_reward("./my_rewards.py:contains_word")(["p"], ["yes"]) == [1.5]


def test_file_errors_name_the_problem(user_file):
    with pytest.raises(UserError, match="does not exist"):
        load_reward(f"{user_file.parent}/missing.py:fn")
    with pytest.raises(UserError, match="Did you mean 'contains_word'"):
        load_reward(f"{user_file}:contains_wrd")
    with pytest.raises(UserError, match="has no argument 'wrod'.*Did you mean 'word'"):
        load_reward(f"{user_file}:contains_word", wrod="x")


def test_dotted_path(plugin_path):
    assert load_reward("posttrain_test_plugin:shout")(["p", "p"], ["HEY", "hey"]) == [1.0, 0.0]
    with pytest.raises(UserError, match="cannot import module"):
        load_reward("no_such_module_xyz:fn")


def test_entry_point_plain_function_and_factory(plugin_path):
    assert available_rewards()["shout_ep"].startswith("entry point")
    assert load_reward("shout_ep")(["p"], ["LOUD"]) == [1.0]
    ends = load_reward("ends_with_ep", suffix="!")
    assert ends(["p", "p"], ["hi!", "hi"]) == [1.0, 0.0]
    with pytest.raises(UserError, match="needs the argument 'suffix'"):
        load_reward("ends_with_ep")


def test_register_reward_in_code():
    @register_reward("test_double_len")
    @reward_factory
    def double_len(*, factor=2):
        return lambda prompts, completions, **kw: [factor * len(c) for c in completions]

    try:
        assert load_reward("test_double_len", factor=3)(["p"], ["ab"]) == [6]
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_double_len", double_len)
        with pytest.raises(ValueError, match="already registered"):
            register_reward("bleu", double_len)
    finally:
        unregister_reward("test_double_len")


def test_callable_and_async_function():
    async def async_reward(prompts, completions, **columns):
        return [1.0] * len(completions)

    reward = load_reward(async_reward)
    assert reward.is_async and reward.name == "async_reward"
    assert not load_reward(lambda prompts, completions, **kw: [0.0]).is_async


def test_reward_output_is_a_list():
    out = RewardOutput([1.0, None], info=[{"a": 1}, {}], errors={1: "bad"})
    assert out == [1.0, None] and isinstance(out, list)
    assert out.info[0] == {"a": 1} and out.errors == {1: "bad"}


def test_cli_user_file_reward(user_file, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "completion": "say ok"}, {"completion": "nope"}])
    out = tmp_path / "out.jsonl"
    result = run_score("--reward", "./my_rewards.py:contains_word", "--reward-arg", "word=ok", str(data),
                       "--output", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(out)
    assert [r["reward"] for r in rows] == [1.5, 0.0]
    assert rows[0]["prompt"] == "q" and rows[0]["reward_info"]["scores"] == {"contains_word": 1.5}


def test_cli_entry_point_reward(plugin_path, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [{"completion": "WOW!"}, {"completion": "wow"}])
    out = tmp_path / "out.jsonl"
    result = run_score("--reward", "shout_ep", "--weight", "2", "--reward", "ends_with_ep", "--reward-arg",
                       "suffix=!", str(data), "--output", str(out), env={"PYTHONPATH": str(plugin_path)})
    assert result.returncode == 0, result.stderr
    assert [r["reward"] for r in read_jsonl(out)] == [3.0, 0.0]


def test_shipped_example_rewards(tmp_path):
    from tests.rewards.conftest import REPO

    out = tmp_path / "out.jsonl"
    result = run_score("--reward", "./examples/rewards/my_rewards.py:keyword_bonus", "--weight", "0.5",
                       "--reward", "./examples/rewards/my_rewards.py:answer_length", "--reward-arg", "target=12",
                       "examples/rewards/sample.jsonl", "--output", str(out), cwd=REPO)
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(out)
    assert [r["reward"] for r in rows] == pytest.approx([0.5 + 11 / 12, 0.5, 0.0])
    assert rows[2]["reward_info"]["scores"]["answer_length"] is None
