"""``posttrain make-data``: write a small synthetic dataset with verifiable answers."""

from __future__ import annotations

import argparse

from posttrain.errors import UserError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "make-data",
        help="write a synthetic task (train.jsonl, test.jsonl) for quickstarts and tests",
        description="Write train.jsonl and test.jsonl (no question in both) for a synthetic task: "
        "arithmetic or largest (`messages` for SFT, `prompt` for RL, `answer` for a verifiable reward), preference "
        "(`prompt`, `chosen`, `rejected`: DPO, reward models), kto (`prompt`, `completion`, `label`), "
        "listwise (`prompt`, `completions`, `ranks`: four answers ranked by distance from the right sum, reward "
        "models), "
        "process (`prompt`, `completions`, `labels`: process reward models), code (`prompt`, `tests`, "
        "`entry_point`: the unit_test reward) or instruct (`prompt`, `references`: the bleu reward); code and "
        "instruct rows also carry `messages` with the reference answer, for SFT.",
    )
    parser.add_argument("task", help="task name: arithmetic, largest, preference, kto, listwise, process, code or instruct")
    parser.add_argument("out_dir", help="directory to write to")
    parser.add_argument("--train", type=int, default=2000, help="training rows (default 2000)")
    parser.add_argument("--test", type=int, default=200, help="held-out rows (default 200)")
    parser.add_argument("--max-operand", type=int,
                        help="largest number in a question (default 20; 50 for largest; code and instruct constants)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from posttrain.data.synthetic import TASKS, write_task

    if args.task not in TASKS:
        raise UserError(f"unknown task {args.task!r}; available: {', '.join(TASKS)}.")
    options = {} if args.max_operand is None else {"max_operand": args.max_operand}
    paths = write_task(args.task, args.out_dir, train=args.train, test=args.test, seed=args.seed, **options)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0
