"""Reward-model (rm) and process-reward-model (prm) recipes end to end; their checkpoints are the `orm`
and `prm` rewards unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import REPO, read_metrics, run_cli, write_jsonl

EXAMPLES = REPO / "examples" / "data"


def read_rows(path, n=None):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:n]


def soften(rows):
    """Every other row gets Monte-Carlo-style soft labels (0.9 / 0.1) instead of bools."""
    return [dict(r, labels=[0.9 if x else 0.1 for x in r["labels"]]) if i % 2 else r for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("rmdata")
    return {
        "rm": (write_jsonl(out / "pairs.jsonl", read_rows(EXAMPLES / "preference" / "train.jsonl", 128)),
               write_jsonl(out / "pairs-eval.jsonl", read_rows(EXAMPLES / "preference" / "test.jsonl", 48))),
        "prm": (write_jsonl(out / "steps.jsonl", soften(read_rows(EXAMPLES / "process" / "train.jsonl", 64))),
                write_jsonl(out / "steps-eval.jsonl", read_rows(EXAMPLES / "process" / "test.jsonl", 16))),
    }


def args(kind, tiny_model, data, out, *extra):
    train, evaluation = data[kind]
    return [f"model.path={tiny_model}", f"data.path={train}", f"data.eval_path={evaluation}", f"output_dir={out}",
            "train.global_batch_size=16", "train.micro_batch_size=8", "train.eval_batch_size=16",
            "learner.warmup_steps=0", "logging.progress=false", "logging.tensorboard=false", "logging.plots=false",
            *extra]


@pytest.fixture(scope="module")
def rm_run(tiny_model, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "run"
    result = run_cli("run", str(REPO / "recipes" / "rm.yaml"),
                     *args("rm", tiny_model, data, out, "train.max_steps=16", "learner.lr=1e-3"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def prm_run(tiny_model, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("prm") / "run"
    result = run_cli("run", str(REPO / "recipes" / "prm.yaml"),
                     *args("prm", tiny_model, data, out, "train.max_steps=4", "learner.lr=1e-3"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_reward_model_learns_held_out_preferences(rm_run):
    """Even from a random tiny model, 16 steps on 128 pairs tell right answers from wrong held-out ones."""
    summary = json.loads((rm_run / "summary.json").read_text())
    start, end = summary["eval_start"]["accuracy"], summary["eval_end"]["accuracy"]
    assert end >= 0.7 and end > start + 0.2, (start, end)
    assert "eval/margin" in read_metrics(rm_run)[-1]


def test_saved_reward_model_is_the_orm_reward(rm_run, data):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from reward_models import load_reward

    model_dir = rm_run / "checkpoints" / "last" / "model"
    reward = load_reward("orm", model=str(model_dir))
    rows = read_rows(data["rm"][1])
    chosen = reward([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = reward([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    scores = list(chosen) + list(rejected)
    assert all(isinstance(s, float) for s in scores)
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(rows)
    summary = json.loads((rm_run / "summary.json").read_text())
    assert accuracy == pytest.approx(summary["eval_end"]["accuracy"])  # the reward scores what was trained
    # ... and reads the model's single logit at the last token.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    ids = tokenizer.apply_chat_template(rows[0]["prompt"] + rows[0]["chosen"], tokenize=False)
    with torch.no_grad():
        direct = model(**tokenizer(ids, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
    assert chosen[0] == pytest.approx(direct, abs=1e-5)


def test_reward_head_reads_the_last_real_token_with_right_padding(tiny_model):
    from posttrain.config.schema import ModelConfig
    from posttrain.data.preference import PreferenceExample, collate_preference
    from posttrain.models.heads import load_scoring_model
    from posttrain.models.loading import load_tokenizer

    config = ModelConfig(path=str(tiny_model))
    tokenizer = load_tokenizer(config, None)
    model = load_scoring_model(config, "sequence", tokenizer.pad_token_id).eval()
    short, long = PreferenceExample([5, 6], [7], [8, 9, 10, 11, 12]), PreferenceExample([5, 6], [8, 9, 10], [7, 7])
    batch = collate_preference([short, long], tokenizer.pad_token_id)
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        for row, ids in enumerate([[5, 6, 7], [5, 6, 8, 9, 10], [5, 6, 8, 9, 10, 11, 12], [5, 6, 7, 7]]):
            alone = model(input_ids=torch.tensor([ids])).logits[0, 0]
            assert padded[row].item() == pytest.approx(alone.item(), abs=1e-5), row


def test_prm_trains_on_hard_and_soft_labels_and_is_the_prm_reward(prm_run):
    from reward_models import load_reward

    summary = json.loads((prm_run / "summary.json").read_text())
    end = summary["eval_end"]
    assert end["loss"] < summary["eval_start"]["loss"]
    assert 0 < end["step_positive_rate"] < 1
    assert end["constant_baseline"] == pytest.approx(max(end["step_positive_rate"], 1 - end["step_positive_rate"]))
    reward = load_reward("prm", model=str(prm_run / "checkpoints" / "last" / "model"))
    out = reward(["What is 2 + 3 + 4?"] * 2, ["2 + 3 = 5\n\n5 + 4 = 9", "2 + 3 = 5\n\n5 + 4 = 19"])
    assert all(0.0 <= s <= 1.0 for s in out)
    assert [len(info["step_scores"]) for info in out.info] == [2, 2]
    assert out.info[0]["step_scores"][0] == pytest.approx(out.info[1]["step_scores"][0], abs=1e-6)  # same prefix


# One two-process run of the reward-model trainer in the default tier; prm (the same trainer and ZeRO path,
# token-level head) trains single-process in prm_run and on two processes in the slow tier.
@pytest.mark.parametrize("kind", ["rm", pytest.param("prm", marks=pytest.mark.slow)])
def test_two_processes_zero2(kind, tiny_model, data, tmp_path):
    out = tmp_path / "run"
    result = run_cli("run", str(REPO / "recipes" / f"{kind}.yaml"), "--nproc", "2", "learner.zero_stage=2",
                     *args(kind, tiny_model, data, out, "train.max_steps=2", "train.micro_batch_size=4"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval_end"]
    assert (out / "checkpoints" / "step-000002" / "model" / "config.json").is_file()
