"""Two-rank ZeRO-3 LoRA learner, adapter-only sync under torchrun (run by test_two_ranks.py).

Both ranks host an engine with vLLM's LoRA support. After each optimizer step:
1. both ranks sync (the first adapter sync also sends the base) and check their engine;
2. rank 1 passes ``engine=None`` (and says which mode the engine ranks use) and
   still joins every gather; rank 0 checks its engine;
3. a merged sync replaces rank 0's base, so the next adapter sync must send the
   base again: rank 1, without an engine, must join that gather too.
Every check: greedy vLLM output equals transformers + PEFT on the gathered weights.

Usage: torchrun --nproc_per_node 2 two_rank_lora_sync.py MODEL_DIR OUT_JSON
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

PROMPTS = ["The answer is", [{"role": "user", "content": "Reverse hello"}]]
MAX_TOKENS = 12


def _peft(model_dir: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)  # the same random (non-zero) adapter on every rank
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), cfg)


def _reference(model_dir: str, learner):
    """A transformers + PEFT copy of the learner's current (gathered) weights; collective."""
    from tests.workers.gathered import gathered_state

    state = gathered_state(learner)
    model = _peft(model_dir).eval()
    model.load_state_dict(state)
    return model


def _greedy_hf(model, ids: list[int]) -> list[int]:
    import torch

    x = torch.tensor([ids])
    with torch.no_grad():
        return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_TOKENS,
                              do_sample=False)[0, x.shape[1]:].tolist()


def main() -> None:
    import torch

    from posttrain.config.schema import LearnerConfig
    from posttrain.distributed import init_distributed
    from posttrain.learner.engine import build_learner
    from posttrain.rollout import RolloutConfig, RolloutEngine, sync_weights

    model_dir, out_path = sys.argv[1], sys.argv[2]
    info = init_distributed()
    learner = build_learner(_peft(model_dir).train(), LearnerConfig(zero_stage=3, lr=5e-2, scheduler="constant"),
                            world_size=info.world_size, micro_batch_size=1, grad_accum=1, total_steps=8)
    engine = RolloutEngine(model_dir, RolloutConfig(enforce_eager=True, max_model_len=256, max_num_seqs=4,
                                                    max_tokens=MAX_TOKENS, lora_sync="adapter"), lora_rank=4)

    def step(seed: int) -> None:
        batch = torch.randint(5, 900, (1, 24), generator=torch.Generator().manual_seed(seed + info.rank))
        learner.backward(learner(input_ids=batch, labels=batch).loss)
        learner.step()

    def check(synced) -> bool | None:
        """Whether the engine that was synced (None: this rank's was not) matches the learner."""
        reference = _reference(model_dir, learner)  # collective: every rank builds it
        if synced is None:
            return None
        got = [s.completion_ids for s in synced.generate(PROMPTS, temperature=0.0)]
        return got == [_greedy_hf(reference, synced.tokenize(p)) for p in PROMPTS]

    partitioned = all(p.numel() < p.ds_numel for p in learner.module.parameters() if p.ds_numel > 1)
    mine = engine if info.rank == 0 else None
    stats, matches = [], []
    step(0)
    stats.append(sync_weights(engine, learner, bucket_bytes=100 * 1024))  # 1. both ranks, base + adapter
    matches.append(check(engine))
    step(10)
    stats.append(sync_weights(mine, learner, bucket_bytes=100 * 1024, lora_sync="adapter"))  # 2. adapter only
    matches.append(check(mine))
    step(20)
    sync_weights(mine, learner, bucket_bytes=100 * 1024, lora_sync="merged")  # 3. rank 0's base is now merged
    stats.append(sync_weights(mine, learner, bucket_bytes=100 * 1024, lora_sync="adapter"))  # base again
    matches.append(check(mine))
    result = {"rank": info.rank, "partitioned": partitioned, "matches": matches,
              "modes": [s.mode for s in stats], "base_bytes": [s.base_bytes for s in stats],
              "bytes": [s.bytes for s in stats], "sync_seconds": [s.seconds for s in stats]}
    with open(f"{out_path}.{info.rank}", "w") as f:
        json.dump(result, f)
    engine.close()


if __name__ == "__main__":
    main()
