"""Shared fixtures: a tiny local model and the synthetic arithmetic task, built once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from posttrain.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def arithmetic_data(tmp_path_factory) -> dict[str, Path]:
    from posttrain.data.synthetic import write_task

    return write_task("arithmetic", tmp_path_factory.mktemp("data"), train=400, test=40, seed=0)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``posttrain ARGS`` as a user would, in a fresh interpreter."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "posttrain.cli.main", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_same_gradients(ours, theirs, *, rtol: float = 1e-5) -> None:
    """Every parameter of module ``ours`` has the gradient of the same-named one of ``theirs``: elementwise
    ``rtol``, plus an atol at 1e-5 of the tensor's scale for entries near zero (float summation order); and
    every parameter but (at most) unused embedding rows got one."""
    import torch

    named = dict(theirs.named_parameters())
    compared = 0
    for name, param in ours.named_parameters():
        expected = named[name].grad
        torch.testing.assert_close(param.grad, expected, rtol=rtol, atol=1e-5 * expected.abs().max().item(),
                                   msg=lambda detail, name=name: f"{name}: {detail}")
        compared += param.grad.abs().sum().item() > 0
    assert compared >= len(named) - 1
