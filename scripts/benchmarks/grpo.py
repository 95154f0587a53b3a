"""grpo: samples/s of posttrain's GRPO step against TRL's GRPOTrainer; rollout and sync overheads."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from .common import REPO, load_average, machine, median, run_worker

GRPO_LR = 1e-6  # small: the timing must not depend on what is learnt
GRPO_SIDES = ("ours", "trl", "trl_vllm")


def worker_grpo(args: argparse.Namespace) -> dict:
    if args.worker == "ours":
        return _grpo_ours(args)
    return _grpo_trl(args, use_vllm=args.worker == "trl_vllm")


def _grpo_overrides(args: argparse.Namespace, out: str) -> list[str]:
    batch = args.prompts * args.n
    return [f"model.path={args.model}", f"data.path={args.data}", "data.eval_path=null", "data.eval_fraction=0",
            f"output_dir={out}", f"train.max_steps={args.steps + 1}", f"grpo.prompts_per_step={args.prompts}",
            f"rollout.n={args.n}", f"rollout.max_tokens={args.max_tokens}", "rollout.temperature=1.0",
            f"rollout.enforce_eager={str(args.eager).lower()}", f"train.global_batch_size={batch}",
            f"train.micro_batch_size={batch}", f"learner.lr={GRPO_LR}", "learner.scheduler=constant",
            "grpo.rewards=[{name: math_verify}]", "logging.progress=false", "logging.tensorboard=false",
            "logging.plots=false", "checkpoint.every_n_steps=0", "checkpoint.save_final=false", f"seed={args.seed}",
            f"grpo.padding_free={str(args.padding_free).lower()}"]


def _grpo_ours(args: argparse.Namespace) -> dict:
    """Timed GRPO steps of posttrain's recipe, then our rollout against a bare ``LLM.generate`` on its engine."""
    from posttrain.config.loader import load_recipe
    from posttrain.distributed import init_distributed
    from posttrain.trainers.grpo import Recipe

    with tempfile.TemporaryDirectory() as out:
        recipe = Recipe(load_recipe(str(REPO / "recipes" / "grpo.yaml"), _grpo_overrides(args, out)), init_distributed())
        recipe.setup()
        try:
            seconds, metrics = [], []
            for step in range(args.steps + 1):
                started = time.perf_counter()
                metrics.append(recipe.rl_step(step))
                seconds.append(time.perf_counter() - started)
            rollout = _rollout_vs_bare_vllm(recipe, args)
            rollout["pure_train_s"] = _pure_train_seconds(recipe, args)
        finally:
            recipe.cleanup()
            recipe.run.finish({})
    timed = metrics[1:]
    samples = args.prompts * args.n * args.steps
    parts = {k: sum(m[f"time/{k}_s"] for m in timed) / sum(seconds[1:]) for k in ("generate", "reward", "train", "sync")}
    return {"samples_per_s": samples / sum(seconds[1:]), "seconds": sum(seconds[1:]), "samples": samples,
            "completion_tokens": statistics.mean(m["completion_tokens"] for m in timed),
            "shares": parts, "step_s": statistics.median(seconds[1:]), **rollout}


def _engine_and_prompts(recipe) -> tuple:
    """The recipe's engine and this rank's prompts of the first step (``OnlineRollouts.rows``: the online
    recipes keep their rollout side in ``recipe.rollouts``)."""
    return recipe.rollouts.engine, [row.prompt for row in recipe.rollouts.rows(0)]


