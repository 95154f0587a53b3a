"""tp-sync: weight sync from ZeRO-3 into two TP=1 replicas against one TP=2 engine."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import REPO, load_average
from .plots import plot_tp_sync

TP_SYNC_PLOT = REPO / "docs" / "img" / "tp_sync.png"
# (hidden, layers): about 1M, 13M and 100M parameters; an even head count (hidden / 64) so TP=2 can split heads
TP_SYNC_SIZES = ((128, 3), (384, 6), (768, 10))


def bench_tp_sync(args: argparse.Namespace) -> dict:
    """Weight sync from a ZeRO-3 learner over 2 processes into TP=1 replicas against one TP=2 engine, per model
    size (scripts/bench_tp_sync.py under torchrun): seconds and measured peak growth on each rank."""
    from posttrain.models.tiny import make_tiny_model

    load_at_start = load_average()
    rows = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        for hidden, layers in TP_SYNC_SIZES[: args.sizes]:
            model = make_tiny_model(tmp / f"model-{hidden}", hidden_size=hidden, num_layers=layers,
                                    num_heads=hidden // 64, seed=0)
            params = json.loads((model / "posttrain_tiny.json").read_text())["parameters"]
            for repeat in range(args.repeats):
                for tp in (1, 2) if repeat % 2 == 0 else (2, 1):
                    out = tmp / f"tp{tp}-{hidden}-{repeat}"
                    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
                    env.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
                               OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2)))
                    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                           "--standalone", str(REPO / "scripts" / "bench_tp_sync.py"), str(model),
                                           str(out), "--tp", str(tp), "--rounds", str(args.rounds),
                                           "--bucket-mb", str(args.bucket_mb)],
                                          capture_output=True, text=True, env=env, cwd=tmp)
                    if done.returncode != 0:
                        raise RuntimeError(f"tp-sync tp={tp} hidden={hidden} failed:\n{done.stderr[-4000:]}")
                    ranks = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2)]
                    rows.append({"parameters": params, "tp": tp, "repeat": repeat,
                                 "seconds": max(r["seconds"] for r in ranks),
                                 "peak_bytes_per_rank": [r["measured_peak_bytes"] for r in ranks],
                                 "peak_bucket_bytes": ranks[0]["peak_bucket_bytes"],
                                 "num_buckets": ranks[0]["num_buckets"], "model_bytes": ranks[0]["model_bytes"],
                                 "engine_parameters_per_rank": [r["engine_parameters"] for r in ranks],
                                 "memory_source": ranks[0]["memory_source"]})
                    print(f"  {params / 1e6:6.1f}M TP={tp}: {rows[-1]['seconds']:.3f} s", flush=True)
    sizes = []
    for params in sorted({r["parameters"] for r in rows}):
        entry = {"parameters": params}
        for tp in (1, 2):
            mine = [r for r in rows if r["parameters"] == params and r["tp"] == tp]
            entry[f"tp{tp}"] = {"seconds": statistics.median(r["seconds"] for r in mine),
                                "peak_bytes_per_rank": max(max(b or 0 for b in r["peak_bytes_per_rank"]) for r in mine),
                                "engine_parameters_per_rank": mine[0]["engine_parameters_per_rank"][0],
                                "peak_bucket_bytes": mine[0]["peak_bucket_bytes"],
                                "num_buckets": mine[0]["num_buckets"]}
        entry["tp2_over_tp1_seconds"] = entry["tp2"]["seconds"] / entry["tp1"]["seconds"]
        sizes.append(entry)
    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "bucket_mb": args.bucket_mb, "rounds": args.rounds, "repeats": args.repeats,
              "memory_source": rows[0]["memory_source"], "sizes": sizes, "runs": rows,
              "load": load_at_start + load_average()}
    plot_tp_sync(result, Path(args.plot))
    result["plot"] = os.path.relpath(args.plot, REPO)
    return result


def print_tp_sync(result: dict) -> None:
    print(f"{'params':>10} {'TP=1 s':>8} {'TP=2 s':>8} {'ratio':>6} {'TP=1 peak MiB':>14} {'TP=2 peak MiB':>14} "
          f"{'shard params':>13}")
    for s in result["sizes"]:
        print(f"{s['parameters']:>10,} {s['tp1']['seconds']:>8.3f} {s['tp2']['seconds']:>8.3f} "
              f"{s['tp2_over_tp1_seconds']:>6.2f} {s['tp1']['peak_bytes_per_rank'] / 2**20:>14.1f} "
              f"{s['tp2']['peak_bytes_per_rank'] / 2**20:>14.1f} {s['tp2']['engine_parameters_per_rank']:>13,}")
    print(f"load average before/after: {result['load']}")
