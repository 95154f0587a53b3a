"""Task recipes on their shipped prompt sets: code with the unit_test reward, BLEUBERI with the bleu reward.

Each recipe runs two GRPO steps end to end on the real vLLM engine with the tiny local model, and its reward
config gives the canonical answer of every held-out row 1.0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, read_metrics, run_cli

CODE = REPO / "recipes" / "code_grpo.yaml"
BLEUBERI = REPO / "recipes" / "bleuberi.yaml"
# task -> (shipped directory, train rows, test rows); the sizes given to `posttrain make-data`
SHIPPED = {"code": (REPO / "examples" / "data" / "code", 160, 40),
           "instruct": (REPO / "examples" / "data" / "instruct", 240, 48)}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def score_with_recipe(recipe: Path, rows: list[dict], completions: list, overrides: tuple[str, ...] = ()):
    """Score ``completions`` of ``rows`` with the rewards the recipe configures (``BatchScores``)."""
    from posttrain.config.loader import load_recipe
    from posttrain.trainers.online import build_rewards

    columns = sorted({k for r in rows for k in r} - {"prompt", "messages"})
    with build_rewards(load_recipe(recipe, list(overrides)).grpo) as rewards:
        return rewards.score([r["prompt"] for r in rows], completions, **{k: [r.get(k) for r in rows] for k in columns})


def two_steps(recipe: Path, tiny_model: Path, out: Path) -> list[dict]:
    """Run 2 GRPO steps of 4 prompts x 4 samples; return the per-step metrics."""
    result = run_cli("run", str(recipe), f"model.path={tiny_model}", f"output_dir={out}", "train.max_steps=2",
                     "grpo.prompts_per_step=4", "rollout.n=4", "rollout.max_tokens=32", "train.global_batch_size=16",
                     "train.micro_batch_size=16", "grpo.eval_prompts=4", "train.eval_every=0", "checkpoint.every_n_steps=0",
                     "logging.progress=false", "logging.tensorboard=false", "logging.plots=false")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [r for r in read_metrics(out) if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        # every one of the 4 x 4 samples was scored: none abstained, none failed
        assert record["reward/unscored"] == 0 and record["reward/issues"] == 0
        assert round(record["time/samples_per_s"] * record["time/step_s"]) == 16
        assert 0.0 <= record["reward/mean"] <= 1.0 and record["completion_tokens"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["eval_end"]["reward"] <= 1.0
    return steps


@pytest.mark.parametrize("task", sorted(SHIPPED))
def test_shipped_prompt_sets_are_what_make_data_writes(task, tmp_path):
    from posttrain.data.synthetic import write_task

    shipped, train, test = SHIPPED[task]
    paths = write_task(task, tmp_path, train=train, test=test, seed=0)
    for name in ("train", "test"):
        assert paths[name].read_text() == (shipped / f"{name}.jsonl").read_text(), f"regenerate {shipped}"
    train_prompts = {json.dumps(r["prompt"]) for r in read_rows(shipped / "train.jsonl")}
    assert not train_prompts & {json.dumps(r["prompt"]) for r in read_rows(shipped / "test.jsonl")}


def test_code_recipe_runs_grpo_with_unit_test_rewards(tiny_model, tmp_path):
    for record in two_steps(CODE, tiny_model, tmp_path / "run"):
        assert 0.0 <= record["reward/unit_test"] <= 1.0


def test_bleuberi_recipe_runs_grpo_with_bleu_rewards(tiny_model, tmp_path):
    for record in two_steps(BLEUBERI, tiny_model, tmp_path / "run"):
        assert 0.0 <= record["reward/bleu"] <= 1.0


def test_code_canonical_solutions_score_one_and_broken_ones_zero():
    rows = read_rows(SHIPPED["code"][0] / "test.jsonl")
    canonical = [r["messages"][-1]["content"] for r in rows]
    broken = [f"```python\ndef {r['entry_point']}(*args):\n    return None\n```" for r in rows]
    scores = score_with_recipe(CODE, rows + rows, canonical + broken)
    assert not scores.issues
    assert scores.totals[: len(rows)] == [1.0] * len(rows)
    assert scores.totals[len(rows):] == [0.0] * len(rows)
    assert scores.reward_info(0)["details"]["unit_test"]["total"] == 3


def test_bleuberi_references_score_one():
    rows = read_rows(SHIPPED["instruct"][0] / "test.jsonl")
    scores = score_with_recipe(BLEUBERI, rows, [r["references"][0] for r in rows])
    assert not scores.issues and scores.totals == pytest.approx([1.0] * len(rows))
    assert all(r["messages"][-1]["content"] == r["references"][0] for r in rows)
    unrelated = score_with_recipe(BLEUBERI, rows, ["I do not know." for _ in rows])
    assert max(unrelated.totals) < 0.5


def test_a_prm_weights_into_the_code_reward(tiny_model, tmp_path):
    """The documented line-level shaping: a PRM (here untrained) scores each line, weighted 0.2 in the sum."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    prm = tmp_path / "prm"
    AutoModelForTokenClassification.from_pretrained(tiny_model, num_labels=2).save_pretrained(prm)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(prm)
    rewards = ("grpo.rewards=[{name: unit_test, weight: 1.0}, "
               f"{{name: prm, weight: 0.2, args: {{model: '{prm}', separator: \"\\n\", aggregate: mean}}}}]")
    rows = read_rows(SHIPPED["code"][0] / "test.jsonl")[:4]
    scores = score_with_recipe(CODE, rows, [r["messages"][-1]["content"] for r in rows], (rewards,))
    assert not scores.issues
    for i, total in enumerate(scores.totals):
        assert 0.0 < scores.scores["prm"][i] < 1.0
        assert total == pytest.approx(scores.scores["unit_test"][i] + 0.2 * scores.scores["prm"][i])
        assert scores.info[i]["prm"]["steps"] == 4  # ```python, def line, return line, closing fence


@pytest.mark.slow
def test_code_efficiency_recipe_runs_grpo(tiny_model, tmp_path):
    out = tmp_path / "run"
    result = run_cli("run", str(REPO / "recipes" / "code_efficiency.yaml"), f"model.path={tiny_model}",
                     f"output_dir={out}", "train.max_steps=2", "rollout.n=4", "rollout.max_tokens=32",
                     "train.global_batch_size=12", "train.micro_batch_size=12", "train.eval_every=0",
                     "checkpoint.every_n_steps=0", "logging.progress=false", "logging.tensorboard=false",
                     "logging.plots=false", "grpo.rewards=[{name: code_efficiency, args: {repeats: 2, timeout: 5}}]")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [r for r in read_metrics(out) if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:  # a random model's text fails its tests: scored (0.0), never unscored
        assert record["reward/unscored"] == 0 and 0.0 <= record["reward/code_efficiency"] <= 1.0