def _pure_train_seconds(recipe, args: argparse.Namespace, rounds: int = 3) -> float:
    """Median seconds of one plain-torch update on a step's batch: forward, log-probs of the completion
    tokens, backward, clipping, AdamW -- what any GRPO step must do; with a bare generate, the step's bound."""
    import torch
    from transformers import AutoModelForCausalLM

    engine, prompts = _engine_and_prompts(recipe)
    tensors = engine.generate(prompts, n=args.n, seed=1, temperature=1.0, max_tokens=args.max_tokens).collate(
        recipe.tokenizer.pad_token_id)
    ids, mask = tensors["input_ids"], tensors["completion_mask"][:, 1:].float()
    model = AutoModelForCausalLM.from_pretrained(args.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=GRPO_LR)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=tensors["attention_mask"]).logits[:, :-1]
        picked = logits.gather(-1, ids[:, 1:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
        loss = -(picked * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _rollout_vs_bare_vllm(recipe, args: argparse.Namespace, rounds: int = 5) -> dict:
    """Seconds of ``RolloutEngine.generate`` and of bare ``vllm.LLM.generate`` calls on the same engine, prompts,
    seeds and sampling parameters (alternating, medians); the bare call also without log-probs."""
    from vllm import SamplingParams

    engine, prompts = _engine_and_prompts(recipe)
    n = args.n
    texts = [recipe.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]

    def bare(seed: int, logprobs: int | None) -> tuple[float, int]:
        params = [SamplingParams(n=n, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens, seed=seed + i * n,
                                 logprobs=logprobs) for i in range(len(texts))]
        started = time.perf_counter()
        outputs = engine.llm.generate(texts, params, use_tqdm=False)
        return time.perf_counter() - started, sum(len(c.token_ids) for o in outputs for c in o.outputs)

    times: dict[str, list[float]] = {"ours": [], "bare": [], "bare_plain": []}
    tokens: dict[str, int] = {}
    for r in range(rounds):
        seed = 10_000 + r * 1_000
        started = time.perf_counter()
        batch = engine.generate(prompts, n=n, seed=seed, temperature=1.0, max_tokens=args.max_tokens)
        times["ours"].append(time.perf_counter() - started)
        tokens["ours"] = batch.num_completion_tokens
        for name, logprobs in (("bare", 0), ("bare_plain", None)):
            seconds, tokens[name] = bare(seed, logprobs)
            times[name].append(seconds)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"rollout_s": median["ours"], "bare_vllm_s": median["bare"], "bare_vllm_plain_s": median["bare_plain"],
            "rollout_tokens": tokens["ours"], "bare_vllm_tokens": tokens["bare"]}


def _grpo_trl(args: argparse.Namespace, *, use_vllm: bool) -> dict:
    import warnings

    from transformers import TrainerCallback

    from posttrain.compare.trl import grpo_trainer, read_jsonl
    from reward_models import load_reward

    warnings.filterwarnings("ignore")
    verifier = load_reward("math_verify")
    lengths: list[int] = []

    def math_verify(prompts, completions, answer, completion_ids=None, **_):
        lengths.extend(len(ids) for ids in completion_ids or [])
        return list(verifier(prompts, completions, answer=answer))

    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if not ends:
                ends.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            ends.append(time.perf_counter())

    rows = read_jsonl(args.data, ("prompt", "answer"))
    with tempfile.TemporaryDirectory() as out:
        trainer = grpo_trainer(args.model, rows, out, reward_funcs=[math_verify], num_generations=args.n,
                               prompts_per_step=args.prompts, max_completion_length=args.max_tokens, lr=GRPO_LR,
                               max_steps=args.steps + 1, seed=args.seed, use_vllm=use_vllm)
        trainer.add_callback(StepClock())
        try:
            trainer.train()
        finally:
            verifier.close()
    seconds = [b - a for a, b in zip(ends, ends[1:])][1:]  # the first (warm-up) step is left out
    samples = args.prompts * args.n * len(seconds)
    per_step = args.prompts * args.n
    return {"samples_per_s": samples / sum(seconds), "seconds": sum(seconds), "samples": samples,
            "completion_tokens": statistics.mean(lengths[per_step:]), "step_s": statistics.median(seconds)}


def _grpo_side(side: str, common: list[str], threads: int | None) -> dict:
    """One run of one side; a TRL side that cannot run here gives ``{"error": ...}`` instead of a number."""
    try:
        return run_worker("grpo", *common, "--worker", side, threads=threads)
    except RuntimeError as err:
        if side == "ours":
            raise
        return {"error": _last_error_line(str(err))}


def _last_error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["unknown failure"])[-1][:400]


def _warm_start(model: Path, tmp: Path, args: argparse.Namespace) -> Path:
    """The tiny model after one SFT pass over answers that ramble for a random number of words first, so its
    completions end anywhere between a few tokens and ``--max-tokens``, as a real policy's do (a random model
    never ends early). Returns the SFT checkpoint; not timed."""
    import random

    from posttrain.data.synthetic import write_task
    from posttrain.models.tiny import WORDS
    from posttrain.quickstart import run_stage

    rng = random.Random(args.seed)
    rows = [json.loads(line) for line in write_task("arithmetic", tmp / "sft-data", train=800, test=0,
                                                     seed=args.seed + 1)["train"].read_text().splitlines()]
    with open(tmp / "sft.jsonl", "w") as f:
        for row in rows:
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, int(args.max_tokens * 0.6))))
            answer = f"{words} The answer is \\boxed{{{row['answer']}}}.".strip()
            f.write(json.dumps({"messages": [*row["prompt"], {"role": "assistant", "content": answer}]}) + "\n")
    summary = run_stage("sft.yaml", [f"output_dir={tmp / 'sft'}", f"model.path={model}", f"data.path={tmp / 'sft.jsonl'}",
                                     "data.eval_fraction=0", f"data.max_length={args.max_tokens + 64}", "train.epochs=1",
                                     "checkpoint.every_n_steps=0", "logging.progress=false", "logging.plots=false",
                                     "logging.tensorboard=false", f"seed={args.seed}"], tmp / "sft.log")
    return Path(summary["checkpoint"]) / "model"


