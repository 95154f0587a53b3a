"""Two "nodes" on 127.0.0.1 through torchrun's rendezvous give the one-process result."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from posttrain.distributed import free_port
from tests.conftest import REPO, read_metrics, run_cli


@pytest.mark.slow
def test_two_nodes_on_localhost_match_one_process(tiny_model, arithmetic_data, tmp_path):
    common = [f"model.path={tiny_model}", f"data.path={arithmetic_data['train']}", "train.max_steps=3",
              "train.global_batch_size=8", "train.micro_batch_size=4", "logging.progress=false",
              "logging.tensorboard=false", "logging.plots=false"]
    port = str(free_port())
    env = dict(os.environ, PYTHONPATH=str(REPO))
    nodes = [subprocess.Popen([sys.executable, "-m", "posttrain.cli.main", "run", str(REPO / "recipes/sft.yaml"),
                               "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
                               "--master-port", port, f"output_dir={tmp_path / 'two'}", *common],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    single = run_cli("run", str(REPO / "recipes/sft.yaml"), f"output_dir={tmp_path / 'one'}", *common)
    assert single.returncode == 0, single.stderr[-2000:]
    two = [r["loss"] for r in read_metrics(tmp_path / "two") if "loss" in r]
    one = [r["loss"] for r in read_metrics(tmp_path / "one") if "loss" in r]
    assert len(two) == 3 and two == pytest.approx(one, abs=1e-5)
