"""`posttrain eval`: vLLM generation + rewards + pass@k."""

from __future__ import annotations

import json
import math

from posttrain.cli.eval import pass_at_k
from tests.conftest import run_cli


def test_pass_at_k_matches_the_combinatorial_definition():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 2) == 1.0
    assert math.isclose(pass_at_k(4, 1, 1), 0.25)
    assert math.isclose(pass_at_k(5, 2, 2), 1 - math.comb(3, 2) / math.comb(5, 2))


def test_eval_writes_every_sample_and_the_summary(tiny_model, arithmetic_data, tmp_path):
    out = tmp_path / "eval.jsonl"
    result = run_cli("eval", str(tiny_model), str(arithmetic_data["test"]), "--reward", "math_verify",
                     "-n", "3", "--temperature", "1.0", "--max-tokens", "8", "--limit", "5", "-o", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 15 and {r["sample"] for r in rows} == {0, 1, 2}
    assert all("math_verify" in r["reward_info"]["scores"] and r["answer"] for r in rows)
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["samples"] == 15 and summary["pass@3"] >= summary["pass@1"]
    assert "pass@3" in result.stdout


def test_eval_bad_prompt_file_is_a_user_error(tiny_model, tmp_path):
    (tmp_path / "p.jsonl").write_text('{"question": "no prompt"}\n')
    result = run_cli("eval", str(tiny_model), str(tmp_path / "p.jsonl"), "--reward", "math_verify", "-o",
                     str(tmp_path / "o.jsonl"))
    assert result.returncode == 2 and "p.jsonl, row 1" in result.stderr and "Traceback" not in result.stderr
