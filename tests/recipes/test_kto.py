"""KTO on unpaired data end to end: it trains, and desirable answers end up with higher implicit rewards."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, read_metrics, run_cli, write_jsonl

EXAMPLES = REPO / "examples" / "data" / "kto"


def read_rows(path, n):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:n]


def test_kto_trains_and_separates_desirable_from_undesirable(tiny_model, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", read_rows(EXAMPLES / "train.jsonl", 96))
    evaluation = write_jsonl(tmp_path / "test.jsonl", read_rows(EXAMPLES / "test.jsonl", 32))
    out = tmp_path / "run"
    result = run_cli("run", str(REPO / "recipes" / "kto.yaml"), f"model.path={tiny_model}", f"data.path={train}",
                     f"data.eval_path={evaluation}", f"output_dir={out}", "train.max_steps=12",
                     "train.global_batch_size=16", "train.micro_batch_size=8", "train.eval_batch_size=16",
                     "learner.lr=1e-3", "learner.warmup_steps=0", "logging.progress=false",
                     "logging.tensorboard=false", "logging.plots=false")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    start, end = summary["eval_start"], summary["eval_end"]
    assert start["loss"] == pytest.approx(0.5, abs=1e-6)  # policy == reference: sigma(0) = 1/2 for every example
    assert end["loss"] < start["loss"] - 0.05
    assert end["rewards/desirable"] > end["rewards/undesirable"] and end["rewards/margin"] > 0.5
    train_losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert sum(train_losses[-3:]) < sum(train_losses[:3])
    assert any(r.get("kl", 0) > 0 for r in read_metrics(out))  # the reference point moved off zero
    assert (out / "checkpoints" / "last" / "model" / "config.json").is_file()


def test_kto_refuses_micro_batches_of_one(tiny_model, tmp_path):
    result = run_cli("run", str(REPO / "recipes" / "kto.yaml"), f"model.path={tiny_model}",
                     f"output_dir={tmp_path / 'run'}", "train.micro_batch_size=1")
    assert result.returncode == 2 and "micro_batch_size" in result.stderr and "Traceback" not in result.stderr
