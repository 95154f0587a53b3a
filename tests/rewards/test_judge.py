"""The ``judge`` reward (LLM-as-judge) on a real vLLM CPU engine with the tiny local model.

Most tests share one engine (module scope) and judge through it in ``engine: policy`` mode, the way an
online trainer hands its rollout engine over; ``posttrain score`` and GRPO start judges of their own.
"""

from __future__ import annotations

import json
import math

import pytest

from posttrain.errors import ConfigError, UserError
from reward_models import RewardFailure, RewardSet, load_reward
from reward_models.judge import ParseError, default_template, parse_tag_score, render_template, yes_no_score
from tests.conftest import REPO, read_metrics, run_cli
from tests.rewards.conftest import read_jsonl, run_score, write_jsonl

PROMPTS = ["What is 2 + 3?", "Solve x + 1 = 4.", "Name a colour."]
COMPLETIONS = ["2 + 3 = 5. The answer is 5.", "x = 3", "blue"]
ANSWERS = ["5", "3", "any colour"]


# ---- pure functions ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("<score>7</score>", (0.7, 7.0)),
    ("Reasoning... <score> 10 </score>", (1.0, 10.0)),
    ("<score>2</score> then changed my mind <score>4.5</score>", (0.45, 4.5)),  # the last tag counts
    ("<SCORE>0</SCORE>", (0.0, 0.0)),
    ("cut at the stop string: <score>3", (0.3, 3.0)),  # a final open tag
])
def test_parse_tag_score_reads_the_last_tag(text, expected):
    score, raw = parse_tag_score(text)
    assert (score, raw) == pytest.approx(expected)


@pytest.mark.parametrize("text, message", [
    ("no verdict at all", "no <score>"),
    ("<score>seven</score>", "not a number"),
    ("<score></score>", "not a number"),
    ("<score>11</score>", "outside \\[0, 10\\]"),
    ("<score>-1</score>", "outside"),
    ("<rating>5</rating>", "no <score>"),
])
def test_parse_tag_score_failures(text, message):
    with pytest.raises(ParseError, match=message):
        parse_tag_score(text)


def test_parse_tag_score_settings():
    assert parse_tag_score("<rating>4</rating>", tag="rating", min_score=1, max_score=5) == (0.75, 4.0)
    assert parse_tag_score("<score>4</score>", min_score=1, max_score=5, normalize=False) == (4.0, 4.0)
    with pytest.raises(ParseError, match="outside \\[1, 5\\]"):
        parse_tag_score("<score>0</score>", min_score=1, max_score=5)


def test_yes_no_score_is_the_two_token_softmax():
    ly, ln = math.log(0.3), math.log(0.1)
    assert yes_no_score([ly], [ln]) == pytest.approx(0.75)
    assert yes_no_score([ly, math.log(0.1)], [ln]) == pytest.approx(0.8)  # several spellings are summed
    assert yes_no_score([-800.0], [-801.0]) == pytest.approx(1 / (1 + math.exp(-1)))  # no underflow
    assert yes_no_score([-1.0], [-math.inf]) == 1.0
    with pytest.raises(ParseError, match="no probability"):
        yes_no_score([-math.inf], [-math.inf])


def test_templates():
    template = default_template("tag", with_reference=True)
    assert "{reference}" in template and "<score>5</score>" in template
    assert "{reference}" not in default_template("yes_no", with_reference=False)
    text = render_template('Q: {prompt} A: {completion} R: {reference} {"json": {"kept": 1}}',
                           "p {completion}", "c", "r")
    assert text == 'Q: p {completion} A: c R: r {"json": {"kept": 1}}'  # inserted text is not expanded again