def bench_grpo(args: argparse.Namespace) -> dict:
    from posttrain.data.synthetic import write_task
    from posttrain.models.tiny import make_tiny_model

    args.load_at_start = load_average()
    sides = ("ours", "trl") + (("trl_vllm",) if args.trl_vllm else ())
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "model", hidden_size=args.hidden, num_layers=args.layers,
                                num_heads=args.hidden // 64, seed=0)
        params = json.loads((model / "posttrain_tiny.json").read_text())["parameters"]
        if args.warm_start:
            print("  warm start: one SFT pass so that completions end at varied lengths (not timed)", flush=True)
            model = _warm_start(model, Path(tmp), args)
        data = write_task("arithmetic", Path(tmp) / "data", train=max(200, args.prompts * (args.steps + 1)), test=0,
                          seed=args.seed)["train"]
        common = ["--model", str(model), "--data", str(data), "--steps", str(args.steps), "--prompts",
                  str(args.prompts), "--n", str(args.n), "--max-tokens", str(args.max_tokens), "--seed", str(args.seed)]
        if args.eager:
            common.append("--eager")
        if not args.padding_free:
            common.append("--no-padding-free")
        samples: dict[str, list[dict]] = {side: [] for side in sides}
        for repeat in range(args.repeats):
            for side in sides if repeat % 2 == 0 else sides[::-1]:
                if samples[side] and "error" in samples[side][-1]:
                    continue  # a side that failed once fails again: do not pay for it twice
                samples[side].append(_grpo_side(side, common, args.threads))
                shown = samples[side][-1]
                print(f"  repeat {repeat + 1}/{args.repeats} {side:>8}: "
                      + (f"{shown['samples_per_s']:8.1f} samples/s" if "error" not in shown else f"failed: {shown['error']}"),
                      flush=True)
    return grpo_result(args, samples, params)


