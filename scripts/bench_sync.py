"""Measure weight sync into the rollout engine for ~10M and ~100M-parameter Llama models.

    python scripts/bench_sync.py [--sizes 10m 100m] [--bucket-mib 16 256] [--repeats 3]

For each size: build a local model, start an in-process vLLM engine, perturb
a transformers copy of the weights, sync it in with each bucket size, and
print seconds, bytes moved, bucket count, the largest bucket and the measured
peak memory growth (GPU allocator, or the process's RSS high-water mark on
CPU). Each sync is checked: greedy output must equal transformers'.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SIZES = {  # name -> make_tiny_model arguments
    "10m": dict(hidden_size=256, num_layers=8, num_heads=4),
    "100m": dict(hidden_size=768, num_layers=12, num_heads=12),
}


def bench(size: str, bucket_mib: list[int], repeats: int) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.models.tiny import make_tiny_model
    from posttrain.rollout import RolloutConfig, RolloutEngine, sync_weights

    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model(f"{tmp}/model", max_position_embeddings=512, **SIZES[size])
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        params = sum(p.numel() for p in model.parameters())
        engine = RolloutEngine(path, RolloutConfig(enforce_eager=True, max_model_len=256, max_num_seqs=4,
                                                   max_tokens=8))
        device = engine.device
        model.to(device)
        prompt = engine.tokenize("What is 12 + 30?")
        rows = []
        for mib in bucket_mib:
            for rep in range(repeats):
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(torch.randn_like(p) * 0.01)
                stats = sync_weights(engine, model, bucket_bytes=mib * 2**20)
                ids = torch.tensor([prompt], device=device)
                with torch.no_grad():
                    hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                        do_sample=False)[0, ids.shape[1]:].tolist()
                ok = engine.generate([prompt], temperature=0.0)[0].completion_ids == hf
                rows.append(dict(size=size, params=params, bucket_mib=mib, rep=rep, seconds=stats.seconds,
                                 gather_seconds=stats.gather_seconds, mib=stats.bytes / 2**20,
                                 buckets=stats.num_buckets, peak_bucket_mib=stats.peak_bucket_bytes / 2**20,
                                 measured_peak_mib=(stats.measured_peak_bytes or 0) / 2**20,
                                 source=stats.memory_source, start_s=engine.start_seconds, greedy_match=ok))
        engine.close()
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--bucket-mib", nargs="+", type=int, default=[16, 256])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        start = time.perf_counter()
        rows += bench(size, args.bucket_mib, args.repeats)
        print(f"[{size}] done in {time.perf_counter() - start:.0f} s", flush=True)
    header = (f"{'size':>5} {'params':>11} {'bucket':>7} {'rep':>3} {'sync s':>8} {'gather s':>8} {'MiB':>7} "
              f"{'buckets':>7} {'peak bucket MiB':>15} {'measured peak MiB':>17} {'match':>5}")
    print(header)
    for r in rows:
        print(f"{r['size']:>5} {r['params']:>11,} {r['bucket_mib']:>5}Mi {r['rep']:>3} {r['seconds']:>8.3f} "
              f"{r['gather_seconds']:>8.3f} {r['mib']:>7.1f} {r['buckets']:>7} {r['peak_bucket_mib']:>15.1f} "
              f"{r['measured_peak_mib']:>17.1f} {str(r['greedy_match']):>5}")
    print(f"memory source: {rows[0]['source']}; engine start (enforce_eager): "
          + ", ".join(f"{s}: {next(r['start_s'] for r in rows if r['size'] == s):.1f} s" for s in args.sizes))


if __name__ == "__main__":
    main()
