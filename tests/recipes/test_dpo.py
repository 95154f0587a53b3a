"""DPO: parity with TRL's DPOTrainer, and the recipe end to end on the DeepSpeed learner.

1 vs 2 processes (ZeRO-3), kill -9 and ``resume=auto``, precomputed reference, LoRA reference.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from tests.conftest import REPO, assert_same_gradients, read_metrics, run_cli, write_jsonl

RECIPE = str(REPO / "recipes" / "dpo.yaml")
EXAMPLES = REPO / "examples" / "data" / "preference"


def read_rows(path, n=None):
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:n]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A small slice of the shipped example: 48 train and 16 eval pairs."""
    out = tmp_path_factory.mktemp("pairs")
    return {"train": write_jsonl(out / "train.jsonl", read_rows(EXAMPLES / "train.jsonl", 48)),
            "test": write_jsonl(out / "test.jsonl", read_rows(EXAMPLES / "test.jsonl", 16))}


def dpo_args(tiny_model, pairs, out, *extra):
    return [f"model.path={tiny_model}", f"data.path={pairs['train']}", f"data.eval_path={pairs['test']}",
            f"output_dir={out}", "train.max_steps=4", "train.global_batch_size=8", "train.micro_batch_size=4",
            "train.eval_batch_size=8", "train.eval_every=0", "learner.lr=1e-3", "learner.warmup_steps=0",
            "dpo.beta=0.1", "logging.progress=false", "logging.tensorboard=false", "logging.plots=false", *extra]


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


# ----------------------------------------------------------------------------- parity with TRL


def trl_trainer(model_path, rows, out, loss_type="sigmoid"):
    from posttrain.compare.trl import dpo_trainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dpo_trainer(str(model_path), rows, out, batch_size=4, lr=1e-3, beta=0.1, loss_type=loss_type,
                           max_length=128)