def test_settings_are_checked(tmp_path):
    with pytest.raises(UserError, match="needs the argument 'model'"):
        load_reward("judge")
    with pytest.raises(UserError, match="rule must be one of"):
        load_reward("judge", model="m", rule="likert")
    with pytest.raises(UserError, match="no \\{completion\\} placeholder"):
        load_reward("judge", model="m", template="Rate {prompt}")
    with pytest.raises(UserError, match="no reference column"):
        load_reward("judge", model="m", template="{completion} vs {reference}")
    with pytest.raises(UserError, match="leave 'model' out"):
        load_reward("judge", model="m", engine="policy")
    with pytest.raises(UserError, match="not both"):
        load_reward("judge", model="m", template="{completion}", template_file="t.txt")
    file = tmp_path / "template.txt"
    file.write_text("Judge {completion} against {reference}. <score>")
    reward = load_reward("judge", model="m", template_file=str(file), reference="answer")
    assert reward.fn.template == file.read_text()
    assert [c.name for c in reward.columns] == ["answer"]  # posttrain score checks rows have it
    with pytest.raises(UserError, match="does not exist"):  # the model is looked for on first use
        reward(["p"], ["c"], answer=["a"])
    unbound = load_reward("judge", engine="policy")
    with pytest.raises(UserError, match="no rollout engine was handed"):
        unbound(["p"], ["c"])
    with pytest.raises(ConfigError, match="colocated"):
        unbound.fn.bind_engine(object())  # a RemoteEngine or a tensor-parallel group cannot serve it


# ---- on a real engine ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny_model):
    from posttrain.rollout import RolloutConfig, RolloutEngine

    engine = RolloutEngine(tiny_model, RolloutConfig(enforce_eager=True, max_model_len=512, max_num_seqs=8))
    yield engine
    engine.close()


def bound(engine, **args):
    reward = load_reward("judge", engine="policy", **args)
    reward.fn.bind_engine(engine)
    return reward


def test_tag_parse_failures_are_counted_and_handed_to_the_policy(engine):
    """A tiny random model does not write <score> tags: every row is a failure, reported, never a silent 0."""
    reward = bound(engine, rule="tag", max_tokens=8)
    out = reward(PROMPTS, COMPLETIONS)
    assert set(out.errors) == {0, 1, 2} and all(e.startswith("judge: ") for e in out.errors.values())
    assert all(row["parse_error"] and "judge_output" in row for row in out.info)
    with RewardSet([reward], on_error="zero") as rewards:
        result = rewards.score(PROMPTS, COMPLETIONS)
        assert result.totals == [0.0, 0.0, 0.0]
        assert [(i.reward, i.row, i.kind) for i in result.issues] == [("judge", 0, "error"), ("judge", 1, "error"),
                                                                     ("judge", 2, "error")]
        assert rewards.stats["judge"] == {"scored": 0, "skipped": 0, "failed": 3}
        info = result.reward_info(1)
        assert "parse_error" in info["details"]["judge"] and info["errors"]
    with RewardSet([reward], on_error="fail") as rewards, pytest.raises(RewardFailure, match="judge.*row 0"):
        rewards.score(PROMPTS, COMPLETIONS)


