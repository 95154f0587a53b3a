"""orm and prm with tiny Llama scoring models built locally: batching, chat templates, the PRM convention."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

from posttrain.errors import UserError
from reward_models import RewardSet, load_reward
from reward_models.orm import orm_text
from reward_models.prm import aggregate, build_prm_inputs, prm_token_labels, split_steps
from tests.rewards.conftest import read_jsonl, run_score, write_jsonl

PROMPTS = ["What is 2 + 3?", "Solve x + 1 = 4.", "The cat sat"]
COMPLETIONS = ["First add the numbers. 2 + 3 = 5. The answer is 5.", "x = 3", " on the mat and the dog sat on the log."]


def single_orm_scores(path, texts):
    """Reference: each text alone, unpadded, through the model."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return [model(torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"]])).logits[0, 0].item()
                for t in texts]


def test_orm_batched_scores_match_single_forward(tiny_scoring_models):
    path = tiny_scoring_models["orm"]
    reward = load_reward("orm", model=str(path), batch_size=2)
    got = reward(PROMPTS, COMPLETIONS)
    expected = single_orm_scores(path, [p + c + "<|end|>" for p, c in zip(PROMPTS, COMPLETIONS, strict=True)])
    assert got == pytest.approx(expected, abs=1e-4)
    assert max(got) - min(got) > 1e-3  # the model tells the samples apart


def test_orm_conversational_uses_chat_template(tiny_scoring_models):
    path = tiny_scoring_models["orm"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = [{"role": "user", "content": "hello"}]
    text = orm_text(tokenizer, prompt, "hi there")
    assert text == "<|user|>hello<|end|><|assistant|>hi there<|end|>"
    reward = load_reward("orm", model=str(path))
    got = reward([prompt, prompt], ["hi there", [{"role": "assistant", "content": "hi there"}]])
    assert got == pytest.approx(single_orm_scores(path, [text, text]), abs=1e-4)


def test_orm_errors_are_user_errors(tmp_path):
    reward = load_reward("orm", model=str(tmp_path / "missing"))
    with pytest.raises(UserError, match="does not exist"):
        reward(["p"], ["c"])
    with pytest.raises(UserError, match="needs the argument 'model'"):
        load_reward("orm")


def test_build_prm_inputs_convention(tiny_scoring_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_scoring_models["prm"])

    def tok(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids, positions = build_prm_inputs(tokenizer, "Solve.", ["Step 1: read.", "Step 2: compute."])
    p, s1, s2 = tok("Solve.\n\n"), tok("Step 1: read.\n\n"), tok("Step 2: compute.\n\n")
    assert ids == p + s1 + s2
    assert positions == [len(p) + len(s1) - 1, len(p) + len(s1) + len(s2) - 1]
    assert tokenizer.decode(ids[positions[0]]) == "\n"  # the last token of the step's separator
    assert prm_token_labels(len(ids), positions, [1, 0]) == [
        1 if i == positions[0] else 0 if i == positions[1] else -100 for i in range(len(ids))]
    chat_ids, _ = build_prm_inputs(tokenizer, [{"role": "user", "content": "Solve."}], ["a"], separator="\n")
    assert chat_ids[:len(tok("<|user|>Solve.<|end|><|assistant|>\n"))] == tok("<|user|>Solve.<|end|><|assistant|>\n")


def test_split_and_aggregate():
    assert split_steps("a\n\n\n\n b \n\nc\n") == ["a", "b", "c"]
    assert aggregate([0.5, 0.2, 0.9], "min") == 0.2
    assert aggregate([0.5, 0.2, 0.9], "last") == 0.9
    assert aggregate([0.5, 0.2, 0.9], "prod") == pytest.approx(0.09)
    assert aggregate([0.5, 0.2, 0.9], "mean") == pytest.approx(1.6 / 3)
    assert aggregate([], "min") is None


def reference_step_scores(path, prompt, steps):
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForTokenClassification.from_pretrained(path).eval()
    ids, positions = build_prm_inputs(tokenizer, prompt, steps)
    with torch.no_grad():
        probs = model(torch.tensor([ids])).logits[0].softmax(-1)[:, 1]
    return probs[positions].tolist()


@pytest.mark.parametrize("how", ["min", "last", "prod", "mean"])
def test_prm_step_scores_and_aggregates(tiny_scoring_models, how):
    path = tiny_scoring_models["prm"]
    completions = ["Step 1: read the question.\n\nStep 2: compute.\n\nStep 3: answer.", "x = 3", "one\n\ntwo"]
    reward = load_reward("prm", model=str(path), aggregate=how, batch_size=2)
    out = reward(PROMPTS, completions)
    for prompt, completion, score, info in zip(PROMPTS, completions, out, out.info, strict=True):
        expected = reference_step_scores(path, prompt, split_steps(completion))
        assert info["step_scores"] == pytest.approx(expected, abs=1e-5)
        assert info["steps"] == len(expected)
        want = {"min": min(expected), "last": expected[-1], "prod": math.prod(expected),
                "mean": sum(expected) / len(expected)}[how]
        assert score == pytest.approx(want, abs=1e-5)
    assert len(out.info[0]["step_scores"]) == 3


def test_prm_max_length_scores_only_kept_steps(tiny_scoring_models):
    path = tiny_scoring_models["prm"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    steps = ["Step 1: read the question.", "Step 2: compute.", "Step 3: answer."]
    _, positions = build_prm_inputs(tokenizer, "Q", steps)
    reward = load_reward("prm", model=str(path), max_length=positions[1] + 1)
    out = reward(["Q"], ["\n\n".join(steps)])
    assert len(out.info[0]["step_scores"]) == 2
    assert out.info[0]["step_scores"] == pytest.approx(reference_step_scores(path, "Q", steps)[:2], abs=1e-5)


def test_orm_and_prm_from_posttrain_score(tiny_scoring_models, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": p, "completion": c} for p, c in zip(PROMPTS, COMPLETIONS, strict=True)])
    out = tmp_path / "out.jsonl"
    result = run_score("--reward", "orm", "--reward-arg", f"model={tiny_scoring_models['orm']}",
                       "--reward", "prm", "--reward-arg", f"model={tiny_scoring_models['prm']}", "--weight", "0",
                       str(data), "-o", str(out))
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(out)
    with RewardSet([{"name": "orm", "args": {"model": str(tiny_scoring_models["orm"])}}]) as rs:
        direct = rs.score(PROMPTS, COMPLETIONS).totals
    assert [r["reward"] for r in rows] == pytest.approx(direct, abs=1e-4)
    assert all("step_scores" in r["reward_info"]["details"]["prm"] for r in rows)