@pytest.mark.parametrize("kind", ["conversational", "strings"])
def test_tokenisation_equals_trl(kind, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from posttrain.data.loading import Row
    from posttrain.data.preference import preference_example

    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in read_rows(EXAMPLES / "train.jsonl", 24)]
    if kind == "strings":  # plain text: EOS appended, and a prompt ending in a space (BPE merges across it)
        rows = [{"prompt": r["prompt"][0]["content"] + " ", "chosen": r["chosen"][0]["content"],
                 "rejected": r["rejected"][0]["content"]} for r in rows]
    trainer = trl_trainer(tiny_model, rows, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for i, row in enumerate(rows):
        ours = preference_example(tokenizer, Row(row, "rows", i + 1))
        theirs = trainer.train_dataset[i]
        assert (ours.prompt_ids, ours.chosen_ids, ours.rejected_ids) == (
            theirs["prompt_ids"], theirs["chosen_ids"], theirs["rejected_ids"]), i


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_first_step_loss_and_gradients_equal_trl(loss_type, tiny_model, tmp_path):
    """Same model, batch and settings: TRL's compute_loss and ours give the same loss and parameter grads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.data.loading import Row
    from posttrain.data.preference import collate_preference, preference_example
    from posttrain.trainers.dpo import DPOSettings
    from posttrain.trainers.dpo_losses import pair_losses, policy_pair_logps, reference_pair_logps
    from posttrain.trainers.reference import FrozenReference

    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in read_rows(EXAMPLES / "train.jsonl", 4)]
    trainer = trl_trainer(tiny_model, rows, tmp_path, loss_type)
    theirs_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, theirs_batch)
    trl_loss.backward()

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model).train()
    reference = FrozenReference(AutoModelForCausalLM.from_pretrained(tiny_model))
    batch = collate_preference([preference_example(tokenizer, Row(r, "rows", i + 1)) for i, r in enumerate(rows)],
                               tokenizer.pad_token_id)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(batch[key], theirs_batch[key]), key
    logps = policy_pair_logps(policy, batch) | reference_pair_logps(reference, batch)
    loss = pair_losses(DPOSettings(loss_type=[loss_type], beta=0.1), logps).mean()
    loss.backward()

    if loss_type == "sigmoid":
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    torch.testing.assert_close(loss, trl_loss.detach(), rtol=1e-5, atol=1e-7)
    assert_same_gradients(policy, trainer.model)


# ----------------------------------------------------------------------------- the recipe


@pytest.fixture(scope="module")
def one_process(tiny_model, pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo1") / "run"
    result = run_cli("run", RECIPE, *dpo_args(tiny_model, pairs, out, "checkpoint.every_n_steps=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_one_process_trains_and_writes_hf_checkpoint(one_process):
    from transformers import AutoModelForCausalLM

    summary = json.loads((one_process / "summary.json").read_text())
    assert [s for s, _ in losses(one_process)] == [1, 2, 3, 4]
    assert losses(one_process)[0][1] == pytest.approx(math.log(2), abs=1e-6)
    assert summary["eval_start"]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert summary["eval_end"]["loss"] < summary["eval_start"]["loss"]
    metrics = read_metrics(one_process)[-1]
    for key in ("rewards/accuracy", "rewards/margin", "rewards/chosen", "logps/rejected", "eval/rewards/accuracy"):
        assert key in metrics
    model = AutoModelForCausalLM.from_pretrained(one_process / "checkpoints" / "last" / "model")
    assert model.config.model_type == "llama"


def test_two_processes_zero3_match_one_process(one_process, tiny_model, pairs, tmp_path):
    out = tmp_path / "run2"
    result = run_cli("run", RECIPE, "--nproc", "2", "learner.zero_stage=3",
                     *dpo_args(tiny_model, pairs, out, "train.micro_batch_size=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    for (s1, l1), (s2, l2) in zip(losses(one_process), losses(out), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-5)
    one = json.loads((one_process / "summary.json").read_text())["eval_end"]
    two = json.loads((out / "summary.json").read_text())["eval_end"]
    assert one["loss"] == pytest.approx(two["loss"], abs=1e-5)


def test_kill_9_then_resume_matches_uninterrupted(one_process, tiny_model, pairs, tmp_path):
    out = tmp_path / "killed"
    args = dpo_args(tiny_model, pairs, out, "checkpoint.every_n_steps=2")
    killed = run_cli("run", RECIPE, *args, env={"POSTTRAIN_FAULT_KILL_AFTER_STEP": "3"})
    assert killed.returncode == -9
    assert [s for s, _ in losses(out)] == [1, 2, 3]
    resumed = run_cli("run", RECIPE, *args, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step-000002" in resumed.stderr
    assert losses(out) == losses(one_process)  # exact: same data order, RNG, optimizer state


def test_precomputed_reference_equals_live_and_is_cached(one_process, tiny_model, pairs, tmp_path):
    out = tmp_path / "pre"
    result = run_cli("run", RECIPE, *dpo_args(tiny_model, pairs, out, "dpo.precompute_reference=true"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "computed and cached" in result.stderr
    assert len(list((out / "cache").glob("reference-*.pt"))) == 1
    for (s1, l1), (s2, l2) in zip(losses(one_process), losses(out), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5, abs=1e-6)


def test_lora_reference_is_the_base_with_adapter_disabled(tiny_model, pairs, tmp_path):
    out = tmp_path / "lora"
    result = run_cli("run", RECIPE, *dpo_args(tiny_model, pairs, out, "model.lora.enabled=true",
                                              "train.max_steps=2", "learner.lr=1e-2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "adapter disabled (no second copy)" in result.stderr and "frozen copy" not in result.stderr
    (first, loss1), (_, loss2) = losses(out)
    assert loss1 == pytest.approx(math.log(2), abs=1e-6)  # policy == reference before the first update
    assert loss2 != pytest.approx(math.log(2), abs=1e-4)  # ... and not after it: the reference stayed put
    assert (out / "checkpoints" / "last" / "adapter").is_dir()
