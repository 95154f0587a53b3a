"""Worker of ``scripts/bench.py tp-sync``: weight sync from a ZeRO-3 learner into TP=1 replicas or one TP=2 engine.

Run under torchrun with 2 processes: the learner is DeepSpeed ZeRO-3 over both ranks; with ``--tp 1`` each
rank hosts a full vLLM replica, with ``--tp 2`` the two ranks host the two shards of one engine. After a
warm-up sync, ``--rounds`` syncs are timed; each rank writes ``OUT.<rank>`` (JSON): median seconds, bucket
count, the largest bucket, the measured peak growth of the sync and the engine's parameter count on that rank.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--tp", type=int, choices=(1, 2), required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bucket-mb", type=int, default=32)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.config.schema import LearnerConfig
    from posttrain.distributed import init_distributed
    from posttrain.learner.engine import build_learner
    from posttrain.rollout import RolloutConfig, RolloutEngine, sync_weights

    info = init_distributed()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    learner = build_learner(model, LearnerConfig(zero_stage=3, lr=1e-4, scheduler="constant"),
                            world_size=info.world_size, micro_batch_size=1, grad_accum=1, total_steps=1)
    engine = RolloutEngine(args.model, RolloutConfig(enforce_eager=True, max_model_len=128, max_num_seqs=4,
                                                     tensor_parallel_size=args.tp))
    engine_parameters = engine.held_parameters()
    stats = [sync_weights(engine, learner, bucket_bytes=args.bucket_mb * 2**20) for _ in range(args.rounds + 1)]
    engine.close()
    timed = stats[1:]
    measured = [s.measured_peak_bytes for s in timed if s.measured_peak_bytes is not None]
    result = {"rank": info.rank, "tp": args.tp, "seconds": statistics.median(s.seconds for s in timed),
              "gather_seconds": statistics.median(s.gather_seconds for s in timed), "num_buckets": timed[0].num_buckets,
              "peak_bucket_bytes": timed[0].peak_bucket_bytes, "model_bytes": timed[0].bytes,
              "measured_peak_bytes": max(measured) if measured else None, "memory_source": timed[0].memory_source,
              "engine_parameters": engine_parameters}
    Path(f"{args.out}.{info.rank}").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
