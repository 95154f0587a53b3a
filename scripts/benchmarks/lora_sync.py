"""lora-sync: LoRA weight sync, adapter only against merged full weights."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from .common import load_average, machine, median, run_worker

LORA_SIZES = {  # name -> make_tiny_model arguments
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=2),
    "512x8": dict(hidden_size=512, num_layers=8, num_heads=8),
}
LORA_MODES = ("adapter", "merged")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_PROMPTS = ["What is 12 + 30?", "Reverse the word hello.", "The answer is", "def add(x, y):",
                "Count the letters in banana.", "What is 7 + 5?", "Sort these numbers: 3 1 2", "Hello"]


def worker_lora_sync(args: argparse.Namespace) -> dict:
    """One sync mode on one model, in a fresh process: engine start, repeated syncs, generation speed."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from posttrain.distributed import init_distributed
    from posttrain.rollout import RolloutConfig, RolloutEngine, sync_weights

    init_distributed()
    torch.manual_seed(args.seed)  # init_lora_weights=False: random, non-zero A and B
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32),
                           LoraConfig(r=args.rank, lora_alpha=2 * args.rank, init_lora_weights=False,
                                      target_modules=LORA_TARGETS)).eval()
    cfg = RolloutConfig(enforce_eager=True, max_model_len=256, max_num_seqs=32, max_tokens=args.max_tokens,
                        lora_sync=args.worker)
    engine = RolloutEngine(args.model, cfg, lora_rank=args.rank)
    try:
        first = sync_weights(engine, model)
        syncs, matches = [], []
        for _ in range(args.syncs):
            with torch.no_grad():  # a new adapter each time, as after an optimizer step
                for name, param in model.named_parameters():
                    if "lora_" in name:
                        param.add_(torch.randn_like(param) * 0.05)
            syncs.append(sync_weights(engine, model))
            matches.append(_greedy_matches_peft(engine, model))
        generate = _lora_generate_speed(engine, args)
    finally:
        engine.close()
    return {"mode": syncs[-1].mode, "start_s": engine.start_seconds, "first_sync_s": first.seconds,
            "first_sync_bytes": first.bytes, "base_bytes": first.base_bytes,
            "sync_s": [s.seconds for s in syncs], "gather_s": [s.gather_seconds for s in syncs],
            "bytes": syncs[-1].bytes, "tensors": syncs[-1].num_tensors,
            "measured_peak_mib": max((s.measured_peak_bytes or 0) for s in syncs) / 2**20,
            "greedy_match": all(matches), **generate,
            "params": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n),
            "adapter_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)}


def _greedy_matches_peft(engine, model, max_new_tokens: int = 8) -> bool:
    import torch

    prompt = engine.tokenize(LORA_PROMPTS[0])
    ids = torch.tensor([prompt])
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False)[0, ids.shape[1]:].tolist()
    return engine.generate([prompt], temperature=0.0, max_tokens=max_new_tokens)[0].completion_ids == expected


def _lora_generate_speed(engine, args: argparse.Namespace, rounds: int = 3) -> dict:
    """Median seconds and tokens/s of one seeded sampling call (8 prompts x 4 samples) on the synced engine."""
    times, tokens = [], []
    for seed in range(rounds):
        batch = engine.generate(LORA_PROMPTS, n=4, temperature=1.0, seed=seed, max_tokens=args.max_tokens)
        times.append(batch.seconds)
        tokens.append(batch.num_completion_tokens)
    return {"generate_s": statistics.median(times),
            "generate_tokens_per_s": statistics.median(t / s for t, s in zip(tokens, times))}


def bench_lora_sync(args: argparse.Namespace) -> dict:
    from posttrain.models.tiny import make_tiny_model

    args.load_at_start = load_average()
    runs: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            model = make_tiny_model(Path(tmp) / size, max_position_embeddings=512, seed=0, **LORA_SIZES[size])
            common = ["--model", str(model), "--rank", str(args.rank), "--syncs", str(args.syncs),
                      "--max-tokens", str(args.max_tokens), "--seed", str(args.seed)]
            runs[size] = {mode: [] for mode in LORA_MODES}
            for repeat in range(args.repeats):  # alternate the order so machine load hits both alike
                for mode in LORA_MODES if repeat % 2 == 0 else LORA_MODES[::-1]:
                    run = run_worker("lora-sync", *common, "--worker", mode, threads=args.threads)
                    runs[size][mode].append(run)
                    print(f"  {size} repeat {repeat + 1}/{args.repeats} {mode:>8}: sync "
                          f"{statistics.median(run['sync_s']) * 1000:8.1f} ms, {run['bytes'] / 2**20:8.2f} MiB",
                          flush=True)
    return lora_sync_result(args, runs)


