"""code_efficiency: the score formula, the ordering fast > slow > wrong on the shipped examples, and the
CPU count that work hidden in other processes cannot escape."""

from __future__ import annotations

import json

import pytest

from posttrain.errors import UserError
from reward_models import load_reward
from reward_models.code_efficiency import efficiency_score
from tests.rewards.conftest import REPO, read_jsonl, run_score

SAMPLES = REPO / "examples" / "data" / "efficiency" / "samples.jsonl"


@pytest.fixture(scope="module")
def reward():
    r = load_reward("code_efficiency", timeout=20, repeats=3)
    yield r
    r.close()


def test_score_formula_by_hand():
    def score(passed, seconds, reference):
        return efficiency_score(passed, seconds, reference, efficiency_weight=0.4, max_speedup=4.0)
    assert score(1.0, 0.5, 1.0) == (pytest.approx(0.6 + 0.4 * 2 / 4), 2.0)  # twice as fast
    assert score(1.0, 0.1, 1.0) == (pytest.approx(1.0), 4.0)  # capped at max_speedup
    assert score(1.0, 3.0, 1.0)[0] == pytest.approx(0.6 + 0.4 * (1 / 3) / 4)
    assert score(0.5, 0.1, 1.0)[0] == pytest.approx(0.6 * 0.5)  # no runtime term unless all pass


def test_fast_beats_slow_beats_wrong_on_the_shipped_examples(reward, no_leftovers):
    rows = read_jsonl(SAMPLES)
    out = reward([r["prompt"] for r in rows], [r["completion"] for r in rows], tests=[r["tests"] for r in rows],
                 reference_solution=[r["reference_solution"] for r in rows])
    by = {(r["problem"], r["kind"]): (score, info) for r, score, info in zip(rows, out, out.info, strict=True)}
    for problem in {r["problem"] for r in rows}:
        fast, slow, wrong = (by[(problem, kind)] for kind in ("fast", "slow", "wrong"))
        assert fast[0] > slow[0] > wrong[0], (problem, fast, slow, wrong)
        assert slow[1]["speedup"] < 1.0 and slow[1]["cpu_seconds"] > slow[1]["reference_cpu_seconds"]
        assert wrong[1]["verdict"] == "failed" and wrong[0] < 0.5 <= slow[0]


def test_a_reference_that_fails_is_a_row_error_not_a_score(reward):
    out = reward(["p"], ["def f():\n    return 1\n"], tests=[["assert f() == 1"]],
                 reference_solution=["def f():\n    return 2\n"])
    assert out[0] is None and "reference solution does not pass" in out.errors[0]


def test_work_hidden_in_an_orphaned_process_is_still_counted(reward):
    hidden = ("import os\ndef f(n):\n    r, w = os.pipe()\n    if os.fork() == 0:\n        t = 0\n"
              "        for i in range(n):\n            for j in range(i):\n                t += 1\n"
              "        os.write(w, str(t).encode())\n        os._exit(0)\n    return int(os.read(r, 100))\n")
    fast = "def f(n):\n    return n * (n - 1) // 2\n"
    out = reward(["p"], [hidden], tests=[["assert f(2000) == 1999000"]], reference_solution=[fast])
    assert out.info[0]["verdict"] == "passed"
    assert out.info[0]["cpu_seconds"] > 5 * out.info[0]["reference_cpu_seconds"], out.info[0]


def test_posttrain_score_and_bad_settings(tmp_path):
    rows = [r for r in read_jsonl(SAMPLES) if r["problem"] == "pairs"]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scored.jsonl"
    result = run_score("--reward", "code_efficiency", "--reward-arg", "repeats=2", str(data), "--output", str(out))
    assert result.returncode == 0, result.stderr
    scored = {r["kind"]: r for r in read_jsonl(out)}
    assert scored["fast"]["reward"] > scored["slow"]["reward"] > scored["wrong"]["reward"]
    with pytest.raises(UserError, match="repeats"):
        load_reward("code_efficiency", repeats=0)
