"""Tensor-parallel rollout engines (rollout.tensor_parallel_size > 1) on CPU: real vLLM shards under torchrun
(external_launcher over gloo), real DeepSpeed ZeRO, the tiny model.

Each multi-process run is compared with the same recipe at tensor_parallel_size 1: per-prompt seeds make the
samples, hence rewards and updates, those of one replica per rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from tests.distributed.test_distributed import RECIPE, assert_same_run, common, one_process, steps_of  # noqa: F401  (fixtures)
from tests.recipes.test_grpo import grpo_args

TP2 = "rollout.tensor_parallel_size=2"


def assert_same_steps(a: dict[int, dict], b: dict[int, dict]) -> None:
    """``assert_same_run``, and at every step the shards sampled with the learner's weights."""
    assert_same_run(a, b)
    for step in b:
        assert b[step]["drift/abs_diff_max"] < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_colocated_tp2_matches_tp1(zero_stage, common, tmp_path):  # noqa: F811
    runs = {}
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}"
        result = run_cli("run", RECIPE, "--nproc", "2", f"learner.zero_stage={zero_stage}",
                         f"rollout.tensor_parallel_size={tp}", *common, f"output_dir={out}")
        assert result.returncode == 0, result.stderr[-3000:]
        runs[tp] = steps_of(out)
    assert runs[1][1]["reward/std"] > 0 and runs[1][1]["grad_norm"] > 0
    assert_same_steps(runs[1], runs[2])


@pytest.mark.slow
def test_disaggregated_tp2_engine_matches_one_process(common, one_process, tmp_path):  # noqa: F811
    """One learner rank, two rollout ranks forming one TP=2 engine; each bucket is broadcast to both."""
    out = tmp_path / "run"
    result = run_cli("run", RECIPE, "--nproc", "3", "rollout.placement=disaggregated", "rollout.ranks=2", TP2,
                     "learner.zero_stage=3", *common, f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = steps_of(out)
    assert_same_steps(one_process, steps)
    # measured on the rollout ranks (absent when not); 0 is possible when buckets fit in pages already held
    assert all(r["sync/remote_peak_bytes"] >= 0 for r in steps.values())


@pytest.mark.slow
def test_ppo_colocated_tp2_first_step_matches_tp1(tiny_model, arithmetic_data, tmp_path):
    ppo = str(REPO / "recipes" / "ppo.yaml")
    args = [f"model.path={tiny_model}", f"data.path={arithmetic_data['train']}",
            f"data.eval_path={arithmetic_data['test']}", "train.max_steps=1", "ppo.prompts_per_step=4", "rollout.n=2",
            "rollout.max_tokens=12", "train.global_batch_size=8", "train.micro_batch_size=4", "ppo.eval_prompts=4",
            "train.eval_every=0", "logging.progress=false", "logging.tensorboard=false", "logging.plots=false"]
    runs = {}
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}"
        result = run_cli("run", ppo, "--nproc", "2", f"rollout.tensor_parallel_size={tp}", *args, f"output_dir={out}")
        assert result.returncode == 0, result.stderr[-3000:]
        runs[tp] = steps_of(out)[1]
    compared = ("reward/mean", "completion_tokens", "policy_loss", "value_loss", "grad_norm", "critic_grad_norm")
    assert {"policy_loss", "value_loss"} <= set(runs[1]), sorted(runs[1])
    for key in compared:
        if key in runs[1]:
            assert runs[2][key] == pytest.approx(runs[1][key], rel=1e-3, abs=1e-5), key
    assert runs[2]["drift/abs_diff_max"] < 1e-3  # the shards sampled with the learner's weights


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage,lora", [(3, None), (2, None), (3, "merged"), (3, "adapter")],
                         ids=["zero3", "zero2", "zero3-lora-merged", "zero3-lora-adapter"])
def test_both_shards_decode_the_learners_greedy_tokens_after_every_sync(zero_stage, lora, tiny_model, tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    script = REPO / "tests" / "workers" / "tensor_parallel_sync.py"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                             str(script), str(tiny_model), str(out), "--zero", str(zero_stage),
                             *({"merged": ["--lora"], "adapter": ["--adapter"]}.get(lora, []))],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2)]
    for found in ranks:
        # each rank holds half the model (norms are replicated), not a copy
        assert 0.5 * found["full_parameters"] < found["shard_parameters"] < 0.52 * found["full_parameters"]
        assert len(found["rounds"]) == 3
        for round_ in found["rounds"]:
            assert round_["engine"] == round_["learner"]
            assert all(len(ids) == 12 for ids in round_["engine"])
            assert round_["mode"] == (lora or "full")
        # merged and full syncs stream every weight in 100 KiB buckets; adapter syncs send the base weights once,
        # then only the adapter's factors (one bucket), which vLLM's LoRA layers slice per shard
        buckets = [round_["buckets"] for round_ in found["rounds"]]
        assert buckets[0] > 1 and (buckets[1:] == [1, 1] if lora == "adapter" else min(buckets) > 1), buckets
    assert len(ranks[0]["rounds"][0]["engine"]) == 2 and len(ranks[1]["rounds"][0]["engine"]) == 1
    assert ranks[0]["rounds"][0]["prompt_ids"][0] != ranks[1]["rounds"][0]["prompt_ids"][0]
    assert ranks[0]["rounds"][0]["engine"] != ranks[0]["rounds"][2]["engine"]  # the syncs changed the weights


