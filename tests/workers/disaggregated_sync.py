"""Weight sync from a learner rank to a rollout rank (run by test_disaggregated.py under torchrun, 2 ranks).

Rank 0 is the learner (DeepSpeed ZeRO-3, the learner ranks' own default group); rank 1 only serves a vLLM
engine. The learner takes one optimizer step, syncs in small buckets, and asks the rollout rank for greedy
completions, which must equal transformers' greedy decoding with the learner's weights, token for token.
With ``--lora`` the learner is a PEFT LoRA model (random non-zero adapter): the adapter is merged into the
streamed base weights (rollout ranks take merged weights), and the reference is transformers + PEFT.

Usage: torchrun --nproc_per_node 2 disaggregated_sync.py MODEL_DIR OUT_JSON [--lora]
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
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None)
    return out[0, x.shape[1]:].tolist()


def _model(model_dir: str, lora: bool):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]))


def _copy(model_dir: str, learner, lora: bool):
    """A transformers (+ PEFT) model holding the learner's current (gathered) weights."""
    from tests.workers.gathered import gathered_state

    state = gathered_state(learner)
    model = _model(model_dir, lora).eval()
    model.load_state_dict(state)
    return model


def main() -> None:
    import torch

    from posttrain.config.loader import from_dict
    from posttrain.config.schema import LearnerConfig
    from posttrain.distributed import init_distributed
    from posttrain.learner.engine import build_learner
    from posttrain.rollout import sync_weights
    from posttrain.rollout.remote import RemoteEngine, serve
    from posttrain.trainers.grpo import Config

    model_dir, out_path = sys.argv[1], sys.argv[2]
    lora = "--lora" in sys.argv[3:]
    cfg = from_dict(Config, {"trainer": "grpo", "model": {"path": model_dir}, "data": {"path": "unused.jsonl"},
                             "output_dir": os.path.dirname(out_path),
                             "rollout": {"placement": "disaggregated", "enforce_eager": True, "max_model_len": 256,
                                         "max_num_seqs": 4, "max_tokens": 12, "timeout": 120}})
    info = init_distributed(rollout_ranks=1)
    if info.role == "rollout":
        serve(cfg, info)
        return
    model = _model(model_dir, lora)
    learner = build_learner(model, LearnerConfig(zero_stage=3, lr=1e-2, scheduler="constant"),
                            world_size=info.world_size, micro_batch_size=1, grad_accum=1, total_steps=4)
    engine = RemoteEngine(info, cfg.rollout, cfg.output_dir)
    prompts = ["The answer is", [{"role": "user", "content": "Reverse hello"}], "12 + 30 ="]
    before = [s.completion_ids for s in engine.generate(prompts, temperature=0.0)]

    batch = torch.randint(5, 900, (1, 24), generator=torch.Generator().manual_seed(0))
    learner.backward(learner(input_ids=batch, labels=batch).loss)
    learner.step()
    stats = sync_weights(engine, learner, bucket_bytes=100 * 1024)
    samples = engine.generate(prompts, temperature=0.0).samples
    reference = _copy(model_dir, learner, lora)
    expected = [_greedy_hf(reference, s.prompt_ids, len(s.completion_ids)) for s in samples]
    result = {"partitioned": all(p.numel() < p.ds_numel for p in learner.module.parameters() if p.ds_numel > 1),
              "engine": [s.completion_ids for s in samples], "learner": expected, "before": before,
              "buckets": stats.num_buckets, "bytes": stats.bytes, "remote_peak_bytes": stats.remote_peak_bytes,
              "seconds": stats.seconds, "mode": stats.mode}
    engine.close()
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
