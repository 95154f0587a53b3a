"""Two-rank ZeRO-3 weight sync under torchrun (run by test_two_ranks.py).

Both ranks host an engine (vLLM builds its groups collectively over the
existing world, so in a torchrun world every rank must create one). Step 1:
both ranks sync and check their engine against transformers. Step 2: after
another optimizer step only rank 0 loads (rank 1 passes ``engine=None``) and
still takes part in every ZeRO-3 gather.

Usage: torchrun --nproc_per_node 2 two_rank_sync.py MODEL_DIR OUT_JSON
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _greedy_hf(model, ids: list[int], max_new_tokens: int) -> list[int]:
    import torch

    x = torch.tensor([ids])
    with torch.no_grad():
        return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                              do_sample=False)[0, x.shape[1]:].tolist()


def _reference(model_dir: str, learner):
    """A plain transformers copy of the learner's current (gathered) weights; collective."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.workers.gathered import gathered_state

    state = gathered_state(learner)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.load_state_dict(state)
    return model


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.config.schema import LearnerConfig
    from posttrain.distributed import init_distributed
    from posttrain.learner.engine import build_learner
    from posttrain.rollout import RolloutConfig, RolloutEngine, sync_weights

    model_dir, out_path = sys.argv[1], sys.argv[2]
    info = init_distributed()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    learner = build_learner(model, LearnerConfig(zero_stage=3, lr=1e-2, scheduler="constant"),
                            world_size=info.world_size, micro_batch_size=1, grad_accum=1, total_steps=4)
    engine = RolloutEngine(model_dir, RolloutConfig(enforce_eager=True, max_model_len=256, max_num_seqs=4,
                                                    max_tokens=12))
    prompts = ["The answer is", [{"role": "user", "content": "Reverse hello"}]]

    def step(seed: int) -> None:
        batch = torch.randint(5, 900, (1, 24), generator=torch.Generator().manual_seed(seed + info.rank))
        learner.backward(learner(input_ids=batch, labels=batch).loss)
        learner.step()

    def check(reference) -> bool:
        got = [s.completion_ids for s in engine.generate(prompts, temperature=0.0)]
        return got == [_greedy_hf(reference, engine.tokenize(p), 12) for p in prompts]

    step(0)
    partitioned = all(p.numel() < p.ds_numel for p in learner.module.parameters() if p.ds_numel > 1)
    both = sync_weights(engine, learner, bucket_bytes=100 * 1024)
    reference = _reference(model_dir, learner)
    first = check(reference)

    step(10)
    only_rank0 = sync_weights(engine if info.rank == 0 else None, learner, bucket_bytes=100 * 1024)
    reference = _reference(model_dir, learner)
    second = check(reference) if info.rank == 0 else None
    result = {"rank": info.rank, "partitioned": partitioned, "first_match": first, "second_match": second,
              "buckets": [both.num_buckets, only_rank0.num_buckets], "sync_seconds": [both.seconds, only_rank0.seconds]}
    with open(f"{out_path}.{info.rank}", "w") as f:
        json.dump(result, f)
    engine.close()


if __name__ == "__main__":
    main()
