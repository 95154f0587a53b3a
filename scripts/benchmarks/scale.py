"""scale: GRPO step time over processes, placements and schedules; weight-sync cost over model sizes."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import REPO, load_average, machine, run_worker
from .grpo import GRPO_LR
from .plots import plot_scale

SCALE_RUNS = (
    ("1 process", 1, "colocated", "sync"),
    ("2 colocated", 2, "colocated", "sync"),
    ("2 disaggregated", 2, "disaggregated", "sync"),
    ("2 disaggregated async", 2, "disaggregated", "one_step_async"),
)
SYNC_SIZES = ((128, 3), (320, 6), (768, 10))  # (hidden, layers): about 1M, 10M and 100M parameters
SCALE_PLOT = REPO / "docs" / "img" / "scale.png"


def _scale_overrides(args: argparse.Namespace, model: Path, data: Path, out: Path, placement: str,
                     schedule: str) -> list[str]:
    batch = args.prompts * args.n
    return [f"model.path={model}", f"data.path={data}", "data.eval_path=null", "data.eval_fraction=0",
            f"output_dir={out}", f"train.max_steps={args.steps + 1}", f"grpo.prompts_per_step={args.prompts}",
            f"rollout.n={args.n}", f"rollout.max_tokens={args.max_tokens}", "rollout.temperature=1.0",
            "rollout.enforce_eager=true", f"rollout.placement={placement}", f"rollout.schedule={schedule}",
            f"train.global_batch_size={batch}", f"train.micro_batch_size={args.micro_batch}",
            f"learner.lr={GRPO_LR}", "learner.scheduler=constant", "grpo.rewards=[{name: math_verify}]",
            "grpo.eval_prompts=0", "logging.progress=false", "logging.tensorboard=false", "logging.plots=false",
            "checkpoint.every_n_steps=0", "checkpoint.save_final=false", f"seed={args.seed}"]


def _scale_run(args: argparse.Namespace, model: Path, data: Path, tmp: Path, processes: int, placement: str,
               schedule: str) -> dict:
    """One ``posttrain run`` of GRPO; the medians of its per-step timings after the warm-up step."""
    out = tmp / f"run-{processes}-{placement}-{schedule}-{time.monotonic_ns()}"
    threads = args.threads or max(1, (os.cpu_count() or 1) // processes)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "posttrain.cli.main", "run", str(REPO / "recipes" / "grpo.yaml"),
               "--nproc", str(processes), *_scale_overrides(args, model, data, out, placement, schedule)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"scale run {processes} {placement} {schedule} failed:\n{done.stderr[-4000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = [r for r in records if "time/step_s" in r][1:]  # step 1: warm caches, and async has nothing ahead
    step_s = statistics.median(r["time/step_s"] for r in timed)
    return {"step_s": step_s, "samples_per_s": args.prompts * args.n / step_s,
            **{key: statistics.median(r.get(f"time/{key}_s", 0.0) for r in timed)
               for key in ("generate", "train", "sync", "generate_wait")},
            "staleness": max(r.get("staleness", 0.0) for r in timed), "threads": threads}


def worker_scale(args: argparse.Namespace) -> dict:
    """Weight-sync cost for one model size: a fresh engine and learner module in this process, ``--rounds``
    syncs after a warm-up one; median seconds, largest bucket and measured peak growth."""
    from transformers import AutoModelForCausalLM

    from posttrain.models.tiny import make_tiny_model
    from posttrain.rollout import RolloutConfig, RolloutEngine, sync_weights

    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model(Path(tmp) / "model", hidden_size=args.hidden, num_layers=args.layers,
                               num_heads=args.hidden // 64, seed=0)
        params = json.loads((path / "posttrain_tiny.json").read_text())["parameters"]
        engine = RolloutEngine(path, RolloutConfig(enforce_eager=True, max_model_len=128, max_num_seqs=4))
        module = AutoModelForCausalLM.from_pretrained(path)
        try:
            stats = [sync_weights(engine, module, bucket_bytes=args.bucket_mb * 2**20) for _ in range(args.rounds + 1)]
        finally:
            engine.close()
    timed = stats[1:]
    measured = [s.measured_peak_bytes for s in timed if s.measured_peak_bytes is not None]
    return {"parameters": params, "model_bytes": timed[0].bytes, "seconds": statistics.median(s.seconds for s in timed),
            "peak_bucket_bytes": timed[0].peak_bucket_bytes, "num_buckets": timed[0].num_buckets,
            "measured_peak_bytes": max(measured) if measured else None, "memory_source": timed[0].memory_source}


def bench_scale(args: argparse.Namespace) -> dict:
    from posttrain.data.synthetic import write_task
    from posttrain.models.tiny import make_tiny_model

    load_at_start = load_average()
    runs: dict[str, list[dict]] = {label: [] for label, *_ in SCALE_RUNS}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        model = make_tiny_model(tmp / "model", hidden_size=args.hidden, num_layers=args.layers,
                                num_heads=args.hidden // 64, seed=0)
        data = write_task("arithmetic", tmp / "data", train=max(200, args.prompts * (args.steps + 1)), test=0,
                          seed=args.seed)["train"]
        for repeat in range(args.repeats):
            for label, processes, placement, schedule in SCALE_RUNS if repeat % 2 == 0 else SCALE_RUNS[::-1]:
                runs[label].append(_scale_run(args, model, data, tmp, processes, placement, schedule))
                print(f"  repeat {repeat + 1}/{args.repeats} {label:>24}: {runs[label][-1]['step_s']:.2f} s/step",
                      flush=True)
    sync = []
    for hidden, layers in SYNC_SIZES[: args.sizes]:
        sync.append(run_worker("scale", "--worker", "sync", "--hidden", str(hidden), "--layers", str(layers),
                               "--bucket-mb", str(args.bucket_mb), "--rounds", str(args.rounds)))
        print(f"  sync {sync[-1]['parameters'] / 1e6:6.1f}M parameters: {sync[-1]['seconds']:.3f} s", flush=True)
    result = scale_result(args, runs, sync, load_at_start + load_average())
    plot_scale(result, Path(args.plot))
    result["plot"] = os.path.relpath(args.plot, REPO)
    return result


def scale_result(args: argparse.Namespace, runs: dict[str, list[dict]], sync: list[dict], load: list[float]) -> dict:
    """The ``scale`` section: per setup the medians over repeats and the speed-up over one process; the sync
    figures per model size."""
    setups = {}
    for label, processes, placement, schedule in SCALE_RUNS:
        if not runs.get(label):
            continue
        setups[label] = {"processes": processes, "placement": placement, "schedule": schedule,
                         **{key: statistics.median(r[key] for r in runs[label]) for key in runs[label][0]},
                         "runs_step_s": [round(r["step_s"], 4) for r in runs[label]]}
    base = setups.get(SCALE_RUNS[0][0])
    for values in setups.values():
        values["speedup"] = base["step_s"] / values["step_s"] if base else None
    return {"machine": machine(), "load_average": {"start": load[:3], "end": load[3:]},
            "settings": {"prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens, "steps": args.steps,
                         "repeats": args.repeats, "hidden": args.hidden, "layers": args.layers,
                         "micro_batch": args.micro_batch, "bucket_mb": args.bucket_mb,
                         "threads": args.threads or "cores / processes"},
            "setups": setups, "sync": sync}


def print_scale(result: dict) -> None:
    print(f"\n{'setup':<24} {'step s':>8} {'samples/s':>10} {'speed-up':>9} {'gen s':>7} {'train s':>8} "
          f"{'sync s':>7} {'wait s':>7} {'stale':>6}")
    for label, v in result["setups"].items():
        print(f"{label:<24} {v['step_s']:8.2f} {v['samples_per_s']:10.1f} {v['speedup']:8.2f}x {v['generate']:7.2f} "
              f"{v['train']:8.2f} {v['sync']:7.3f} {v['generate_wait']:7.2f} {v['staleness']:6.0f}")
    print(f"\n{'parameters':>12} {'model MiB':>10} {'sync s':>8} {'buckets':>8} {'largest bucket MiB':>19} "
          f"{'peak extra MiB':>15}")
    for s in result["sync"]:
        peak = "n/a" if s["measured_peak_bytes"] is None else f"{s['measured_peak_bytes'] / 2**20:.1f}"
        print(f"{s['parameters']:>12,} {s['model_bytes'] / 2**20:10.1f} {s['seconds']:8.3f} {s['num_buckets']:8d} "
              f"{s['peak_bucket_bytes'] / 2**20:19.1f} {peak:>15}")
    print(f"load average {result['load_average']}")
