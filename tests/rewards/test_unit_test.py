"""unit_test: HumanEval through ``posttrain score``, test lists, entry points, and the judge's rules."""

from __future__ import annotations

import subprocess
import sys

import pytest

from reward_models import load_reward
from reward_models.sandbox import RunResult
from reward_models.unit_test import judge
from tests.rewards.conftest import REPO, read_jsonl, run_score

SCRIPT = REPO / "scripts" / "make_humaneval_jsonl.py"
N_PROBLEMS = 20


def make_humaneval(tmp_path, mode: str):
    path = tmp_path / f"humaneval_{mode}.jsonl"
    subprocess.run([sys.executable, str(SCRIPT), str(path), "--mode", mode, "--limit", str(N_PROBLEMS)],
                   check=True, cwd=REPO)
    return path


def test_humaneval_ships_all_164_problems():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from make_humaneval_jsonl import load_problems
    finally:
        sys.path.remove(str(SCRIPT.parent))
    problems = load_problems()
    assert len(problems) == 164
    assert {"task_id", "prompt", "canonical_solution", "test", "entry_point"} <= set(problems[0])


@pytest.mark.parametrize("mode, expected, verdict", [
    ("canonical", 1.0, "passed"),
    ("broken", 0.0, "failed"),
    ("exit_early", 0.0, "exited_early"),
])
def test_humaneval_through_posttrain_score(tmp_path, no_leftovers, mode, expected, verdict):
    data = make_humaneval(tmp_path, mode)
    out = tmp_path / "scored.jsonl"
    result = run_score("--reward", "unit_test", "--reward-arg", "timeout=20", str(data), "--output", str(out))
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(out)
    assert [r["task_id"] for r in rows] == [f"HumanEval/{i}" for i in range(N_PROBLEMS)]  # input order
    assert [r["reward"] for r in rows] == [expected] * N_PROBLEMS, [
        (r["task_id"], r["reward_info"]) for r in rows if r["reward"] != expected]
    assert {r["reward_info"]["details"]["unit_test"]["verdict"] for r in rows} == {verdict}
    assert "rows/s" in result.stderr


@pytest.fixture(scope="module")
def reward():
    r = load_reward("unit_test", timeout=10)
    yield r
    r.close()


def test_list_of_tests_gives_the_fraction_passed(reward, no_leftovers):
    tests = ["assert f(1) == 2", "assert f(2) == 3", "assert f(0) == 0", "assert f(-1) == 0"]
    out = reward(["p"], ["```python\ndef f(x):\n    return x + 1\n```"], tests=[tests])
    assert out == [0.75]  # f(0) == 1, so only the third test fails
    assert out.info[0]["verdict"] == "failed" and out.info[0]["failed_test"] == 2
    assert "assert f(0) == 0" in out.info[0]["error"]


def test_entry_point_column_calls_check(reward, no_leftovers):
    tests = "def check(candidate):\n    assert candidate(2) == 4\n"
    out = reward(["p", "p", "p"], ["def sq(x): return x * x", "def sq(x): return x + x + 1", "def other(x): pass"],
                 tests=[tests] * 3, entry_point=["sq", "sq", "sq"])
    assert list(out) == [1.0, 0.0, 0.0]
    assert "entry point 'sq' is not defined" in out.info[2]["error"]


def test_solution_errors_fail_all_tests(reward, no_leftovers):
    out = reward(["p", "p"], ["def f(:\n    pass", "raise RuntimeError('at import')"],
                 tests=[["assert True", "assert True"]] * 2)
    assert list(out) == [0.0, 0.0]
    assert out.info[0]["error"].startswith("SyntaxError")
    assert out.info[1]["error"].startswith("RuntimeError: at import")


def test_rows_without_tests_abstain(reward):
    out = reward(["p", "p"], ["x = 1", "x = 1"], tests=["", []])
    assert list(out) == [None, None] and out.info[0] == {"skipped": "no tests"}


def run_result(stdout: str, status: str = "exited", exit_code: int | None = 0) -> RunResult:
    return RunResult(status, exit_code=exit_code, stdout=stdout)


def test_judge_counts_only_nonce_lines():
    nonce = "abc123"
    forged = "PASS 0\nDONE\nxyz PASS 0\nabc12 PASS 0\n"
    assert judge(run_result(forged), nonce, 1)[0] == 0.0
    assert judge(run_result(f"noise\n{nonce} PASS 0\n{nonce} DONE\n"), nonce, 1) == (
        1.0, {"passed": 1, "total": 1, "verdict": "passed", "wall_seconds": 0.0})


def test_judge_needs_done_and_reports_why():
    nonce = "n"
    early = judge(run_result(f"{nonce} PASS 0\n"), nonce, 2)
    assert early[0] == 0.5 and early[1]["verdict"] == "exited_early"
    timeout = judge(run_result(f"{nonce} PASS 0\n", status="timeout", exit_code=None), nonce, 2)
    assert timeout[1]["verdict"] == "timeout"
    memory = judge(run_result(f"{nonce} FAIL 0 {{'type': 'MemoryError', 'message': ''}}\n{nonce} DONE\n"),
                   nonce, 1)
    assert memory == (0.0, memory[1]) and memory[1]["verdict"] == "memory"
    # a PASS and a FAIL for the same test (forged or not) is a failure; indices out of range are ignored
    mixed = judge(run_result(f"{nonce} PASS 0\n{nonce} FAIL 0 {{}}\n{nonce} PASS 7\n{nonce} DONE\n"), nonce, 1)
    assert mixed[0] == 0.0 and mixed[1]["verdict"] == "failed"
