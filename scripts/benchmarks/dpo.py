"""dpo: tokens/s of posttrain's DPO trainer against TRL's DPOTrainer."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from .common import REPO, machine, run_worker, throughput

DPO_LR = 1e-6  # small: the timing must not depend on what is learnt
DPO_BETA = 0.1


def worker_dpo(args: argparse.Namespace) -> dict:
    steps = args.steps + 1  # + the warm-up step
    if args.worker == "ours":
        return _dpo_ours(args, steps)
    return _dpo_trl(args, steps)


def _dpo_ours(args: argparse.Namespace, steps: int) -> dict:
    from posttrain.config.loader import load_recipe
    from posttrain.distributed import init_distributed
    from posttrain.trainers.dpo import Recipe

    with tempfile.TemporaryDirectory() as out:
        cfg = load_recipe(str(REPO / "recipes" / "dpo.yaml"), [
            f"model.path={args.model}", f"data.path={args.data}", "data.eval_path=null", "data.eval_fraction=0",
            f"data.max_length={args.max_length}", f"output_dir={out}", f"train.max_steps={steps}",
            f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}",
            f"learner.lr={DPO_LR}", "learner.warmup_steps=0", "learner.scheduler=constant", f"dpo.beta={DPO_BETA}",
            "logging.progress=false", "logging.tensorboard=false", "logging.plots=false",
            "checkpoint.every_n_steps=0", "checkpoint.save_final=false", f"seed={args.seed}"])
        recipe = Recipe(cfg, init_distributed())
        recipe.setup()
        seconds, tokens = [], []
        for step in range(steps):
            ids = [i for mb in recipe.data.sampler.micro_batches(step, 0, 1, args.batch) for i in mb]
            tokens.append(sum(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids)
                              for e in (recipe.train_set[i] for i in ids)))
            started = time.perf_counter()
            recipe.train_step(step)
            seconds.append(time.perf_counter() - started)
        recipe.run.finish({})
    return throughput(seconds, tokens, warmup=1)


def _dpo_trl(args: argparse.Namespace, steps: int) -> dict:
    import warnings

    from transformers import TrainerCallback

    from posttrain.compare.trl import dpo_trainer, read_jsonl

    warnings.filterwarnings("ignore")
    rows = read_jsonl(args.data, ("prompt", "chosen", "rejected"))
    with tempfile.TemporaryDirectory() as out:
        trainer = dpo_trainer(args.model, rows, out, batch_size=args.batch, lr=DPO_LR, beta=DPO_BETA,
                              max_steps=steps, max_length=args.max_length, seed=args.seed, logging_steps=10**6)
        tokens: list[int] = []
        ends: list[float] = []
        compute_loss = trainer.compute_loss

        def counting_compute_loss(model, inputs, *rest, **kwargs):
            tokens.append(int(inputs["attention_mask"].sum()))
            return compute_loss(model, inputs, *rest, **kwargs)

        class StepClock(TrainerCallback):
            def on_step_begin(self, *_, **__):
                if not ends:
                    ends.append(time.perf_counter())  # start of the first step

            def on_step_end(self, *_, **__):
                ends.append(time.perf_counter())

        trainer.compute_loss = counting_compute_loss
        trainer.add_callback(StepClock())
        trainer.train()
    # Step k's time runs from the end of step k-1, so it includes fetching and collating its batch, as ours does.
    seconds = [b - a for a, b in zip(ends, ends[1:])]
    return throughput(seconds, tokens, warmup=1)


def bench_dpo(args: argparse.Namespace) -> dict:
    from posttrain.models.tiny import make_tiny_model

    data = Path(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "model", hidden_size=args.hidden, num_layers=args.layers,
                                num_heads=args.hidden // 64, seed=0)
        params = json.loads((model / "posttrain_tiny.json").read_text())["parameters"]
        common = ["--model", str(model), "--data", str(data), "--steps", str(args.steps), "--batch", str(args.batch),
                  "--max-length", str(args.max_length), "--seed", str(args.seed)]
        samples: dict[str, list[dict]] = {"ours": [], "trl": []}
        for repeat in range(args.repeats):
            for side in ("ours", "trl") if repeat % 2 == 0 else ("trl", "ours"):
                samples[side].append(run_worker("dpo", *common, "--worker", side, threads=args.threads))
                print(f"  repeat {repeat + 1}/{args.repeats} {side:>4}: "
                      f"{samples[side][-1]['tokens_per_s']:8.0f} tokens/s", flush=True)
    ours = statistics.median(s["tokens_per_s"] for s in samples["ours"])
    trl = statistics.median(s["tokens_per_s"] for s in samples["trl"])
    import trl as trl_package

    return {
        "tokens_per_s": round(ours, 1), "trl_tokens_per_s": round(trl, 1), "ratio": round(ours / trl, 3),
        "target_ratio": 1.2,
        "settings": {"model": f"tiny Llama, hidden {args.hidden}, {args.layers} layers, {params} parameters",
                     "data": str(data.relative_to(REPO)) if data.is_relative_to(REPO) else str(data),
                     "pairs_per_step": args.batch, "timed_steps": args.steps, "warmup_steps": 1,
                     "precision": "fp32", "reference": "live model (both)", "loss": "sigmoid",
                     "max_length": args.max_length, "repeats": args.repeats, "threads": args.threads,
                     "trl": trl_package.__version__},
        "samples": {side: [round(s["tokens_per_s"], 1) for s in values] for side, values in samples.items()},
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
    }


def print_dpo(result: dict) -> None:
    print(f"\nDPO tokens/s ({result['settings']['model']}, {result['settings']['pairs_per_step']} pairs/step, fp32)")
    print(f"  {'posttrain':12}{result['tokens_per_s']:>10.0f}")
    print(f"  {'TRL':12}{result['trl_tokens_per_s']:>10.0f}")
    print(f"  {'ratio':12}{result['ratio']:>10.2f}   (target >= {result['target_ratio']})")
