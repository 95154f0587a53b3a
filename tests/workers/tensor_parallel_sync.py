"""Weight sync into a tensor-parallel engine: two torchrun ranks, each a learner rank and one of the two
shards of one vLLM engine (run by test_tensor_parallel.py).

The learner is DeepSpeed ZeRO-``--zero`` over both ranks (``--lora``: a PEFT LoRA model whose adapter is
merged into the stream; ``--adapter``: the same, but only the adapter is sent and vLLM's LoRA layers
slice it per shard). Three rounds of: an optimizer step, a sync in 100 KiB buckets, greedy generation
through the ``GenerationGroup`` (rank 0 asks two prompts, rank 1 one other, so the group's union and split
are exercised), compared token for token with transformers' greedy decoding of the learner's weights.

Usage: torchrun --nproc_per_node 2 tensor_parallel_sync.py MODEL_DIR OUT_JSON --zero N [--lora | --adapter]
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main() -> None:
    import torch

    from posttrain.config.schema import LearnerConfig
    from posttrain.distributed import init_distributed
    from posttrain.learner.engine import build_learner
    from posttrain.rollout import RolloutConfig, RolloutEngine, sync_weights
    from posttrain.rollout.groups import GenerationGroup
    from posttrain.rollout.layout import Layout
    from tests.workers.disaggregated_sync import _copy, _greedy_hf, _model

    model_dir, out_path = sys.argv[1], sys.argv[2]
    zero = int(sys.argv[sys.argv.index("--zero") + 1])
    lora = "--lora" in sys.argv[3:] or "--adapter" in sys.argv[3:]
    lora_sync = "adapter" if "--adapter" in sys.argv[3:] else "merged"
    info = init_distributed()
    learner = build_learner(_model(model_dir, lora), LearnerConfig(zero_stage=zero, lr=1e-2, scheduler="constant"),
                            world_size=info.world_size, micro_batch_size=1, grad_accum=1, total_steps=4)
    cfg = RolloutConfig(enforce_eager=True, max_model_len=256, max_num_seqs=4, max_tokens=12, tensor_parallel_size=2,
                        lora_sync=lora_sync)
    shard = RolloutEngine(model_dir, cfg, **({"lora_rank": 4} if lora_sync == "adapter" else {}))
    group = GenerationGroup(shard, Layout(info.world_size, 2), info.rank)
    prompts = [["The answer is", [{"role": "user", "content": "Reverse hello"}]], ["12 + 30 ="]][info.rank]
    rounds = []
    for round_ in range(3):
        batch = torch.randint(5, 900, (1, 24), generator=torch.Generator().manual_seed(round_ * 10 + info.rank))
        learner.backward(learner(input_ids=batch, labels=batch).loss)
        learner.step()
        stats = sync_weights(group, learner, bucket_bytes=100 * 1024)
        samples = group.generate(prompts, temperature=0.0).samples
        reference = _copy(model_dir, learner, lora)  # collective under ZeRO-3
        expected = [_greedy_hf(reference, s.prompt_ids, len(s.completion_ids)) for s in samples]
        rounds.append({"engine": [s.completion_ids for s in samples], "learner": expected,
                       "prompt_ids": [s.prompt_ids for s in samples], "buckets": stats.num_buckets,
                       "peak_bucket_bytes": stats.peak_bucket_bytes, "measured_peak_bytes": stats.measured_peak_bytes,
                       "mode": stats.mode})
    result = {"rank": info.rank, "rounds": rounds,
              "shard_parameters": shard.held_parameters(),
              "full_parameters": sum(p.numel() for p in _model(model_dir, False).parameters())}
    shard.close()
    with open(f"{out_path}.{info.rank}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
