"""One short measurement for a lent GPU (run by scripts/gpu_check.sh): the learner in bf16 and the sync transport.

The device machine has CUDA torch, transformers and peft but neither vLLM nor DeepSpeed, so this measures the
parts of an online step that run there without them, on a Llama built locally from a config (no hub):

- **learner**: padding-free forward (``posttrain.learner.packing.forward_logits``), per-token log-probs,
  the PPO-clip policy loss, backward and an AdamW step, in bf16; seconds per step, tokens/s, peak memory.
- **sync transport**: ``iter_checkpoint_buckets`` over the learner (the stream a sync hands an engine), each
  bucket copied into the two shards a TP=2 engine would hold (q/k/v/gate/up split by rows, o/down by columns,
  the vocabulary by rows); GB/s, buckets, peak extra memory. Plus pinned host -> device bandwidth, the bound of
  a disaggregated sync staged through the host.

Usage: python scripts/gpu_check.py [--size 1b|tiny] [--device cuda|cpu] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {  # about 1.1B parameters (TinyLlama's shape), and a seconds-long CPU smoke size
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, vocab_size=1024),
}
ROW_SPLIT = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head")
COLUMN_SPLIT = ("o_proj", "down_proj")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else 0


def build_model(size: str, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SIZES[size], max_position_embeddings=4096, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    return model


def measure_learner(model, device: torch.device, *, rows: int, length: int, steps: int) -> dict:
    from posttrain.algorithms import compute_policy_loss
    from posttrain.learner.logprobs import token_logprobs
    from posttrain.learner.packing import forward_logits

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(length // 2, length + 1, (rows,), generator=generator)
    input_ids = torch.randint(5, vocab, (rows, length), generator=generator).to(device)
    attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long().to(device)
    completion_mask = attention_mask.clone()
    completion_mask[:, : length // 4] = 0
    advantages = torch.randn(rows, generator=generator).to(device)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps + 1):  # the first step warms up kernels and the allocator
        _sync(device)
        started = time.perf_counter()
        logits = forward_logits(model, input_ids, attention_mask, padding_free=True)
        logprobs = token_logprobs(logits, input_ids, completion_mask)
        mask = completion_mask.float()
        loss = compute_policy_loss("ppo", logprobs.float(), logprobs.detach().float(),
                                   advantages[:, None].expand_as(logprobs), mask,
                                   clip_low=0.2, clip_high=0.2).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step:
            times.append(time.perf_counter() - started)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss at step {step}: the bf16 learner is broken")
    tokens = int(attention_mask.sum())
    seconds = sorted(times)[len(times) // 2]
    return {"rows": rows, "length": length, "tokens_per_step": tokens, "median_step_s": seconds,
            "tokens_per_s": tokens / seconds, "peak_memory_bytes": _peak(device), "last_loss": float(loss)}


def _shard(name: str, tensor: torch.Tensor, rank: int, shards: int) -> torch.Tensor:
    """The slice of a full HF parameter that TP shard ``rank`` of ``shards`` keeps."""
    if tensor.dim() == 2 and any(part in name for part in ROW_SPLIT):
        return tensor.chunk(shards, dim=0)[rank]
    if tensor.dim() == 2 and any(part in name for part in COLUMN_SPLIT):
        return tensor.chunk(shards, dim=1)[rank]
    return tensor  # norms are replicated


def measure_sync(model, device: torch.device, *, bucket_mb: int, shards: int = 2) -> dict:
    from posttrain.rollout.sync import iter_checkpoint_buckets

    targets = {name: [torch.empty_like(_shard(name, p, r, shards)) for r in range(shards)]
               for name, p in model.named_parameters()}
    shard_bytes = [sum(t[r].numel() * t[r].element_size() for t in targets.values()) for r in range(shards)]
    rounds = []
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        _sync(device)
        started = time.perf_counter()
        buckets = moved = 0
        for bucket in iter_checkpoint_buckets(model, bucket_bytes=bucket_mb * 2**20):
            buckets += 1
            for name, tensor in bucket:
                for rank in range(shards):
                    targets[name][rank].copy_(_shard(name, tensor, rank, shards))
                moved += tensor.numel() * tensor.element_size()
        _sync(device)
        rounds.append({"seconds": time.perf_counter() - started, "buckets": buckets, "bytes": moved,
                       "peak_extra_bytes": _peak(device) - base})
    for name, param in model.named_parameters():  # the shards hold the learner's weights
        joined = torch.cat(targets[name], dim=1 if any(p in name for p in COLUMN_SPLIT) else 0) \
            if param.dim() == 2 else targets[name][0]
        if not torch.equal(joined, param.detach()):
            raise RuntimeError(f"shards of {name} differ from the learner's parameter")
    best = min(rounds, key=lambda r: r["seconds"])
    return {"bucket_mb": bucket_mb, "shards": shards, "shard_bytes": shard_bytes, "rounds": rounds,
            "best_gb_per_s": best["bytes"] / best["seconds"] / 1e9}


def measure_host_to_device(device: torch.device, megabytes: int = 256) -> dict | None:
    if device.type != "cuda":
        return None
    host = torch.empty(megabytes * 2**20, dtype=torch.uint8, pin_memory=True)
    target = torch.empty_like(host, device=device)
    target.copy_(host, non_blocking=True)
    _sync(device)
    started = time.perf_counter()
    for _ in range(5):
        target.copy_(host, non_blocking=True)
    _sync(device)
    return {"megabytes": megabytes, "gb_per_s": 5 * host.numel() / (time.perf_counter() - started) / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16
    model = build_model(args.size, device, dtype)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": str(dtype),
              "size": args.size, "parameters": sum(p.numel() for p in model.parameters()),
              "torch": torch.__version__}
    result["learner"] = measure_learner(model, device, rows=args.rows, length=args.length, steps=args.steps)
    result["sync"] = measure_sync(model, device, bucket_mb=args.bucket_mb)
    result["host_to_device"] = measure_host_to_device(device)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
