"""Placements of online RL under torchrun (real vLLM on CPU, real DeepSpeed over gloo, the tiny model).

Every multi-process run is compared with one one-process run of the same recipe: same seed and global batch,
so the same prompts and (seeds by global prompt position) the same samples, hence the same rewards and updates.
One optimizer step per rollout: with several mini-batches their composition would depend on the rank split.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, read_metrics, run_cli
from tests.recipes.test_grpo import BAD_REWARDS, grpo_args

RECIPE = str(REPO / "recipes" / "grpo.yaml")
DISAGGREGATED = "rollout.placement=disaggregated"


@pytest.fixture(scope="module")
def common(tiny_model, arithmetic_data, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("placement")
    (root / "r.py").write_text(BAD_REWARDS)
    return grpo_args(tiny_model, arithmetic_data, root / "x", f"grpo.rewards=[{{name: '{root}/r.py:varied'}}]",
                     "train.micro_batch_size=4", "train.global_batch_size=16", "learner.lr=1e-3",
                     "logging.plots=false")


@pytest.fixture(scope="module")
def one_process(common, tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("one")
    result = run_cli("run", RECIPE, *common, f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = steps_of(out)
    assert steps[1]["reward/std"] > 0 and steps[1]["grad_norm"] > 0  # the update is not trivially zero
    return steps


def steps_of(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(out) if "reward/mean" in r}


def assert_same_run(a: dict[int, dict], b: dict[int, dict]) -> None:
    assert sorted(a) == sorted(b) == [1, 2]
    for step in a:
        assert b[step]["reward/mean"] == pytest.approx(a[step]["reward/mean"], abs=1e-6)
        assert b[step]["completion_tokens"] == pytest.approx(a[step]["completion_tokens"], abs=1e-6)
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], abs=1e-5)
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-3)
    assert b[2]["eval/reward"] == pytest.approx(a[2]["eval/reward"], abs=1e-6)


@pytest.mark.slow
def test_colocated_two_processes_zero2_match_one_process(common, one_process, tmp_path):
    out = tmp_path / "two"
    result = run_cli("run", RECIPE, "--nproc", "2", "learner.zero_stage=2", *common, f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(one_process, steps_of(out))


@pytest.mark.slow
@pytest.mark.parametrize("nproc,zero_stage", [(2, 2), (2, 3), (3, 3)],
                         ids=["1-rollout-1-learner-zero2", "1-rollout-1-learner-zero3", "1-rollout-2-learners-zero3"])
def test_disaggregated_matches_one_process(nproc, zero_stage, common, one_process, tmp_path):
    """The last rank only generates; the others only train (ZeRO over the learner ranks alone) and send it
    their weights after every step. Checkpoints, metrics and evaluation come from global rank 0, a learner."""
    out = tmp_path / "run"
    result = run_cli("run", RECIPE, "--nproc", str(nproc), DISAGGREGATED, f"learner.zero_stage={zero_stage}",
                     "checkpoint.every_n_steps=1", *common, f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = steps_of(out)
    assert_same_run(one_process, steps)
    for record in steps.values():
        assert record["drift/abs_diff_max"] < 1e-3  # the rollout rank sampled with the learner's weights
        # The rollout rank measured its growth while loading (the key is absent when it could not); growth may be
        # 0 when the received buckets fit in pages the process already holds.
        assert record["sync/num_buckets"] >= 1 and record["sync/remote_peak_bytes"] >= 0
    assert (out / "checkpoints" / "step-000002" / "model" / "model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints" / "step-000002" / "rng").iterdir()) == \
        [f"rank-{r}.pt" for r in range(nproc - 1)]  # learner ranks only
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_end"]["reward"] == pytest.approx(one_process[2]["eval/reward"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_rollout_rank_greedy_matches_learner_after_sync(lora, tiny_model, tmp_path):
    """After a ZeRO-3 learner's optimizer step and a sync in 100 KiB buckets, the rollout rank's engine
    decodes greedily exactly what transformers (+ PEFT for a LoRA learner, whose adapter is merged into the
    stream) decodes with the learner's weights."""
    out = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    script = REPO / "tests" / "workers" / "disaggregated_sync.py"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                             str(script), str(tiny_model), str(out), *(["--lora"] if lora else [])], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(out.read_text())
    assert found["partitioned"] and found["buckets"] > 1 and found["remote_peak_bytes"] is not None
    assert all(len(ids) == 12 for ids in found["engine"])
    assert found["engine"] == found["learner"]
    assert found["engine"] != found["before"]  # the sync changed what the engine computes
    assert found["mode"] == ("merged" if lora else "full")