def _lora_mode_summary(runs: list[dict]) -> dict:
    every = [t for run in runs for t in run["sync_s"]]
    return {"sync_ms": round(statistics.median(every) * 1000, 2),
            "gather_ms": round(statistics.median(t for run in runs for t in run["gather_s"]) * 1000, 2),
            "bytes": runs[0]["bytes"], "tensors": runs[0]["tensors"],
            "first_sync_ms": round(statistics.median(run["first_sync_s"] for run in runs) * 1000, 2),
            "first_sync_bytes": runs[0]["first_sync_bytes"],
            "generate_tokens_per_s": round(median(runs, "generate_tokens_per_s"), 1),
            "engine_start_s": round(median(runs, "start_s"), 2),
            "measured_peak_mib": round(max(run["measured_peak_mib"] for run in runs), 2),
            "greedy_match": all(run["greedy_match"] for run in runs), "mode": runs[0]["mode"]}


def lora_sync_result(args: argparse.Namespace, runs: dict[str, dict[str, list[dict]]]) -> dict:
    """The ``lora-sync`` section of the results file from every worker run."""
    import peft
    import vllm

    sizes = {}
    for size, by_mode in runs.items():
        adapter, merged = (_lora_mode_summary(by_mode[mode]) for mode in LORA_MODES)
        first = by_mode["adapter"][0]
        sizes[size] = {"params": first["params"], "adapter_params": first["adapter_params"],
                       "adapter": adapter, "merged": merged,
                       "sync_speedup": round(merged["sync_ms"] / adapter["sync_ms"], 2),
                       "bytes_ratio": round(merged["bytes"] / adapter["bytes"], 1),
                       "generate_ratio": round(adapter["generate_tokens_per_s"] / merged["generate_tokens_per_s"], 3)}
    return {"sizes": sizes,
            "settings": {"models": {size: LORA_SIZES[size] for size in runs}, "rank": args.rank,
                         "alpha": 2 * args.rank, "targets": LORA_TARGETS, "syncs_per_run": args.syncs,
                         "repeats": args.repeats, "precision": "fp32", "vllm_enforce_eager": True,
                         "generate": f"{len(LORA_PROMPTS)} prompts x 4 samples, {args.max_tokens} tokens, T=1",
                         "threads": args.threads, "peft": peft.__version__, "vllm": vllm.__version__},
            "machine": machine(),
            "load_average": {"start": getattr(args, "load_at_start", None),
                             "end": load_average()},
            "date": time.strftime("%Y-%m-%d")}


def print_lora_sync(result: dict) -> None:
    s = result["settings"]
    print(f"\nLoRA weight sync, adapter only vs merged (rank {s['rank']}, {len(s['targets'])} target modules, fp32)")
    print(f"  {'model':8}{'params':>12}{'mode':>9}{'sync ms':>10}{'MiB/sync':>10}{'first sync ms':>15}"
          f"{'gen tok/s':>11}{'match':>7}")
    for size, r in result["sizes"].items():
        for mode in LORA_MODES:
            m = r[mode]
            print(f"  {size:8}{r['params']:>12,}{mode:>9}{m['sync_ms']:>10.1f}{m['bytes'] / 2**20:>10.3f}"
                  f"{m['first_sync_ms']:>15.1f}{m['generate_tokens_per_s']:>11.0f}{str(m['greedy_match']):>7}")
        print(f"  {size}: adapter sync {r['sync_speedup']:.1f}x faster, {r['bytes_ratio']:.0f}x fewer bytes; "
              f"generation with the adapter at {r['generate_ratio']:.2f}x the merged engine's tokens/s")
