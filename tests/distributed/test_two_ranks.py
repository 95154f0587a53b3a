"""ZeRO-3 over two torchrun ranks: the sync's gathers are collective, also for a rank without an engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "tests" / "workers" / "two_rank_sync.py"
LORA_SCRIPT = REPO / "tests" / "workers" / "two_rank_lora_sync.py"


def _torchrun(script: Path, tiny_model, tmp_path) -> list[dict]:
    """Run ``script MODEL OUT`` on two torchrun ranks; each rank's JSON result."""
    out = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # the in-process world of other tests must not leak into torchrun
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script), str(tiny_model),
         str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2)]


@pytest.mark.slow
def test_two_rank_zero3_sync(tiny_model, tmp_path):
    ranks = _torchrun(SCRIPT, tiny_model, tmp_path)
    print(f"\ntwo-rank ZeRO-3 sync seconds: {[r['sync_seconds'] for r in ranks]}")
    for r in ranks:
        assert r["partitioned"], "each rank should hold only a shard"
        assert r["first_match"], f"rank {r['rank']}: engine differs from transformers after sync"
        assert r["buckets"][0] == r["buckets"][1] > 1  # same plan on every rank, engine or not
    assert ranks[0]["second_match"], "rank 0's engine differs after a sync where rank 1 had no engine"


@pytest.mark.slow
def test_two_rank_zero3_lora_adapter_sync(tiny_model, tmp_path):
    """A ZeRO-3 LoRA learner over two ranks: adapter-only syncs, a rank without an engine, a base re-send."""
    ranks = _torchrun(LORA_SCRIPT, tiny_model, tmp_path)
    print(f"\ntwo-rank ZeRO-3 LoRA sync seconds: {[r['sync_seconds'] for r in ranks]}")
    for r in ranks:
        assert r["partitioned"], "each rank should hold only a shard"
        assert r["modes"] == ["adapter"] * 3
        first, second, third = r["base_bytes"]
        assert first > 0 and second == 0 and third == first  # the base again after rank 0's merged sync
        assert r["bytes"][1] < first / 5  # the adapter alone is a small part of the first sync
    assert ranks[0]["matches"] == [True, True, True], "rank 0's engine differs from transformers + PEFT"
    assert ranks[1]["matches"] == [True, None, None]