def test_placement_is_checked_before_anything_starts(tiny_model, arithmetic_data, tmp_path):
    args = grpo_args(tiny_model, arithmetic_data, tmp_path / "r", DISAGGREGATED)
    alone = run_cli("run", RECIPE, *args, "--check")
    assert alone.returncode == 2 and "Traceback" not in alone.stderr
    assert "rollout.placement=disaggregated" in alone.stderr and "at least 2 processes" in alone.stderr
    no_learner = run_cli("run", RECIPE, *args, "--nproc", "2", "rollout.ranks=2", "--check")
    assert no_learner.returncode == 2 and "at least one learner rank" in no_learner.stderr
    ok = run_cli("run", RECIPE, *args, "--nproc", "2", "--check")
    assert ok.returncode == 0, ok.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_failed_rollout_rank_stops_the_run_naming_it(fault, common, one_process, tmp_path):
    """Request 4 of the rollout rank is step 2's generation (1: the first evaluation, 2: step 1's generation,
    3: its weight load), after the step-1 checkpoint. A killed (kill -9) rank is found at once, a hung one
    after rollout.timeout; either way the run exits non-zero with one line naming the rank and that
    checkpoint. After the kill, ``resume=auto`` finishes the run with the uninterrupted run's metrics."""
    out = tmp_path / "r"
    timeout = 30  # long enough for a busy machine, short enough for a test
    args = ["run", RECIPE, "--nproc", "2", DISAGGREGATED, f"rollout.timeout={timeout}", "checkpoint.every_n_steps=1",
            *common, f"output_dir={out}"]
    started = time.monotonic()
    result = run_cli(*args, env={f"POSTTRAIN_FAULT_ROLLOUT_{fault.upper()}_AT_REQUEST": "4"}, timeout=450)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    what = "died while generating" if fault == "kill" else f"did not answer within rollout.timeout={timeout} s"
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: rollout rank 1 ")]
    assert len(lines) == 1 and what in lines[0], result.stderr[-3000:]
    assert f"last intact checkpoint is {out / 'checkpoints' / 'step-000001'}" in lines[0]
    assert (out / "checkpoints" / "step-000001" / "COMPLETE").is_file()
    assert not (out / "checkpoints" / "step-000002").exists()
    assert elapsed < 420
    if fault == "kill":
        resumed = run_cli(*args, "resume=auto")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert_same_run(one_process, steps_of(out))


ASYNC = "rollout.schedule=one_step_async"


@pytest.mark.slow
def test_one_step_async_trains_on_one_step_stale_batches_and_resumes(common, one_process, tmp_path):
    """One-step async: step 1 is generated before anything trains, so it is the synchronous run's step 1 (same
    samples; the separate old-log-prob forward and TIS weights of ~1 leave the update nearly unchanged). Step 2
    was generated while step 1 trained, with the weights before its update: staleness 1, and the learner's
    log-probs of its tokens differ from the sampler's. A run resumed from the step-1 checkpoint regenerates
    step 2 on-policy (the batch in flight is not checkpointed)."""
    out = tmp_path / "async"
    args = ["run", RECIPE, "--nproc", "2", DISAGGREGATED, ASYNC, "grpo.tis_cap=2.0", "checkpoint.every_n_steps=1",
            *common, f"output_dir={out}"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = steps_of(out)
    assert sorted(steps) == [1, 2]
    first, second = steps[1], steps[2]
    assert first["staleness"] == 0 and second["staleness"] == 1
    assert first["reward/mean"] == pytest.approx(one_process[1]["reward/mean"], abs=1e-6)
    assert first["completion_tokens"] == pytest.approx(one_process[1]["completion_tokens"], abs=1e-6)
    assert first["grad_norm"] == pytest.approx(one_process[1]["grad_norm"], rel=1e-2)
    assert first["drift/abs_diff_max"] < 1e-3 < second["drift/abs_diff_max"]  # step 2 was sampled off-policy
    assert second["drift/tis_max_ratio"] != pytest.approx(1.0, abs=1e-4)
    for record in steps.values():
        assert all(math.isfinite(record[k]) for k in ("reward/mean", "loss", "grad_norm", "time/generate_wait_s"))
    assert math.isfinite(second["eval/reward"])

    shutil.rmtree(out / "checkpoints" / "step-000002")
    resumed = run_cli(*args, f"resume={out / 'checkpoints' / 'step-000001'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = steps_of(out)
    assert sorted(again) == [1, 2] and again[1] == first
    assert again[2]["staleness"] == 0 and again[2]["drift/abs_diff_max"] < 1e-3
    assert (out / "checkpoints" / "step-000002" / "COMPLETE").is_file()


@pytest.mark.slow
def test_one_step_async_hung_rollout_rank_is_found_while_the_learners_wait(tiny_model, arithmetic_data, tmp_path):
    """Request 3 is step 2's generation, submitted while step 1 trains: the leader waits rollout.timeout for it."""
    timeout = 30
    result = run_cli("run", RECIPE, "--nproc", "2", *grpo_args(tiny_model, arithmetic_data, tmp_path / "r",
                                                               DISAGGREGATED, ASYNC, f"rollout.timeout={timeout}"),
                     env={"POSTTRAIN_FAULT_ROLLOUT_HANG_AT_REQUEST": "3"}, timeout=450)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: rollout rank 1 ")]
    assert len(lines) == 1 and f"did not answer within rollout.timeout={timeout} s while generating" in lines[0], \
        result.stderr[-3000:]


def test_one_step_async_needs_the_disaggregated_placement(tiny_model, arithmetic_data, tmp_path):
    colocated = run_cli("run", RECIPE, *grpo_args(tiny_model, arithmetic_data, tmp_path / "r", ASYNC), "--check")
    assert colocated.returncode == 2 and "Traceback" not in colocated.stderr
    assert "rollout.schedule=one_step_async" in colocated.stderr and "rollout.placement=disaggregated" in colocated.stderr
    ok = run_cli("run", RECIPE, *grpo_args(tiny_model, arithmetic_data, tmp_path / "r", ASYNC, DISAGGREGATED),
                 "--nproc", "2", "--check")
    assert ok.returncode == 0, ok.stderr[-2000:]
