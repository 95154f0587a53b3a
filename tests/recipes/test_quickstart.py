"""The quickstart (``python -m posttrain.quickstart``): its data, its scoring and one short end-to-end run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.data.synthetic import ANSWER_FORMATS, question_key
from posttrain.quickstart import (
    RL_QUESTIONS,
    SFT_QUESTIONS,
    TEST_QUESTIONS,
    score_answers,
    write_quickstart_data,
)

REPO = Path(__file__).resolve().parents[2]


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_question_sets_are_disjoint(tmp_path):
    paths = write_quickstart_data(tmp_path, seed=3)
    sets = {name: read(paths[name]) for name in ("sft", "rl", "test")}
    assert len(sets["sft"]) == SFT_QUESTIONS and len(sets["test"]) == TEST_QUESTIONS
    assert len(sets["rl"]) > 0.95 * RL_QUESTIONS  # only repeats of SFT questions are dropped
    keys = {name: {question_key(r) for r in rows} for name, rows in sets.items()}
    assert not keys["sft"] & keys["rl"] and not keys["sft"] & keys["test"] and not keys["rl"] & keys["test"]
    for row in sets["sft"][:20]:  # the SFT answer is right and in the format the quickstart reports
        numbers = [int(x) for x in question_key(row)]
        assert row["answer"] == str(max(numbers))
        assert ANSWER_FORMATS["largest"].match(row["messages"][-1]["content"])


def test_score_answers_reads_the_last_box():
    fmt = ANSWER_FORMATS["largest"]
    completions = ["The largest is 48. The answer is \\boxed{48}.", "The largest is \\boxed{7}.",
                   "The answer is \\boxed{3} or \\boxed{9}", "48"]
    scores = score_answers(completions, ["48", "7", "9", "48"], fmt)
    assert scores == {"format": 0.25, "accuracy": 0.75}


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    """SFT, two GRPO steps, held-out evaluation: summary.json, plots and the checkpoint are written."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "posttrain.quickstart", "--output-dir", str(tmp_path / "qs"),
                           "--grpo-steps", "2"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    for key in ("accuracy_before", "accuracy_after", "format_before", "format_after"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["grpo_steps"] == 2 and summary["held_out_prompts"] == TEST_QUESTIONS
    assert summary["format_before"] > 0.5  # one SFT pass teaches the answer format
    assert (Path(summary["checkpoint"]) / "config.json").is_file()
    assert (tmp_path / "qs" / "plots" / "reward-mean_eval-reward.png").is_file()
    assert "RL gain" in done.stdout
