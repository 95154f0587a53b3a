"""``posttrain score``: output rows, several weighted rewards, failure policies, bad input, atomic writes."""

from __future__ import annotations

import argparse
import textwrap

import pytest

from posttrain.cli.score import add_parser, parse_reward_arg
from tests.rewards.conftest import read_jsonl, run_score, write_jsonl

REWARDS_FILE = textwrap.dedent('''
    def picky(prompts, completions, **columns):
        if any(c == "crash" for c in completions):
            raise RuntimeError("picky cannot read 'crash'")
        return [None if c == "" else float(len(c)) for c in completions]
''')


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "rewards.py").write_text(REWARDS_FILE)
    return tmp_path


def test_parser_collects_rewards_in_order():
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["score", "--reward", "bleu", "--reward-arg", "lowercase=true", "--weight", "0.5",
                              "in.jsonl", "--reward", "format", "--reward-arg", "tags=[\"a\", \"b\"]", "-o", "o"])
    assert args.rewards == [{"name": "bleu", "weight": 0.5, "args": {"lowercase": True}},
                            {"name": "format", "weight": 1.0, "args": {"tags": ["a", "b"]}}]
    assert parse_reward_arg("pattern=^\\d+=$") == ("pattern", "^\\d+=$")
    assert parse_reward_arg("n=3") == ("n", 3) and parse_reward_arg("x=null") == ("x", None)


def test_several_rewards_weights_and_order(workdir):
    rows = [{"prompt": "q", "completion": "<think>a</think><answer>7</answer>", "answer": "7", "id": i}
            for i in range(3)] + [{"prompt": "q", "completion": "7", "answer": "8", "id": 3}]
    data = write_jsonl(workdir / "in.jsonl", rows)
    out = workdir / "out.jsonl"
    result = run_score("--reward", "math_verify", "--weight", "2", "--reward", "format", "--weight", "0.5",
                       str(data), "--output", str(out), "--workers", "1")
    assert result.returncode == 0, result.stderr
    scored = read_jsonl(out)
    assert [r["id"] for r in scored] == [0, 1, 2, 3]
    assert [r["reward"] for r in scored] == [2.5, 2.5, 2.5, 0.0]
    assert scored[0]["reward_info"]["scores"] == {"math_verify": 1.0, "format": 1.0}
    assert scored[0]["answer"] == "7"  # input fields kept


def test_mean_rule_and_abstaining_rows(workdir):
    data = write_jsonl(workdir / "in.jsonl", [{"completion": "abcd"}, {"completion": ""}])
    out = workdir / "out.jsonl"
    result = run_score("--reward", "./rewards.py:picky", "--weight", "3", "--combine", "mean", str(data),
                       "-o", str(out), cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert [r["reward"] for r in read_jsonl(out)] == [4.0, None]
    assert "1 skipped" in result.stderr


def test_failing_reward_policy_fail_names_file_row_and_reward(workdir):
    data = write_jsonl(workdir / "in.jsonl", [{"completion": "ok"}, "", {"completion": "crash"}])
    out = workdir / "out.jsonl"
    out.write_text("previous results\n")
    result = run_score("--reward", "./rewards.py:picky", str(data), "-o", str(out), cwd=workdir)
    assert result.returncode == 2
    text = result.stderr.replace("\n  ", " ").replace("\n", " ")
    assert f"{data}, row 3: reward 'picky' failed (error): RuntimeError: picky cannot read 'crash'" in text
    assert "Traceback" not in result.stderr
    assert out.read_text() == "previous results\n"  # untouched: the output is replaced only on success
    assert [p.name for p in workdir.iterdir() if p.name.endswith(".tmp")] == []


def test_failing_reward_policy_zero_scores_zero_and_reports(workdir):
    data = write_jsonl(workdir / "in.jsonl", [{"completion": "ok"}, {"completion": "crash"}])
    out = workdir / "out.jsonl"
    result = run_score("--reward", "./rewards.py:picky", "--on-error", "zero", str(data), "-o", str(out),
                       cwd=workdir)
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(out)
    assert [r["reward"] for r in rows] == [2.0, 0.0]
    assert rows[1]["reward_info"]["errors"][0]["kind"] == "error"
    assert "picky cannot read 'crash'" in rows[1]["reward_info"]["errors"][0]["message"]
    assert "1 failed" in result.stderr and "row 2" in result.stderr


@pytest.mark.parametrize("line, message", [
    ("{not json", "row 2: not valid JSON"),
    ("[1, 2]", "row 2: expected a JSON object, got list"),
    ('{"prompt": "q"}', "row 2: missing field 'completion'"),
    ('{"completion": 5}', "row 2: field 'completion' must be a string or a list"),
    ('{"completion": "x", "prompt": 3}', "row 2: field 'prompt' must be"),
    ('{"completion": "x"}', "row 2: missing field 'references', which reward 'bleu' reads"),
    ('{"completion": "x", "references": 7}', "row 2: field 'references' (read by reward 'bleu') must be"),
    ('{"completion": "x", "references": "r", "completions": []}', "row 2: field 'completions' is reserved"),
])
def test_malformed_rows_name_file_row_and_field(tmp_path, line, message):
    data = tmp_path / "in.jsonl"
    data.write_text('{"completion": "fine", "references": "fine"}\n' + line + "\n")
    result = run_score("--reward", "bleu", str(data), "-o", str(tmp_path / "out.jsonl"))
    assert result.returncode == 2
    text = result.stderr.replace("\n  ", " ").replace("\n", " ")
    assert f"{data}, {message}" in text, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_usage_errors(tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [{"completion": "x"}])
    missing = run_score("--reward", "bleu", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o.jsonl"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    unknown = run_score("--reward", "blue", str(data), "-o", str(tmp_path / "o.jsonl"))
    assert unknown.returncode == 2 and "Did you mean 'bleu'" in unknown.stderr
    bad_arg = run_score("--reward", "length", "--reward-arg", "tagret=3", str(data), "-o", str(tmp_path / "o.jsonl"))
    assert bad_arg.returncode == 2 and "Did you mean 'target'" in bad_arg.stderr
    orphan = run_score("--reward-arg", "a=1", "--reward", "bleu", str(data), "-o", str(tmp_path / "o.jsonl"))
    assert orphan.returncode == 2 and "must follow the --reward" in orphan.stderr
    no_dir = run_score("--reward", "format", str(data), "-o", str(tmp_path / "missing" / "o.jsonl"))
    assert no_dir.returncode == 2 and "output directory" in no_dir.stderr


def test_progress_bar_goes_to_stderr(tmp_path):
    import os
    import subprocess
    import sys

    from tests.rewards.conftest import REPO

    data = write_jsonl(tmp_path / "in.jsonl", [{"completion": "x"}] * 3)
    result = subprocess.run([sys.executable, "-m", "posttrain.cli.main", "score", "--reward", "format", str(data),
                             "-o", str(tmp_path / "o.jsonl")], capture_output=True, text=True, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0 and result.stdout == ""
    assert "3/3" in result.stderr
