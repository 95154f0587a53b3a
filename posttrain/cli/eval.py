"""``posttrain eval``: generate with vLLM for a prompt file and a model, score with rewards, report pass@k."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from posttrain.cli.score import add_reward_options, reward_set_from_args
from posttrain.errors import UserError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="generate for a prompt file with vLLM and score with rewards (mean reward, pass@k)",
        description="Generate n completions per prompt with vLLM from a Hugging Face model directory (e.g. "
        "runs/grpo/checkpoints/last/model), score them with the named rewards, print mean reward and pass@k "
        "(a sample passes when its reward >= --pass-threshold), and write one JSONL row per sample.",
        epilog="example: posttrain eval runs/grpo/checkpoints/last/model data/test.jsonl --reward math_verify "
        "-n 4 --temperature 1.0 -o eval.jsonl")
    parser.add_argument("model", help="model directory (weights + tokenizer)")
    parser.add_argument("prompts", metavar="PROMPTS.jsonl", help="rows with 'prompt' plus the columns the rewards read")
    parser.add_argument("--output", "-o", required=True, metavar="OUT.jsonl", help="where to write the samples")
    add_reward_options(parser)
    parser.add_argument("-n", type=int, default=1, help="samples per prompt (default 1)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    parser.add_argument("--max-tokens", type=int, default=256, help="longest completion (default 256)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pass-threshold", type=float, default=1.0, help="reward that counts as a pass (default 1)")
    parser.set_defaults(func=run_eval, rewards=None)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c passing: 1 - C(n-c, k) / C(n, k)
    (Evaluating Large Language Models Trained on Code, Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def run_eval(args: argparse.Namespace) -> int:
    from posttrain.distributed import configure_environment

    configure_environment()
    from posttrain.data.formats import check_prompt_only
    from posttrain.data.loading import load_rows
    from posttrain.models.loading import check_model_path
    from posttrain.rollout import RolloutConfig, RolloutEngine
    from posttrain.trainers.online import PromptRow, score_samples

    if args.n < 1 or args.max_tokens < 1:
        raise UserError("-n and --max-tokens must be at least 1.")
    check_model_path(args.model)
    dst = Path(args.output)
    if not dst.parent.is_dir():
        raise UserError(f"the output directory {str(dst.parent)!r} does not exist.")
    rows = load_rows(args.prompts)[: args.limit]
    for row in rows:
        check_prompt_only(row)
    prompts = [PromptRow(r.data["prompt"], 0, {k: v for k, v in r.data.items() if k != "prompt"}, r.where) for r in rows]
    with reward_set_from_args(args) as rewards:
        engine = RolloutEngine(args.model, RolloutConfig(n=args.n, temperature=args.temperature,
                                                         max_tokens=args.max_tokens, seed=args.seed, enforce_eager=True))
        batch = engine.generate([p.prompt for p in prompts], seed=args.seed)
        totals, means, scores = score_samples(rewards, prompts, batch)
    passed = [[] for _ in prompts]
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        for i, sample in enumerate(batch):
            reward = None if math.isnan(totals[i]) else float(totals[i])
            passed[sample.group].append(reward is not None and reward >= args.pass_threshold)
            row = dict(rows[sample.group].data, sample=sample.index, completion=sample.text, reward=reward,
                       reward_info=scores.reward_info(i), finish_reason=sample.finish_reason)
            out.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, dst)
    finite = [float(t) for t in totals if not math.isnan(t)]
    report = {"prompts": len(prompts), "samples": len(batch), "mean_reward": sum(finite) / max(len(finite), 1),
              **{k: v for k, v in means.items()}}
    for k in sorted({1, args.n}):
        report[f"pass@{k}"] = sum(pass_at_k(len(p), sum(p), k) for p in passed) / max(len(passed), 1)
    summary = dst.with_suffix(".summary.json")
    summary.write_text(json.dumps(report, indent=2) + "\n")
    for key, value in report.items():
        print(f"{key:>16}: {value:.4f}" if isinstance(value, float) else f"{key:>16}: {value}")
    print(f"wrote {dst} and {summary}", file=sys.stderr)
    return 0
