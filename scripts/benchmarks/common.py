"""Shared by every benchmark: the results file, fresh worker interpreters, timing and machine load."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results.json"


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def merge_results(section: str, values: dict, path: Path = RESULTS) -> Path:
    """Write ``values`` as ``section`` of the results file, keeping every other section."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[section] = values
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


def run_worker(command: str, *args: str, threads: int | None = None) -> dict:
    """Run ``bench.py COMMAND --worker ...`` in a fresh interpreter; its last stdout line is JSON."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), command, *args],
                          capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"worker {command} {args} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def throughput(step_seconds: list[float], step_tokens: list[int], warmup: int) -> dict:
    seconds, tokens = sum(step_seconds[warmup:]), sum(step_tokens[warmup:])
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens,
            "steps": len(step_seconds) - warmup}


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded: recorded before and after a run, to tell a quiet machine."""
    return [round(x, 2) for x in os.getloadavg()]


def median(values: list[dict], key: str) -> float:
    return statistics.median(v[key] for v in values)
