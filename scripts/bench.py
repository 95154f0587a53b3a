"""Benchmarks against the reference implementations, side by side in one run.

    python scripts/bench.py dpo [--steps 8] [--repeats 3] [--batch 8] [--hidden 256] [--layers 4]
    python scripts/bench.py grpo [--steps 4] [--repeats 3] [--prompts 8] [--n 8] [--max-tokens 128] [--threads N]
    python scripts/bench.py lora-sync [--sizes tiny 512x8] [--rank 16] [--syncs 5] [--repeats 2]
    python scripts/bench.py scale [--steps 3] [--repeats 1]

Each subcommand measures one thing, prints a table, and merges its section into
``bench/results.json`` (other sections are kept). Every side runs in its own
fresh interpreter (``--worker``), the sides alternate ``--repeats`` times so
that load from other processes on the machine hits both alike, and the median
of each side is reported.

Subcommands:
  dpo   tokens/s of posttrain's DPO trainer against TRL's DPOTrainer: same model,
        data, batch, fp32, both with a live reference model. Tokens are the
        non-pad tokens of the chosen and rejected sequences (prompt included)
        of the timed steps; a step is forward + backward + optimizer step; the
        first (warm-up) step and all setup are excluded.
  grpo  samples/s of posttrain's GRPO step (generate + reward + update + sync) against TRL's
        GRPOTrainer (HF generate and vLLM colocate); our rollout against a bare vLLM generate;
        the weight sync's share of the step (docs/benchmarks.md).
  lora-sync
        weight sync of a PEFT LoRA learner into the rollout engine, adapter only
        (rollout.lora_sync=adapter: vLLM's LoRA kernels serve the factors) against
        merged (the adapter merged into full weights, all streamed): seconds and
        bytes per sync, the first adapter sync (which also sends the base), and
        what each engine then generates per second. Every sync's result is checked
        against transformers + PEFT greedy output.
  scale GRPO step time and samples/s for 1 vs 2 processes, colocated and
        disaggregated, sync and one-step async (each a ``posttrain run``; medians
        of the per-step timings after a warm-up step); weight-sync seconds and
        peak extra memory for models of about 1M, 10M and 100M parameters.
  tp-sync
        weight sync from a ZeRO-3 learner on 2 processes into two TP=1 replicas
        against one TP=2 engine (scripts/bench_tp_sync.py under torchrun), for
        about 1M, 10M and 100M parameters: seconds and peak growth per rank.

Adding a benchmark: write ``bench_NAME(args) -> dict`` and a ``worker_NAME``
if it needs clean processes, and register it in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results.json"


# ----------------------------------------------------------------------------- shared


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def merge_results(section: str, values: dict, path: Path = RESULTS) -> Path:
    """Write ``values`` as ``section`` of the results file, keeping every other section."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[section] = values
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