def grpo_result(args: argparse.Namespace, samples: dict[str, list[dict]], params: int) -> dict:
    """The ``grpo`` section of the results file from every run of every side."""
    import trl as trl_package
    import vllm

    ours = samples["ours"]
    trl_runs = {side: [s for s in samples.get(side, []) if "error" not in s] for side in GRPO_SIDES[1:]}
    result: dict = {"samples_per_s": round(median(ours, "samples_per_s"), 2)}
    notes = {}
    for side, key in (("trl", "trl_samples_per_s"), ("trl_vllm", "trl_vllm_samples_per_s")):
        if trl_runs[side]:
            result[key] = round(median(trl_runs[side], "samples_per_s"), 2)
        elif samples.get(side):
            notes[key] = samples[side][0]["error"]
        else:
            notes[key] = "not run (--no-trl-vllm)"
    best = max((result[k] for k in ("trl_samples_per_s", "trl_vllm_samples_per_s") if k in result), default=None)
    result["ratio_vs_best_trl"] = round(result["samples_per_s"] / best, 3) if best else None
    rollout, bare = median(ours, "rollout_s"), median(ours, "bare_vllm_s")
    result["rollout_vs_vllm"] = round(bare / rollout, 3)  # throughput ratio: same samples, seeds and tokens
    result["rollout_vs_vllm_plain"] = round(median(ours, "bare_vllm_plain_s") / rollout, 3)
    # same seeds, so the same completions: equal token counts show both calls did the same work
    result["rollout_same_tokens"] = all(s.get("rollout_tokens") == s.get("bare_vllm_tokens") for s in ours)
    result["sync_share"] = round(median([s["shares"] for s in ours], "sync"), 4)
    if all("pure_train_s" in s for s in ours):  # DESIGN's bound: step time ~ pure generate + pure train
        result["step_vs_bound"] = round(statistics.median(s["step_s"] / (s["bare_vllm_s"] + s["pure_train_s"])
                                                          for s in ours), 3)
    result["step_shares"] = {k: round(median([s["shares"] for s in ours], k), 3)
                             for k in ("generate", "reward", "train", "sync")}
    result["completion_tokens"] = {side: round(median(runs, "completion_tokens"), 1)
                                   for side, runs in (("ours", ours), *trl_runs.items()) if runs}
    result["targets"] = {"ratio_vs_best_trl": 2.0, "rollout_vs_vllm": 0.9, "sync_share_below": 0.05,
                         "step_vs_bound_at_most": 1.2}
    if notes:
        result["notes"] = notes
    result["settings"] = {
        "model": f"tiny Llama, hidden {args.hidden}, {args.layers} layers, {params} parameters"
                 + (", after one SFT pass (completions of varied length)" if args.warm_start else ", random weights"),
        "data": "synthetic arithmetic prompts (posttrain.data.synthetic), chat format", "reward": "math_verify",
        "prompts_per_step": args.prompts, "samples_per_prompt": args.n, "max_tokens": args.max_tokens,
        "temperature": 1.0, "timed_steps": args.steps, "warmup_steps": 1, "precision": "fp32",
        "optimizer_steps_per_rollout": 1, "reference_model": "none (beta 0)",
        "warm_start": args.warm_start, "our_padding_free": args.padding_free,
        "vllm_enforce_eager": args.eager, "repeats": args.repeats, "threads": args.threads,
        "trl": trl_package.__version__, "vllm": vllm.__version__,
    }
    result["samples"] = {side: [round(s["samples_per_s"], 2) if "error" not in s else None for s in runs]
                         for side, runs in samples.items()}
    result["machine"] = machine()
    result["load_average"] = {"start": getattr(args, "load_at_start", None),
                              "end": load_average()}
    result["date"] = time.strftime("%Y-%m-%d")
    return result


def print_grpo(result: dict) -> None:
    s = result["settings"]
    print(f"\nGRPO samples/s ({s['model']}, {s['prompts_per_step']} prompts x {s['samples_per_prompt']} samples, "
          f"{s['max_tokens']} tokens, fp32)")
    rows = [("posttrain", result.get("samples_per_s")), ("TRL (HF generate)", result.get("trl_samples_per_s")),
            ("TRL (vLLM colocate)", result.get("trl_vllm_samples_per_s"))]
    for name, value in rows:
        print(f"  {name:22}{value:>10.1f}" if value is not None else f"  {name:22}{'n/a':>10}")
    ratio = result["ratio_vs_best_trl"]
    print(f"  {'ratio vs best TRL':22}{ratio if ratio is not None else float('nan'):>10.2f}   (target >= 2)")
    print(f"  {'rollout vs bare vLLM':22}{result['rollout_vs_vllm']:>10.2f}   (target >= 0.9; "
          f"{result['rollout_vs_vllm_plain']:.2f} against generate without log-probs)")
    print(f"  {'weight-sync share':22}{result['sync_share']:>10.3f}   (target < 0.05)")
    if "step_vs_bound" in result:
        print(f"  {'step / (bare generate + pure train)':22}  {result['step_vs_bound']:.2f}   (target <= 1.2)")
    shares = ", ".join(f"{k} {v:.0%}" for k, v in result["step_shares"].items())
    print(f"  step time: {shares}")
    for key, note in result.get("notes", {}).items():
        print(f"  {key}: {note}")
