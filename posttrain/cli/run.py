"""``posttrain run``: validate a recipe, then run it in-process or under torchrun."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

from posttrain.errors import UserError
from posttrain.rollout.cpu_shm import remove_orphaned as remove_orphaned_shm

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                      "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
# How often torchrun looks for dead workers. Its default (0.1 s) stops the survivors before they can say
# what went wrong: rank 0 needs a moment to notice a dead rollout rank and name it and the last checkpoint.
MONITOR_INTERVAL_S = 3


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a recipe (YAML) with optional key.sub=value overrides",
        description=(
            "Run a recipe. Overrides use dotted keys (learner.zero_stage=3 train.max_steps=50). "
            "With --nproc N > 1 (or --nnodes M > 1) the recipe runs under torchrun, one process per rank; "
            "the recipe, its data and the model path are checked first, so mistakes are reported before "
            "any process starts."
        ),
        epilog="example: posttrain run recipes/sft.yaml --nproc 2 learner.zero_stage=3",
    )
    parser.add_argument("recipe", help="path of a recipe YAML file (see `posttrain recipes`)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    parser.add_argument("--nproc", type=int, default=1, help="processes per node (torchrun --nproc_per_node)")
    parser.add_argument("--nnodes", type=int, default=1, help="number of nodes (torchrun --nnodes)")
    parser.add_argument("--node-rank", type=int, default=0, help="this node's rank (multi-node)")
    parser.add_argument("--master-addr", default="127.0.0.1", help="rendezvous address of node 0 (multi-node)")
    parser.add_argument("--master-port", type=int, default=29500, help="rendezvous port (multi-node)")
    parser.add_argument("--check", action="store_true", help="validate the recipe and its data, then stop")
    parser.set_defaults(func=run, accepts_overrides=True)


def run(args: argparse.Namespace) -> int:
    from posttrain.distributed import configure_environment

    configure_environment()
    from posttrain.config.loader import load_recipe
    from posttrain.trainers import trainer_module

    if args.nproc < 1 or args.nnodes < 1:
        raise UserError(f"--nproc and --nnodes must be at least 1, got {args.nproc} and {args.nnodes}.")
    cfg = load_recipe(args.recipe, args.overrides)
    world_size = args.nproc * args.nnodes
    details = trainer_module(cfg.trainer).preflight(cfg, world_size, args.recipe)
    if args.check:
        print(f"{args.recipe}: recipe and data are valid for {world_size} process(es)."
              + (f" {details}." if details else ""))
        return 0
    # `posttrain run` is the launcher: rendezvous variables inherited from a parent process or a stale
    # shell (RANK, MASTER_PORT, ...) would point this run at someone else's process group.
    for name in LAUNCHER_VARIABLES:
        os.environ.pop(name, None)
    if world_size == 1:
        from posttrain.run import run_recipe

        run_recipe(args.recipe, args.overrides)
        return 0
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
               f"--monitor-interval={MONITOR_INTERVAL_S}"]
    if args.nnodes == 1:
        command.append("--standalone")
    else:
        command += [f"--nnodes={args.nnodes}", f"--node_rank={args.node_rank}",
                    f"--master_addr={args.master_addr}", f"--master_port={args.master_port}"]
    command += ["-m", "posttrain.run", args.recipe, *args.overrides]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    remove_orphaned_shm()  # left by an earlier run's killed tensor-parallel shard, it would stop this one
    returncode, reported, killed = _supervise(command, env)
    remove_orphaned_shm()
    if returncode != 0 and not reported:
        # Nobody said what went wrong: a worker died before any rank could name it (e.g. a shard of a
        # tensor-parallel engine whose partner was left waiting inside vLLM), so say it here, in one line.
        from pathlib import Path

        from posttrain.checkpoint import list_complete

        complete = list_complete(Path(cfg.output_dir) / "checkpoints")
        where = (f"the last intact checkpoint is {complete[-1]} (continue with resume=auto)" if complete
                 else "the run stopped before its first checkpoint")
        who = (f"rank {args.node_rank * args.nproc + killed[1]} died (exit code {killed[0]})" if killed
               else f"the run failed with exit status {returncode}")
        print(f"error: {who}; {where}. See the messages above.", file=sys.stderr)
    return returncode


_WORKER_FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)")


def _supervise(command: list[str], env: dict) -> tuple[int, bool, tuple[int, int] | None]:
    """Run torchrun, passing its stderr through unchanged (progress bars included) while watching it for a
    posttrain error line and torchrun's note of the first worker that failed: (exit status, whether an
    ``error:`` line was printed, (exit code, local rank) of that worker or None)."""
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    seen = b""
    reported = False
    while chunk := os.read(process.stderr.fileno(), 65536):
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        seen = (seen + chunk)[-200_000:]
        reported = reported or b"\nerror: " in b"\n" + seen
    returncode = process.wait()
    found = _WORKER_FAILED.search(seen.decode(errors="replace"))
    return returncode, reported, (int(found.group(1)), int(found.group(2))) if found else None