def _check(tiny_model, arithmetic_data, tmp_path, *extra: str, nproc: int = 2, model: Path | None = None):
    args = grpo_args(model or tiny_model, arithmetic_data, tmp_path / "x", *extra)
    return run_cli("run", RECIPE, *args, "--nproc", str(nproc), "--check")


@pytest.mark.parametrize("extra,nproc,numbers", [
    ((TP2.replace("2", "4"),), 2, ["(4)", "(2)"]),
    ((TP2,), 3, ["(2)", "(3)"]),
    (("rollout.placement=disaggregated", "rollout.ranks=3", TP2), 4, ["(2)", "rollout.ranks (3)"]),
], ids=["tp-above-world", "world-not-divisible", "rollout-ranks-not-divisible"])
def test_layouts_that_do_not_divide_are_rejected_before_launch(extra, nproc, numbers, tiny_model, arithmetic_data,
                                                               tmp_path):
    result = _check(tiny_model, arithmetic_data, tmp_path, *extra, nproc=nproc)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "tensor_parallel_size" in result.stderr
    for number in numbers:
        assert number in result.stderr


@pytest.mark.parametrize("field,value,label", [("num_attention_heads", 3, "attention heads"),
                                               ("vocab_size", 1025, "vocabulary"),
                                               ("intermediate_size", 511, "intermediate size"),
                                               ("num_key_value_heads", 3, "KV heads")])
def test_model_shapes_that_do_not_shard_are_rejected_before_launch(field, value, label, tiny_model, arithmetic_data,
                                                                   tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for item in tiny_model.iterdir():
        if item.name != "config.json":
            (model / item.name).symlink_to(item)
    config = json.loads((tiny_model / "config.json").read_text())
    config[field] = value
    if field == "num_key_value_heads":
        config["num_attention_heads"] = 6  # divisible by 2, while 3 KV heads and 2 shards are not
    (model / "config.json").write_text(json.dumps(config))
    result = _check(tiny_model, arithmetic_data, tmp_path, TP2, model=model)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and label in result.stderr and str(value) in result.stderr


def test_a_layout_that_fits_passes_the_check(tiny_model, arithmetic_data, tmp_path):
    result = _check(tiny_model, arithmetic_data, tmp_path, TP2, "train.micro_batch_size=4")
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("fault,rank", [("kill", "1"), ("kill", "2"), ("hang", "2")],
                         ids=["kill-first-shard", "kill-second-shard", "hang-second-shard"])
def test_a_failed_shard_stops_the_run_with_one_line(fault, rank, common, tmp_path):  # noqa: F811
    """One shard of a TP=2 rollout engine (ranks 1 and 2 of 3) dies or hangs at its 4th request (step 2's
    generation, after the step-1 checkpoint). Its partner is then stuck inside vLLM's collective; the run
    must still stop, within rollout.timeout, with one error line naming a rank and the last intact
    checkpoint, and leave no shared memory behind."""
    out = tmp_path / "r"
    timeout = 30
    result = run_cli("run", RECIPE, "--nproc", "3", "rollout.placement=disaggregated", "rollout.ranks=2", TP2,
                     f"rollout.timeout={timeout}", "checkpoint.every_n_steps=1", *common, f"output_dir={out}",
                     env={f"POSTTRAIN_FAULT_ROLLOUT_{fault.upper()}_AT_REQUEST": "4", "POSTTRAIN_FAULT_RANK": rank},
                     timeout=450)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-4000:]
    # the leader names the shard it was waiting on; a dead second shard is named by the launcher, from
    # torchrun's note, since its partner waits inside vLLM's collective and cannot say anything
    named = "error: rank 2 died (exit code -9)" if (fault, rank) == ("kill", "2") else "error: rollout rank 1 "
    assert lines[0].startswith(named), lines[0]
    assert f"last intact checkpoint is {out / 'checkpoints' / 'step-000001'}" in lines[0], lines[0]
    assert (out / "checkpoints" / "step-000001" / "COMPLETE").is_file()
    assert not list(Path("/dev/shm").glob("*-cpushm_*"))  # the killed shard's shared memory is cleaned up