def test_tag_outputs_are_greedy_and_batched(engine):
    reward = bound(engine, rule="tag", max_tokens=8)
    together = [row["judge_output"] for row in reward(PROMPTS, COMPLETIONS).info]
    alone = [reward([p], [c]).info[0]["judge_output"] for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    assert together == alone and all(together)


def hf_yes_no(path, text: str, *, chat: bool, yes: str = "yes", no: str = "no") -> float:
    """The reference: softmax over the yes/no logits at the last position, with transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False).input_ids
    else:
        ids = tokenizer(text).input_ids
    (yes_id,), (no_id,) = (tokenizer(t, add_special_tokens=False).input_ids for t in (yes, no))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].double()
    return torch.softmax(logits[[yes_id, no_id]], -1)[0].item()


@pytest.mark.parametrize("chat", [True, False])
def test_yes_no_equals_the_transformers_softmax(engine, tiny_model, chat):
    reward = bound(engine, rule="yes_no", reference="answer", chat=chat)
    out = reward(PROMPTS, COMPLETIONS, answer=ANSWERS)
    assert not out.errors
    texts = reward.fn.judge_prompts(PROMPTS, COMPLETIONS, ANSWERS)
    assert "[Reference answer]\n5" in texts[0]
    expected = [hf_yes_no(tiny_model, t, chat=chat) for t in texts]
    assert all(0 < s < 1 for s in out)
    assert list(out) == pytest.approx(expected, abs=1e-4)
    assert max(out) - min(out) > 1e-4  # the rows are told apart
    for row, score in zip(out.info, out, strict=True):
        assert 1 / (1 + math.exp(row["logprob_no"] - row["logprob_yes"])) == pytest.approx(score)


def test_yes_no_rows_without_reference_or_room_fail(engine):
    reward = bound(engine, rule="yes_no", reference="answer")
    out = reward(PROMPTS[:2] + ["word " * 600], COMPLETIONS, answer=[None, "3", "x"])
    assert set(out.errors) == {0, 2}
    assert "no 'answer'" in out.errors[0] and "max_model_len" in out.errors[2]
    assert out[1] is not None and 0 < out[1] < 1
    with pytest.raises(UserError, match="is 2 tokens"):  # 'Yes' is two tokens for the tiny tokenizer
        bound(engine, rule="yes_no", yes_token="Yes")(PROMPTS, COMPLETIONS)
    several = bound(engine, rule="yes_no", yes_token=["yes", " yes"], no_token=["no", " no"])
    assert all(0 < s < 1 for s in several(PROMPTS, COMPLETIONS))


@pytest.mark.slow
def test_posttrain_score_with_judges(tiny_model, tmp_path):
    """Two judges of their own (yes/no with a reference, tag) from the command line; the tag judge's parse
    failures are scored 0 under --on-error zero and listed in reward_info."""
    rows = [{"prompt": p, "completion": c, "answer": a} for p, c, a in zip(PROMPTS, COMPLETIONS, ANSWERS, strict=True)]
    src, dst = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    common = [f"model={tiny_model}", "enforce_eager=true", "max_model_len=512", "max_num_seqs=4"]
    args = ["--reward", "judge", *(a for kv in common + ["rule=yes_no", "reference=answer"]
                                   for a in ("--reward-arg", kv)),
            "--reward", "judge", "--weight", "0", *(a for kv in common + ["max_tokens=6"] for a in ("--reward-arg", kv))]
    result = run_score(*args, "--on-error", "zero", str(src), "--output", str(dst))
    assert result.returncode == 0, result.stderr[-3000:]
    out = read_jsonl(dst)
    assert [r["prompt"] for r in out] == PROMPTS
    for row in out:
        info = row["reward_info"]
        assert 0 < info["scores"]["judge"] < 1 and row["reward"] == pytest.approx(info["scores"]["judge"])
        assert "logprob_yes" in info["details"]["judge"]
        assert info["scores"]["judge_2"] == 0.0 and "parse_error" in info["details"]["judge_2"]
        assert any("judge_2" in json.dumps(e) for e in info["errors"])


@pytest.mark.slow
def test_grpo_with_judges_in_the_recipe(tiny_model, arithmetic_data, tmp_path):
    """recipes/grpo_judge.yaml for two steps: a yes/no judge of its own, and a tag judge on the policy's
    engine (its parse failures scored 0 and counted)."""
    out = tmp_path / "run"
    rewards = (f"[{{name: judge, args: {{model: '{tiny_model}', rule: yes_no, reference: answer, "
               "enforce_eager: true, max_model_len: 512}}, "
               "{name: judge, label: self_judge, weight: 0.0, args: {engine: policy, max_tokens: 6}}]")
    result = run_cli("run", str(REPO / "recipes" / "grpo_judge.yaml"), f"model.path={tiny_model}",
                     f"data.path={arithmetic_data['train']}", f"data.eval_path={arithmetic_data['test']}",
                     f"output_dir={out}", "train.max_steps=2", "grpo.prompts_per_step=4", "rollout.n=4",
                     "rollout.max_tokens=12", "train.global_batch_size=16", "train.micro_batch_size=8",
                     "grpo.eval_prompts=4", "train.eval_every=0", "logging.progress=false",
                     "logging.tensorboard=false", "logging.plots=false", f"grpo.rewards={rewards}",
                     "grpo.reward_on_error=zero")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [r for r in read_metrics(out) if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        assert 0 < record["reward/judge"] < 1 and record["reward/self_judge"] == 0.0
        assert record["reward/issues"] == 16  # every sample's self-judgement: no tag, counted