def run_worker(command: str, *args: str, threads: int | None = None) -> dict:
    """Run ``bench.py COMMAND --worker ...`` in a fresh interpreter; its last stdout line is JSON."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), command, *args],
                          capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"worker {command} {args} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def throughput(step_seconds: list[float], step_tokens: list[int], warmup: int) -> dict:
    seconds, tokens = sum(step_seconds[warmup:]), sum(step_tokens[warmup:])
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens,
            "steps": len(step_seconds) - warmup}


# ----------------------------------------------------------------------------- dpo

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
            ids = [i for mb in recipe.sampler.micro_batches(step, 0, 1, args.batch) for i in mb]
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


# ----------------------------------------------------------------------------- grpo

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
    """The recipe's engine and its first step's prompts (the engine sits in ``recipe.rollouts`` where the
    online recipes share their rollout side)."""
    rollouts = getattr(recipe, "rollouts", None)
    if rollouts is not None:
        return rollouts.engine, [row.prompt for row in rollouts.rows(0)]
    return recipe.engine, [row.prompt for row in recipe.my_prompts(0)]


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

    args.load_at_start = [round(x, 2) for x in os.getloadavg()]
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


def _median(values: list[dict], key: str) -> float:
    return statistics.median(v[key] for v in values)


def grpo_result(args: argparse.Namespace, samples: dict[str, list[dict]], params: int) -> dict:
    """The ``grpo`` section of the results file from every run of every side."""
    import trl as trl_package
    import vllm

    ours = samples["ours"]
    trl_runs = {side: [s for s in samples.get(side, []) if "error" not in s] for side in GRPO_SIDES[1:]}
    result: dict = {"samples_per_s": round(_median(ours, "samples_per_s"), 2)}
    notes = {}
    for side, key in (("trl", "trl_samples_per_s"), ("trl_vllm", "trl_vllm_samples_per_s")):
        if trl_runs[side]:
            result[key] = round(_median(trl_runs[side], "samples_per_s"), 2)
        elif samples.get(side):
            notes[key] = samples[side][0]["error"]
        else:
            notes[key] = "not run (--no-trl-vllm)"
    best = max((result[k] for k in ("trl_samples_per_s", "trl_vllm_samples_per_s") if k in result), default=None)
    result["ratio_vs_best_trl"] = round(result["samples_per_s"] / best, 3) if best else None
    rollout, bare = _median(ours, "rollout_s"), _median(ours, "bare_vllm_s")
    result["rollout_vs_vllm"] = round(bare / rollout, 3)  # throughput ratio: same samples, seeds and tokens
    result["rollout_vs_vllm_plain"] = round(_median(ours, "bare_vllm_plain_s") / rollout, 3)
    # same seeds, so the same completions: equal token counts show both calls did the same work
    result["rollout_same_tokens"] = all(s.get("rollout_tokens") == s.get("bare_vllm_tokens") for s in ours)
    result["sync_share"] = round(_median([s["shares"] for s in ours], "sync"), 4)
    if all("pure_train_s" in s for s in ours):  # DESIGN's bound: step time ~ pure generate + pure train
        result["step_vs_bound"] = round(statistics.median(s["step_s"] / (s["bare_vllm_s"] + s["pure_train_s"])
                                                          for s in ours), 3)
    result["step_shares"] = {k: round(_median([s["shares"] for s in ours], k), 3)
                             for k in ("generate", "reward", "train", "sync")}
    result["completion_tokens"] = {side: round(_median(runs, "completion_tokens"), 1)
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
                              "end": [round(x, 2) for x in os.getloadavg()]}
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


# ----------------------------------------------------------------------------- lora-sync

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

    args.load_at_start = [round(x, 2) for x in os.getloadavg()]
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
            "generate_tokens_per_s": round(_median(runs, "generate_tokens_per_s"), 1),
            "engine_start_s": round(_median(runs, "start_s"), 2),
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
                             "end": [round(x, 2) for x in os.getloadavg()]},
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


# ----------------------------------------------------------------------------- command line

# ----------------------------------------------------------------------------- scale

# (label, processes, placement, schedule): what one more process buys, and where it goes.
SCALE_RUNS = (
    ("1 process", 1, "colocated", "sync"),
    ("2 colocated", 2, "colocated", "sync"),
    ("2 disaggregated", 2, "disaggregated", "sync"),
    ("2 disaggregated async", 2, "disaggregated", "one_step_async"),
)
SYNC_SIZES = ((128, 3), (320, 6), (768, 10))  # (hidden, layers): about 1M, 10M and 100M parameters
SCALE_PLOT = REPO / "docs" / "img" / "scale.png"


def _scale_overrides(args: argparse.Namespace, model: Path, data: Path, out: Path, placement: str,
                     schedule: str) -> list[str]:
    batch = args.prompts * args.n
    return [f"model.path={model}", f"data.path={data}", "data.eval_path=null", "data.eval_fraction=0",
            f"output_dir={out}", f"train.max_steps={args.steps + 1}", f"grpo.prompts_per_step={args.prompts}",
            f"rollout.n={args.n}", f"rollout.max_tokens={args.max_tokens}", "rollout.temperature=1.0",
            "rollout.enforce_eager=true", f"rollout.placement={placement}", f"rollout.schedule={schedule}",
            f"train.global_batch_size={batch}", f"train.micro_batch_size={args.micro_batch}",
            f"learner.lr={GRPO_LR}", "learner.scheduler=constant", "grpo.rewards=[{name: math_verify}]",
            "grpo.eval_prompts=0", "logging.progress=false", "logging.tensorboard=false", "logging.plots=false",
            "checkpoint.every_n_steps=0", "checkpoint.save_final=false", f"seed={args.seed}"]


def _scale_run(args: argparse.Namespace, model: Path, data: Path, tmp: Path, processes: int, placement: str,
               schedule: str) -> dict:
    """One ``posttrain run`` of GRPO; the medians of its per-step timings after the warm-up step."""
    out = tmp / f"run-{processes}-{placement}-{schedule}-{time.monotonic_ns()}"
    threads = args.threads or max(1, (os.cpu_count() or 1) // processes)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "posttrain.cli.main", "run", str(REPO / "recipes" / "grpo.yaml"),
               "--nproc", str(processes), *_scale_overrides(args, model, data, out, placement, schedule)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"scale run {processes} {placement} {schedule} failed:\n{done.stderr[-4000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = [r for r in records if "time/step_s" in r][1:]  # step 1: warm caches, and async has nothing ahead
    step_s = statistics.median(r["time/step_s"] for r in timed)
    return {"step_s": step_s, "samples_per_s": args.prompts * args.n / step_s,
            **{key: statistics.median(r.get(f"time/{key}_s", 0.0) for r in timed)
               for key in ("generate", "train", "sync", "generate_wait")},
            "staleness": max(r.get("staleness", 0.0) for r in timed), "threads": threads}


def worker_scale(args: argparse.Namespace) -> dict:
    """Weight-sync cost for one model size: a fresh engine and learner module in this process, ``--rounds``
    syncs after a warm-up one; median seconds, largest bucket and measured peak growth."""
    from transformers import AutoModelForCausalLM

    from posttrain.models.tiny import make_tiny_model
    from posttrain.rollout import RolloutConfig, RolloutEngine, sync_weights

    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model(Path(tmp) / "model", hidden_size=args.hidden, num_layers=args.layers,
                               num_heads=args.hidden // 64, seed=0)
        params = json.loads((path / "posttrain_tiny.json").read_text())["parameters"]
        engine = RolloutEngine(path, RolloutConfig(enforce_eager=True, max_model_len=128, max_num_seqs=4))
        module = AutoModelForCausalLM.from_pretrained(path)
        try:
            stats = [sync_weights(engine, module, bucket_bytes=args.bucket_mb * 2**20) for _ in range(args.rounds + 1)]
        finally:
            engine.close()
    timed = stats[1:]
    measured = [s.measured_peak_bytes for s in timed if s.measured_peak_bytes is not None]
    return {"parameters": params, "model_bytes": timed[0].bytes, "seconds": statistics.median(s.seconds for s in timed),
            "peak_bucket_bytes": timed[0].peak_bucket_bytes, "num_buckets": timed[0].num_buckets,
            "measured_peak_bytes": max(measured) if measured else None, "memory_source": timed[0].memory_source}


def bench_scale(args: argparse.Namespace) -> dict:
    from posttrain.data.synthetic import write_task
    from posttrain.models.tiny import make_tiny_model

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    runs: dict[str, list[dict]] = {label: [] for label, *_ in SCALE_RUNS}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        model = make_tiny_model(tmp / "model", hidden_size=args.hidden, num_layers=args.layers,
                                num_heads=args.hidden // 64, seed=0)
        data = write_task("arithmetic", tmp / "data", train=max(200, args.prompts * (args.steps + 1)), test=0,
                          seed=args.seed)["train"]
        for repeat in range(args.repeats):
            for label, processes, placement, schedule in SCALE_RUNS if repeat % 2 == 0 else SCALE_RUNS[::-1]:
                runs[label].append(_scale_run(args, model, data, tmp, processes, placement, schedule))
                print(f"  repeat {repeat + 1}/{args.repeats} {label:>24}: {runs[label][-1]['step_s']:.2f} s/step",
                      flush=True)
    sync = []
    for hidden, layers in SYNC_SIZES[: args.sizes]:
        sync.append(run_worker("scale", "--worker", "sync", "--hidden", str(hidden), "--layers", str(layers),
                               "--bucket-mb", str(args.bucket_mb), "--rounds", str(args.rounds)))
        print(f"  sync {sync[-1]['parameters'] / 1e6:6.1f}M parameters: {sync[-1]['seconds']:.3f} s", flush=True)
    result = scale_result(args, runs, sync, load_at_start + [round(x, 2) for x in os.getloadavg()])
    plot_scale(result, Path(args.plot))
    result["plot"] = os.path.relpath(args.plot, REPO)
    return result


def scale_result(args: argparse.Namespace, runs: dict[str, list[dict]], sync: list[dict], load: list[float]) -> dict:
    """The ``scale`` section: per setup the medians over repeats and the speed-up over one process; the sync
    figures per model size."""
    setups = {}
    for label, processes, placement, schedule in SCALE_RUNS:
        if not runs.get(label):
            continue
        setups[label] = {"processes": processes, "placement": placement, "schedule": schedule,
                         **{key: statistics.median(r[key] for r in runs[label]) for key in runs[label][0]},
                         "runs_step_s": [round(r["step_s"], 4) for r in runs[label]]}
    base = setups.get(SCALE_RUNS[0][0])
    for values in setups.values():
        values["speedup"] = base["step_s"] / values["step_s"] if base else None
    return {"machine": machine(), "load_average": {"start": load[:3], "end": load[3:]},
            "settings": {"prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens, "steps": args.steps,
                         "repeats": args.repeats, "hidden": args.hidden, "layers": args.layers,
                         "micro_batch": args.micro_batch, "bucket_mb": args.bucket_mb,
                         "threads": args.threads or "cores / processes"},
            "setups": setups, "sync": sync}


def save_figure(fig, path: Path) -> None:
    """Write a benchmark's figure as a PNG (creating its folder) and release it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scale(result: dict, path: Path) -> None:
    """Left: samples/s per setup; right: sync seconds and peak extra memory against parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = list(result["setups"])
    left.barh(labels[::-1], [result["setups"][k]["samples_per_s"] for k in labels[::-1]], color="tab:blue")
    left.set_xlabel("GRPO samples/s (median)")
    left.set_title("step throughput")
    sync = result["sync"]
    if sync:
        params = [s["parameters"] for s in sync]
        right.plot(params, [s["seconds"] for s in sync], "o-", color="tab:red", label="sync seconds")
        right.set_xscale("log")
        right.set_xlabel("parameters")
        right.set_ylabel("seconds", color="tab:red")
        memory = right.twinx()
        memory.plot(params, [(s["measured_peak_bytes"] or 0) / 2**20 for s in sync], "s--", color="tab:green",
                    label="measured peak extra")
        memory.plot(params, [s["model_bytes"] / 2**20 for s in sync], ":", color="gray", label="model size")
        memory.set_ylabel("MiB", color="tab:green")
        memory.legend(loc="upper left", fontsize=8)
        right.set_title(f"weight sync ({result['settings']['bucket_mb']} MiB buckets)")
    save_figure(fig, path)


def print_scale(result: dict) -> None:
    print(f"\n{'setup':<24} {'step s':>8} {'samples/s':>10} {'speed-up':>9} {'gen s':>7} {'train s':>8} "
          f"{'sync s':>7} {'wait s':>7} {'stale':>6}")
    for label, v in result["setups"].items():
        print(f"{label:<24} {v['step_s']:8.2f} {v['samples_per_s']:10.1f} {v['speedup']:8.2f}x {v['generate']:7.2f} "
              f"{v['train']:8.2f} {v['sync']:7.3f} {v['generate_wait']:7.2f} {v['staleness']:6.0f}")
    print(f"\n{'parameters':>12} {'model MiB':>10} {'sync s':>8} {'buckets':>8} {'largest bucket MiB':>19} "
          f"{'peak extra MiB':>15}")
    for s in result["sync"]:
        peak = "n/a" if s["measured_peak_bytes"] is None else f"{s['measured_peak_bytes'] / 2**20:.1f}"
        print(f"{s['parameters']:>12,} {s['model_bytes'] / 2**20:10.1f} {s['seconds']:8.3f} {s['num_buckets']:8d} "
              f"{s['peak_bucket_bytes'] / 2**20:19.1f} {peak:>15}")
    print(f"load average {result['load_average']}")


# ----------------------------------------------------------------------------- tp-sync

TP_SYNC_PLOT = REPO / "docs" / "img" / "tp_sync.png"
# (hidden, layers): about 1M, 13M and 100M parameters; an even head count (hidden / 64) so TP=2 can split heads
TP_SYNC_SIZES = ((128, 3), (384, 6), (768, 10))


def bench_tp_sync(args: argparse.Namespace) -> dict:
    """Weight sync from a ZeRO-3 learner over 2 processes into TP=1 replicas against one TP=2 engine, per model
    size (scripts/bench_tp_sync.py under torchrun): seconds and measured peak growth on each rank."""
    from posttrain.models.tiny import make_tiny_model

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    rows = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        for hidden, layers in TP_SYNC_SIZES[: args.sizes]:
            model = make_tiny_model(tmp / f"model-{hidden}", hidden_size=hidden, num_layers=layers,
                                    num_heads=hidden // 64, seed=0)
            params = json.loads((model / "posttrain_tiny.json").read_text())["parameters"]
            for repeat in range(args.repeats):
                for tp in (1, 2) if repeat % 2 == 0 else (2, 1):
                    out = tmp / f"tp{tp}-{hidden}-{repeat}"
                    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
                    env.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
                               OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2)))
                    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                           "--standalone", str(REPO / "scripts" / "bench_tp_sync.py"), str(model),
                                           str(out), "--tp", str(tp), "--rounds", str(args.rounds),
                                           "--bucket-mb", str(args.bucket_mb)],
                                          capture_output=True, text=True, env=env, cwd=tmp)
                    if done.returncode != 0:
                        raise RuntimeError(f"tp-sync tp={tp} hidden={hidden} failed:\n{done.stderr[-4000:]}")
                    ranks = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2)]
                    rows.append({"parameters": params, "tp": tp, "repeat": repeat,
                                 "seconds": max(r["seconds"] for r in ranks),
                                 "peak_bytes_per_rank": [r["measured_peak_bytes"] for r in ranks],
                                 "peak_bucket_bytes": ranks[0]["peak_bucket_bytes"],
                                 "num_buckets": ranks[0]["num_buckets"], "model_bytes": ranks[0]["model_bytes"],
                                 "engine_parameters_per_rank": [r["engine_parameters"] for r in ranks],
                                 "memory_source": ranks[0]["memory_source"]})
                    print(f"  {params / 1e6:6.1f}M TP={tp}: {rows[-1]['seconds']:.3f} s", flush=True)
    sizes = []
    for params in sorted({r["parameters"] for r in rows}):
        entry = {"parameters": params}
        for tp in (1, 2):
            mine = [r for r in rows if r["parameters"] == params and r["tp"] == tp]
            entry[f"tp{tp}"] = {"seconds": statistics.median(r["seconds"] for r in mine),
                                "peak_bytes_per_rank": max(max(b or 0 for b in r["peak_bytes_per_rank"]) for r in mine),
                                "engine_parameters_per_rank": mine[0]["engine_parameters_per_rank"][0],
                                "peak_bucket_bytes": mine[0]["peak_bucket_bytes"],
                                "num_buckets": mine[0]["num_buckets"]}
        entry["tp2_over_tp1_seconds"] = entry["tp2"]["seconds"] / entry["tp1"]["seconds"]
        sizes.append(entry)
    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "bucket_mb": args.bucket_mb, "rounds": args.rounds, "repeats": args.repeats,
              "memory_source": rows[0]["memory_source"], "sizes": sizes, "runs": rows,
              "load": load_at_start + [round(x, 2) for x in os.getloadavg()]}
    plot_tp_sync(result, Path(args.plot))
    result["plot"] = os.path.relpath(args.plot, REPO)
    return result


def plot_tp_sync(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = [s["parameters"] / 1e6 for s in result["sizes"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for tp, marker in ((1, "o"), (2, "s")):
        left.plot(params, [s[f"tp{tp}"]["seconds"] for s in result["sizes"]], marker=marker, label=f"TP={tp}")
        right.plot(params, [s[f"tp{tp}"]["peak_bytes_per_rank"] / 2**20 for s in result["sizes"]], marker=marker,
                   label=f"TP={tp}")
    for axis, label in ((left, "sync seconds (slowest rank)"), (right, "peak growth per rank (MiB)")):
        axis.set_xscale("log")
        axis.set_xlabel("parameters (M)")
        axis.set_ylabel(label)
        axis.legend()
    fig.suptitle(f"ZeRO-3 learner on 2 processes -> 2 replicas (TP=1) or one TP=2 engine; "
                 f"{result['bucket_mb']} MiB buckets")
    save_figure(fig, path)


def print_tp_sync(result: dict) -> None:
    print(f"{'params':>10} {'TP=1 s':>8} {'TP=2 s':>8} {'ratio':>6} {'TP=1 peak MiB':>14} {'TP=2 peak MiB':>14} "
          f"{'shard params':>13}")
    for s in result["sizes"]:
        print(f"{s['parameters']:>10,} {s['tp1']['seconds']:>8.3f} {s['tp2']['seconds']:>8.3f} "
              f"{s['tp2_over_tp1_seconds']:>6.2f} {s['tp1']['peak_bytes_per_rank'] / 2**20:>14.1f} "
              f"{s['tp2']['peak_bytes_per_rank'] / 2**20:>14.1f} {s['tp2']['engine_parameters_per_rank']:>13,}")
    print(f"load average before/after: {result['load']}")


COMMANDS = {
    # name: (benchmark, worker or None, printer)
    "dpo": (bench_dpo, worker_dpo, print_dpo),
    "grpo": (bench_grpo, worker_grpo, print_grpo),
    "lora-sync": (bench_lora_sync, worker_lora_sync, print_lora_sync),
    "scale": (bench_scale, worker_scale, print_scale),
    "tp-sync": (bench_tp_sync, None, print_tp_sync),
}


def add_rollout_batch_args(parser: argparse.ArgumentParser, *, steps: int, repeats: int, repeats_help: str,
                           max_tokens: int = 32) -> None:
    """The options every GRPO-step benchmark shares: how long it runs and the rollout batch it times."""
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help="longest completion")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    dpo = sub.add_parser("dpo", help="DPO tokens/s against TRL's DPOTrainer")
    dpo.add_argument("--steps", type=int, default=8, help="timed steps per run (after one warm-up step)")
    dpo.add_argument("--repeats", type=int, default=3, help="runs per side, alternating")
    dpo.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    dpo.add_argument("--hidden", type=int, default=256)
    dpo.add_argument("--layers", type=int, default=4)
    dpo.add_argument("--max-length", type=int, default=128)
    dpo.add_argument("--data", default=str(REPO / "examples" / "data" / "preference" / "train.jsonl"))
    dpo.add_argument("--seed", type=int, default=0)
    dpo.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads on each side (OMP_NUM_THREADS)")
    dpo.add_argument("--model", help=argparse.SUPPRESS)
    dpo.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    grpo = sub.add_parser("grpo", help="GRPO samples/s against TRL's GRPOTrainer; rollout and sync overheads")
    add_rollout_batch_args(grpo, steps=4, repeats=3, repeats_help="runs per side, alternating", max_tokens=128)
    grpo.add_argument("--hidden", type=int, default=256)
    grpo.add_argument("--layers", type=int, default=4)
    grpo.add_argument("--eager", action="store_true", help="our engine without torch.compile (TRL's colocate engine always compiles)")
    grpo.add_argument("--no-trl-vllm", dest="trl_vllm", action="store_false",
                      help="skip TRL with use_vllm=True, vllm_mode='colocate'")
    grpo.add_argument("--no-warm-start", dest="warm_start", action="store_false",
                      help="time the random tiny model (its completions almost always run to --max-tokens) instead "
                           "of the model after one SFT pass, whose completions end at varied lengths")
    grpo.add_argument("--no-padding-free", dest="padding_free", action="store_false",
                      help="our learner pads every sequence to the longest (grpo.padding_free=false), as TRL does")
    grpo.add_argument("--seed", type=int, default=0)
    grpo.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads on each side (OMP_NUM_THREADS)")
    grpo.add_argument("--model", help=argparse.SUPPRESS)
    grpo.add_argument("--data", help=argparse.SUPPRESS)
    grpo.add_argument("--worker", choices=GRPO_SIDES, help=argparse.SUPPRESS)
    lora = sub.add_parser("lora-sync", help="LoRA weight sync: adapter only against merged full weights")
    lora.add_argument("--sizes", nargs="+", default=list(LORA_SIZES), choices=list(LORA_SIZES))
    lora.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    lora.add_argument("--syncs", type=int, default=5, help="timed syncs per run (after the first)")
    lora.add_argument("--repeats", type=int, default=2, help="runs per mode, alternating")
    lora.add_argument("--max-tokens", type=int, default=32, help="longest completion in the generation timing")
    lora.add_argument("--seed", type=int, default=0)
    lora.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (OMP_NUM_THREADS)")
    lora.add_argument("--model", help=argparse.SUPPRESS)
    lora.add_argument("--worker", choices=LORA_MODES, help=argparse.SUPPRESS)
    scale = sub.add_parser("scale", help="step time over processes, placements and schedules; sync cost over model sizes")
    add_rollout_batch_args(scale, steps=3, repeats=1, repeats_help="runs per setup, alternating order")
    scale.add_argument("--micro-batch", type=int, default=16, help="sequences per micro-batch and rank")
    scale.add_argument("--hidden", type=int, default=256, help="model of the step-time runs")
    scale.add_argument("--layers", type=int, default=4)
    scale.add_argument("--sizes", type=int, default=len(SYNC_SIZES), help="how many sync model sizes (about 1M, 10M, 100M)")
    scale.add_argument("--bucket-mb", type=int, default=32, help="weight-sync bucket size")
    scale.add_argument("--rounds", type=int, default=3, help="timed syncs per model size (after a warm-up one)")
    scale.add_argument("--threads", type=int, default=0,
                       help="torch threads per process (OMP_NUM_THREADS); 0: cores / processes")
    scale.add_argument("--plot", default=str(SCALE_PLOT), help="PNG of the figures")
    scale.add_argument("--seed", type=int, default=0)
    scale.add_argument("--worker", choices=("sync",), help=argparse.SUPPRESS)
    tp_sync = sub.add_parser("tp-sync", help="weight sync from ZeRO-3 into TP=1 replicas vs one TP=2 engine")
    tp_sync.add_argument("--sizes", type=int, default=len(SYNC_SIZES), help="how many model sizes (about 1M, 10M, 100M)")
    tp_sync.add_argument("--bucket-mb", type=int, default=32, help="weight-sync bucket size")
    tp_sync.add_argument("--rounds", type=int, default=3, help="timed syncs per run (after a warm-up one)")
    tp_sync.add_argument("--repeats", type=int, default=1, help="runs per layout, alternating order")
    tp_sync.add_argument("--plot", default=str(TP_SYNC_PLOT), help="PNG of the figures")
    for p in (dpo, grpo, lora, scale, tp_sync):
        p.add_argument("--output", default=str(RESULTS), help="results file (sections are merged)")
    args = parser.parse_args(argv)
    bench, worker, show = COMMANDS[args.command]
    if getattr(args, "worker", None):
        print(json.dumps(worker(args)))
        return 0
    result = bench(args)
    show(result)
    print(f"\nwrote section {args.command!r} of {merge_results(args.command, result, Path(args.output))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
