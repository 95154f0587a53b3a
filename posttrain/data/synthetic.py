"""Small synthetic tasks with verifiable answers, for quickstarts, tests and benchmarks.

``arithmetic``: "What is a + b?" answered as "a + b = c. The answer is \\boxed{c}."
Each row carries ``messages`` (SFT), ``prompt`` (a user turn, for RL) and
``answer`` (for the ``math_verify`` reward), so one file serves every stage.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

ANSWER_FORMAT = re.compile(r"^-?\d+ [+-] -?\d+ = -?\d+\. The answer is \\boxed\{-?\d+\}\.$")


def arithmetic_row(rng: random.Random, max_operand: int) -> dict:
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    question = f"What is {a} + {b}?"
    answer = f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        "prompt": [{"role": "user", "content": question}],
        "answer": str(a + b),
    }


def arithmetic_rows(n: int, *, seed: int = 0, max_operand: int = 20) -> list[dict]:
    rng = random.Random(seed)
    return [arithmetic_row(rng, max_operand) for _ in range(n)]


def preference_rows(n: int, *, seed: int = 0, max_operand: int = 20) -> list[dict]:
    """Pairs whose chosen answer is right and rejected answer wrong by 8 to 30 (either way, never negative).

    Wrong by a clear margin, so a tiny model with an approximate sense of sums can tell them apart.

    Also carries ``answer`` so greedy accuracy can be measured on the same prompts.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        wrong = a + b + rng.choice([-1, 1]) * rng.randint(8, 30)
        if wrong < 0:
            wrong = a + b + rng.randint(8, 30)
        rows.append({
            "prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
            "chosen": [{"role": "assistant", "content": f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."}],
            "rejected": [{"role": "assistant", "content": f"{a} + {b} = {wrong}. The answer is \\boxed{{{wrong}}}."}],
            "answer": str(a + b),
        })
    return rows


def process_rows(n: int, *, seed: int = 0, max_operand: int = 20) -> list[dict]:
    """PRM rows: a sum worked out in steps; half the rows have one step off by 5 to 15, and every step
    from the first error on is labelled false (the solution can no longer be right)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        terms = [rng.randint(0, max_operand) for _ in range(rng.randint(3, 4))]
        steps, labels, total, broken = [], [], terms[0], False
        error_at = rng.randint(1, len(terms) - 1) if rng.random() < 0.5 else None
        for i, term in enumerate(terms[1:], start=1):
            right = total + term
            claimed = right + rng.choice([-1, 1]) * rng.randint(5, 15) if i == error_at else right
            broken = broken or claimed != right
            steps.append(f"{total} + {term} = {claimed}")
            labels.append(not broken)
            total = claimed
        question = "What is " + " + ".join(str(t) for t in terms) + "?"
        rows.append({"prompt": question, "completions": steps, "labels": labels})
    return rows


TASKS = {"arithmetic": arithmetic_rows, "preference": preference_rows, "process": process_rows}


def write_task(task: str, out_dir: str | Path, *, train: int, test: int, seed: int = 0, **kwargs) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` (disjoint questions) for ``task``."""
    rows = TASKS[task](train + test * 3, seed=seed, **kwargs)
    seen, unique = set(), []
    for row in rows:  # keep test questions out of the training set
        key = json.dumps(row["prompt"])
        if key not in seen:
            seen.add(key)
            unique.append(row)
    test_rows = unique[:test]
    test_keys = {json.dumps(r["prompt"]) for r in test_rows}
    train_rows = [r for r in TASKS[task](train * 2, seed=seed + 1, **kwargs) if json.dumps(r["prompt"]) not in test_keys]
    train_rows = train_rows[:train]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, part in (("train", train_rows), ("test", test_rows)):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
        paths[name] = path
    return paths
