"""Benchmarks against the reference implementations, side by side in one run.

    python scripts/bench.py dpo [--steps 8] [--repeats 3] [--batch 8] [--hidden 256] [--layers 4]
    python scripts/bench.py grpo [--steps 4] [--repeats 3] [--prompts 8] [--n 8] [--max-tokens 128] [--threads N]
    python scripts/bench.py lora-sync [--sizes tiny 512x8] [--rank 16] [--syncs 5] [--repeats 2]
    python scripts/bench.py scale [--steps 3] [--repeats 1]

Each subcommand measures one thing, prints a table, and merges its section into
``bench/results.json`` (other sections are kept). Every side runs in its own
fresh interpreter (``--worker``), the sides alternate ``--repeats`` times so
that load from other processes on the machine hits both alike, and the median
of each side is reported.

Subcommands:
  dpo   tokens/s of posttrain's DPO trainer against TRL's DPOTrainer: same model,
        data, batch, fp32, both with a live reference model. Tokens are the
        non-pad tokens of the chosen and rejected sequences (prompt included)
        of the timed steps; a step is forward + backward + optimizer step; the
        first (warm-up) step and all setup are excluded.
  grpo  samples/s of posttrain's GRPO step (generate + reward + update + sync) against TRL's
        GRPOTrainer (HF generate and vLLM colocate); our rollout against a bare vLLM generate;
        the weight sync's share of the step (docs/benchmarks.md).
  lora-sync
        weight sync of a PEFT LoRA learner into the rollout engine, adapter only
        (rollout.lora_sync=adapter: vLLM's LoRA kernels serve the factors) against
        merged (the adapter merged into full weights, all streamed): seconds and
        bytes per sync, the first adapter sync (which also sends the base), and
        what each engine then generates per second. Every sync's result is checked
        against transformers + PEFT greedy output.
  scale GRPO step time and samples/s for 1 vs 2 processes, colocated and
        disaggregated, sync and one-step async (each a ``posttrain run``; medians
        of the per-step timings after a warm-up step); weight-sync seconds and
        peak extra memory for models of about 1M, 10M and 100M parameters.
  tp-sync
        weight sync from a ZeRO-3 learner on 2 processes into two TP=1 replicas
        against one TP=2 engine (scripts/bench_tp_sync.py under torchrun), for
        about 1M, 10M and 100M parameters: seconds and peak growth per rank.

Adding a benchmark: write a module ``scripts/benchmarks/NAME.py`` with
``bench_NAME(args) -> dict`` (and a ``worker_NAME`` if it needs clean processes),
register it in ``COMMANDS`` and give it a subparser in ``main``. Shared plumbing
(results file, workers, timing, load) is in ``benchmarks/common.py``, figures in
``benchmarks/plots.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ``benchmarks`` also when this file is loaded by path

from benchmarks.common import REPO, RESULTS, merge_results  # noqa: E402
from benchmarks.dpo import bench_dpo, print_dpo, worker_dpo  # noqa: E402
from benchmarks.grpo import GRPO_SIDES, bench_grpo, print_grpo, worker_grpo  # noqa: E402
from benchmarks.lora_sync import LORA_MODES, LORA_SIZES, bench_lora_sync, print_lora_sync, worker_lora_sync  # noqa: E402
from benchmarks.scale import SCALE_PLOT, SYNC_SIZES, bench_scale, print_scale, worker_scale  # noqa: E402
from benchmarks.tp_sync import TP_SYNC_PLOT, bench_tp_sync, print_tp_sync  # noqa: E402

COMMANDS = {
    # name: (benchmark, worker or None, printer)
    "dpo": (bench_dpo, worker_dpo, print_dpo),
    "grpo": (bench_grpo, worker_grpo, print_grpo),
    "lora-sync": (bench_lora_sync, worker_lora_sync, print_lora_sync),
    "scale": (bench_scale, worker_scale, print_scale),
    "tp-sync": (bench_tp_sync, None, print_tp_sync),
}


def add_rollout_batch_args(parser: argparse.ArgumentParser, *, steps: int, repeats: int, repeats_help: str,
                           max_tokens: int = 32) -> None:
    """The options every GRPO-step benchmark shares: how long it runs and the rollout batch it times."""
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help="longest completion")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    dpo = sub.add_parser("dpo", help="DPO tokens/s against TRL's DPOTrainer")
    dpo.add_argument("--steps", type=int, default=8, help="timed steps per run (after one warm-up step)")
    dpo.add_argument("--repeats", type=int, default=3, help="runs per side, alternating")
    dpo.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    dpo.add_argument("--hidden", type=int, default=256)
    dpo.add_argument("--layers", type=int, default=4)
    dpo.add_argument("--max-length", type=int, default=128)
    dpo.add_argument("--data", default=str(REPO / "examples" / "data" / "preference" / "train.jsonl"))
    dpo.add_argument("--seed", type=int, default=0)
    dpo.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads on each side (OMP_NUM_THREADS)")
    dpo.add_argument("--model", help=argparse.SUPPRESS)
    dpo.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    grpo = sub.add_parser("grpo", help="GRPO samples/s against TRL's GRPOTrainer; rollout and sync overheads")
    add_rollout_batch_args(grpo, steps=4, repeats=3, repeats_help="runs per side, alternating", max_tokens=128)
    grpo.add_argument("--hidden", type=int, default=256)
    grpo.add_argument("--layers", type=int, default=4)
    grpo.add_argument("--eager", action="store_true", help="our engine without torch.compile (TRL's colocate engine always compiles)")
    grpo.add_argument("--no-trl-vllm", dest="trl_vllm", action="store_false",
                      help="skip TRL with use_vllm=True, vllm_mode='colocate'")
    grpo.add_argument("--no-warm-start", dest="warm_start", action="store_false",
                      help="time the random tiny model (its completions almost always run to --max-tokens) instead "
                           "of the model after one SFT pass, whose completions end at varied lengths")
    grpo.add_argument("--no-padding-free", dest="padding_free", action="store_false",
                      help="our learner pads every sequence to the longest (grpo.padding_free=false), as TRL does")
    grpo.add_argument("--seed", type=int, default=0)
    grpo.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads on each side (OMP_NUM_THREADS)")
    grpo.add_argument("--model", help=argparse.SUPPRESS)
    grpo.add_argument("--data", help=argparse.SUPPRESS)
    grpo.add_argument("--worker", choices=GRPO_SIDES, help=argparse.SUPPRESS)
    lora = sub.add_parser("lora-sync", help="LoRA weight sync: adapter only against merged full weights")
    lora.add_argument("--sizes", nargs="+", default=list(LORA_SIZES), choices=list(LORA_SIZES))
    lora.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    lora.add_argument("--syncs", type=int, default=5, help="timed syncs per run (after the first)")
    lora.add_argument("--repeats", type=int, default=2, help="runs per mode, alternating")
    lora.add_argument("--max-tokens", type=int, default=32, help="longest completion in the generation timing")
    lora.add_argument("--seed", type=int, default=0)
    lora.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (OMP_NUM_THREADS)")
    lora.add_argument("--model", help=argparse.SUPPRESS)
    lora.add_argument("--worker", choices=LORA_MODES, help=argparse.SUPPRESS)
    scale = sub.add_parser("scale", help="step time over processes, placements and schedules; sync cost over model sizes")
    add_rollout_batch_args(scale, steps=3, repeats=1, repeats_help="runs per setup, alternating order")
    scale.add_argument("--micro-batch", type=int, default=16, help="sequences per micro-batch and rank")
    scale.add_argument("--hidden", type=int, default=256, help="model of the step-time runs")
    scale.add_argument("--layers", type=int, default=4)
    scale.add_argument("--sizes", type=int, default=len(SYNC_SIZES), help="how many sync model sizes (about 1M, 10M, 100M)")
    scale.add_argument("--bucket-mb", type=int, default=32, help="weight-sync bucket size")
    scale.add_argument("--rounds", type=int, default=3, help="timed syncs per model size (after a warm-up one)")
    scale.add_argument("--threads", type=int, default=0,
                       help="torch threads per process (OMP_NUM_THREADS); 0: cores / processes")
    scale.add_argument("--plot", default=str(SCALE_PLOT), help="PNG of the figures")
    scale.add_argument("--seed", type=int, default=0)
    scale.add_argument("--worker", choices=("sync",), help=argparse.SUPPRESS)
    tp_sync = sub.add_parser("tp-sync", help="weight sync from ZeRO-3 into TP=1 replicas vs one TP=2 engine")
    tp_sync.add_argument("--sizes", type=int, default=len(SYNC_SIZES), help="how many model sizes (about 1M, 10M, 100M)")
    tp_sync.add_argument("--bucket-mb", type=int, default=32, help="weight-sync bucket size")
    tp_sync.add_argument("--rounds", type=int, default=3, help="timed syncs per run (after a warm-up one)")
    tp_sync.add_argument("--repeats", type=int, default=1, help="runs per layout, alternating order")
    tp_sync.add_argument("--plot", default=str(TP_SYNC_PLOT), help="PNG of the figures")
    for p in (dpo, grpo, lora, scale, tp_sync):
        p.add_argument("--output", default=str(RESULTS), help="results file (sections are merged)")
    args = parser.parse_args(argv)
    bench, worker, show = COMMANDS[args.command]
    if getattr(args, "worker", None):
        print(json.dumps(worker(args)))
        return 0
    result = bench(args)
    show(result)
    print(f"\nwrote section {args.command!r} of {merge_results(args.command, result, Path(args.output))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
