"""``posttrain pairs``: sample candidates with vLLM, score them with rewards, write preference pairs.

    posttrain pairs runs/quickstart/data/rl.jsonl --model runs/quickstart/sft/checkpoints/last/model \\
        --reward math_verify --num-samples 8 --selection rso --beta 0.5 --num-select 4 -o runs/rso/pairs.jsonl

For every prompt, ``--num-samples`` completions are sampled from ``--model`` (vLLM), scored with the rewards
(named as in ``posttrain score``), and pairs are chosen among them by ``--selection``: ``rso`` (statistical
rejection sampling from pi* proportional to pi_sft exp(r / beta), then tournament pairs; Liu et al., 2023),
``best_worst`` (highest against lowest reward) or ``random_pairs`` (uniform SFT samples, ranked by reward). Each
output row is ``prompt``, ``chosen``, ``rejected``, ``chosen_reward``, ``rejected_reward`` and the input row's
other columns: the paired format ``trainer: dpo`` reads (recipes/rso.yaml). The same seed gives the same file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

from posttrain.cli.score import (
    RESERVED,
    add_reward_options,
    atomic_output,
    check_reward_columns,
    reward_set_from_args,
)
from posttrain.errors import DataError, UserError

# Columns this command writes, and keyword arguments the reward call takes besides the data's own columns.
OUTPUT_FIELDS = ("chosen", "rejected", "chosen_reward", "rejected_reward")
SCORE_ARGUMENTS = (*RESERVED, "groups", "row_ids", "reduce_sum", "completion_ids")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "pairs", help="sample completions with vLLM, score them, write preference pairs (RSO, best-vs-worst)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", metavar="PROMPTS.jsonl",
                        help="rows with 'prompt' (a string or messages) plus the columns the rewards read")
    parser.add_argument("--model", required=True, metavar="DIR", help="model directory to sample from (the SFT "
                        "policy, e.g. runs/quickstart/sft/checkpoints/last/model)")
    parser.add_argument("--output", "-o", required=True, metavar="OUT.jsonl", help="where to write the pairs")
    add_reward_options(parser)
    parser.add_argument("--num-samples", "-n", type=int, default=8, metavar="N",
                        help="candidates sampled per prompt (default 8; the RSO paper used 64)")
    parser.add_argument("--selection", default="rso", metavar="NAME",
                        help="rso, best_worst or random_pairs (PAIR_SELECTIONS; default rso)")
    parser.add_argument("--pairing", choices=("tournament", "all_pairs"), default="tournament",
                        help="how rso and random_pairs pair the selected candidates: consecutive pairs "
                             "(tournament, default) or every pair (all_pairs)")
    parser.add_argument("--beta", type=float, default=0.5,
                        help="rso's temperature: accept with probability exp((r - r_max) / beta); large is uniform, "
                             "small keeps the best (default 0.5, in reward units)")
    parser.add_argument("--num-select", type=int, default=4, metavar="K",
                        help="candidates rso and random_pairs select per prompt (default 4: two tournament pairs)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    parser.add_argument("--max-tokens", type=int, default=256, help="longest completion (default 256)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--batch-size", type=int, default=32, metavar="P",
                        help="prompts per generate and reward call (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling and selection (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_pairs, rewards=None)
    return parser


def selection_seed(seed: int, prompt_index: int) -> int:
    """The seed of prompt ``prompt_index``'s pair selection: fixed by ``seed`` and the prompt's position alone,
    so the batch size does not change the pairs."""
    digest = hashlib.blake2b(f"pairs:{seed}:{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _check_args(args: argparse.Namespace) -> None:
    from posttrain.algorithms import PAIR_SELECTIONS

    PAIR_SELECTIONS.get(args.selection)  # an unknown name: one line naming the valid ones
    if args.num_samples < 2:
        raise UserError(f"--num-samples must be at least 2 (a pair needs two candidates), got {args.num_samples}.")
    if args.num_select < 2:
        raise UserError(f"--num-select must be at least 2 (a pair needs two candidates), got {args.num_select}.")
    if not args.beta > 0:
        raise UserError(f"--beta must be positive, got {args.beta}.")
    if args.max_tokens < 1 or args.batch_size < 1 or args.workers < 1:
        raise UserError("--max-tokens, --batch-size and --workers must be at least 1.")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}.")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}.")


def _check_row(row, columns: dict) -> None:
    from posttrain.data.formats import check_prompt_only

    check_prompt_only(row)
    for name in SCORE_ARGUMENTS:
        if name in row.data:
            raise DataError(f"{row.where}: field {name!r} is reserved (rewards receive it as an argument); "
                            "rename it.")
    for name in OUTPUT_FIELDS:
        if name in row.data:
            raise DataError(f"{row.where}: field {name!r} is written by `posttrain pairs`; rename or drop it "
                            "(the input is prompt-only: 'prompt' plus the columns the rewards read).")
    check_reward_columns(row.where, row.data, columns)


def _completion(prompt: object, text: str) -> object:
    """A completion in the prompt's format: an assistant message for conversational prompts, else the text."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def run_pairs(args: argparse.Namespace) -> int:
    _check_args(args)
    from posttrain.distributed import configure_environment

    configure_environment()
    import torch
    from tqdm import tqdm

    from posttrain.algorithms import select_pairs
    from posttrain.data.loading import load_rows
    from posttrain.models.loading import check_model_path
    from posttrain.rollout import RolloutConfig, RolloutEngine

    check_model_path(args.model)
    dst = Path(args.output)
    if not dst.parent.is_dir():
        raise UserError(f"the output directory {str(dst.parent)!r} does not exist.")
    start = time.monotonic()
    rows = load_rows(args.prompts)[: args.limit]
    n = args.num_samples
    with reward_set_from_args(args) as rewards:
        columns = rewards.columns()
        for row in rows:
            _check_row(row, columns)
        engine = RolloutEngine(args.model, RolloutConfig(n=n, temperature=args.temperature, max_tokens=args.max_tokens,
                                                         seed=args.seed, enforce_eager=True))
        written, unpaired, chosen_sum, rejected_sum = 0, 0, 0.0, 0.0
        with atomic_output(dst) as out, \
                tqdm(total=len(rows), desc="sampling", unit="prompt", file=sys.stderr,
                     disable=args.no_progress) as progress:
            for first in range(0, len(rows), args.batch_size):
                chunk = rows[first:first + args.batch_size]
                progress.set_description("sampling")
                # vLLM seeds sample j of a prompt with its seed + j: prompts sit n apart, as in generate(seed=).
                batch = engine.generate([r.data["prompt"] for r in chunk],
                                        seeds=[args.seed + (first + i) * n for i in range(len(chunk))])
                progress.set_description("scoring")
                extra = sorted({k for r in chunk for k in r.data if k != "prompt"})
                scores = rewards.score(
                    [chunk[s.group].data["prompt"] for s in batch],
                    [_completion(chunk[s.group].data["prompt"], s.text) for s in batch],  # TRL's form
                    groups=[s.group for s in batch], row_ids=[chunk[s.group].number for s in batch],
                    completion_ids=[s.completion_ids for s in batch],
                    **{k: [chunk[s.group].data.get(k) for s in batch] for k in extra})
                totals = [math.nan if t is None or not math.isfinite(t) else float(t) for t in scores.totals]
                for group, row in enumerate(chunk):
                    texts = [s.text for s in batch[group * n:(group + 1) * n]]
                    values = totals[group * n:(group + 1) * n]
                    generator = torch.Generator().manual_seed(selection_seed(args.seed, first + group))
                    pairs = select_pairs(args.selection, torch.tensor(values, dtype=torch.float64),
                                         num_select=args.num_select, beta=args.beta, generator=generator,
                                         pairing=args.pairing)
                    unpaired += not pairs
                    prompt = row.data["prompt"]
                    others = {k: v for k, v in row.data.items() if k != "prompt"}
                    for chosen, rejected in pairs:
                        record = {"prompt": prompt, "chosen": _completion(prompt, texts[chosen]),
                                  "rejected": _completion(prompt, texts[rejected]),
                                  "chosen_reward": values[chosen], "rejected_reward": values[rejected], **others}
                        out.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
                        written += 1
                        chosen_sum += values[chosen]
                        rejected_sum += values[rejected]
                progress.update(len(chunk))
    elapsed = time.monotonic() - start
    means = (f"; mean reward chosen {chosen_sum / written:.4f}, rejected {rejected_sum / written:.4f}"
             if written else "")
    print(f"{len(rows)} prompts, {len(rows) * n} samples, {written} pairs ({args.selection}) in {elapsed:.1f} s; "
          f"{unpaired} prompts gave no pair (every scored candidate tied, or fewer than two scored){means}; "
          f"wrote {dst}", file=sys.stderr)
    if not written:
        print("warning: no pairs were written: the rewards did not separate any prompt's candidates "
              "(raise --num-samples or --temperature, or use a graded reward)", file=sys.stderr)
    return 0
