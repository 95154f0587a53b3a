"""Small synthetic tasks with verifiable answers, for quickstarts, tests and benchmarks.

``arithmetic``: "What is a + b?" answered as "a + b = c. The answer is \\boxed{c}."
Each row carries ``messages`` (SFT), ``prompt`` (a user turn, for RL) and
``answer`` (for the ``math_verify`` reward), so one file serves every stage.

``largest``: "What is the largest of 24, 48, 26 and 2?" answered as "The largest is 48.
The answer is \\boxed{48}." (four distinct numbers up to ``max_operand``, default 50). The
RL quickstart's task: the skill (compare magnitudes, copy the winner) carries over to
questions never seen, so what RL learns on its prompts shows on held-out ones.

``preference`` (DPO, reward models) and ``kto`` (unpaired) ask the same sums in
several phrasings, most of which the arithmetic SFT data never uses; the
right answer is in the SFT format, the wrong ones are what a small model
writes when it fails (a wrong sum, a malformed answer). Preference data then
has something to teach that carries over to held-out questions: answer every
phrasing in the trained format with the right sum.

``listwise`` (reward models on ranked lists): the same questions with four answers each, ranked by
how far the answer's sum is from the right one (see ``listwise_rows``).

``process`` (PRM): a sum of several terms worked out step by step, some steps
wrong, each step labelled.

``code`` (``unit_test`` reward) and ``instruct`` (``bleu`` reward, BLEUBERI) live in
``synthetic_code`` and ``synthetic_instruct``; their rows also carry ``messages`` with the
canonical answer, for SFT before RL.

Train and test never share a question: questions with the same numbers count
as the same question, whatever the phrasing.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from posttrain.data.synthetic_code import code_rows
from posttrain.data.synthetic_instruct import instruct_rows

ANSWER_FORMAT = re.compile(r"^-?\d+ [+-] -?\d+ = -?\d+\. The answer is \\boxed\{-?\d+\}\.$")

LARGEST_FORMAT = re.compile(r"^The largest is -?\d+\. The answer is \\boxed\{-?\d+\}\.$")

# What a completion in the trained format looks like, per task (the quickstart reports the share).
ANSWER_FORMATS = {"arithmetic": ANSWER_FORMAT, "largest": LARGEST_FORMAT}

QUESTION_PHRASINGS = ("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} + {b}.", "What is the sum of {a} and {b}?",
                      "{a} + {b} = ?")


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


def largest_row(rng: random.Random, max_operand: int, count: int = 4) -> dict:
    numbers = rng.sample(range(max_operand + 1), count)
    listed = ", ".join(str(x) for x in numbers[:-1]) + f" and {numbers[-1]}"
    question = f"What is the largest of {listed}?"
    top = max(numbers)
    answer = f"The largest is {top}. The answer is \\boxed{{{top}}}."
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        "prompt": [{"role": "user", "content": question}],
        "answer": str(top),
    }


def largest_rows(n: int, *, seed: int = 0, max_operand: int = 50) -> list[dict]:
    rng = random.Random(seed)
    return [largest_row(rng, max_operand) for _ in range(n)]


def _right_answer(a: int, b: int) -> str:
    return f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."


def _wrong_answer(rng: random.Random, a: int, b: int) -> str:
    """A wrong answer as a small model writes one: half the time the right format with a sum off by 8 to 30
    (never negative), else a malformed answer (an operand and a stray brace; or a dropped operand and a wrong sum)."""
    wrong = a + b + rng.choice([-1, 1]) * rng.randint(8, 30)
    if wrong < 0:
        wrong = a + b + rng.randint(8, 30)
    kind = rng.random()
    if kind < 0.5:
        return f"{a} + {b} = {wrong}. The answer is \\boxed{{{wrong}}}."
    if kind < 0.75:
        return f"{rng.choice([a, b])}}}."
    return f"{a} = {wrong}. The answer is \\boxed{{{wrong}}}."


def _question(rng: random.Random, max_operand: int) -> tuple[int, int, list[dict]]:
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    return a, b, [{"role": "user", "content": rng.choice(QUESTION_PHRASINGS).format(a=a, b=b)}]


def preference_rows(n: int, *, seed: int = 0, max_operand: int = 20) -> list[dict]:
    """Pairs whose chosen answer is right (SFT format) and rejected answer wrong (see ``_wrong_answer``).

    Also carries ``answer`` so greedy accuracy can be measured on the same prompts.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, prompt = _question(rng, max_operand)
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": _right_answer(a, b)}],
                     "rejected": [{"role": "assistant", "content": _wrong_answer(rng, a, b)}],
                     "answer": str(a + b)})
    return rows


def kto_rows(n: int, *, seed: int = 0, max_operand: int = 20) -> list[dict]:
    """Unpaired rows (KTO): one answer per question, right (``label: true``) or wrong (``false``), half each."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, prompt = _question(rng, max_operand)
        good = rng.random() < 0.5
        completion = _right_answer(a, b) if good else _wrong_answer(rng, a, b)
        rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": completion}], "label": good,
                     "answer": str(a + b)})
    return rows


def _listwise_answer(rng: random.Random, a: int, b: int, offset: int) -> tuple[str, int | None]:
    """An answer whose sum is off by ``offset`` and the number it gives (None: no number at all). Off answers
    come as a small model writes them: the trained format, a dropped operand, or (for the farthest) a
    malformed answer with no sum."""
    claimed = a + b + offset
    if offset == 0:
        return _right_answer(a, b), claimed
    kind = rng.random()
    if kind < 0.6:
        return f"{a} + {b} = {claimed}. The answer is \\boxed{{{claimed}}}.", claimed
    if kind < 0.85 or abs(offset) < 20:
        return f"{a} = {claimed}. The answer is \\boxed{{{claimed}}}.", claimed
    return f"{rng.choice([a, b])}}}.", None


def listwise_rows(n: int, *, seed: int = 0, max_operand: int = 20) -> list[dict]:
    """Lists of K = 4 answers to one question, ranked by distance from the right sum: the right answer, one off
    by 1 to 7, one by 8 to 19, one by 20 to 40 (never negative), in random order. ``ranks`` are 1 (best) to 4
    (distinct: the distance bands do not overlap, and only the farthest answer may be malformed, with no
    sum, which counts as farthest of all). Also carries ``answer``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, prompt = _question(rng, max_operand)
        offsets = [0] + [rng.choice([-1, 1]) * rng.randint(lo, hi) for lo, hi in ((1, 7), (8, 19), (20, 40))]
        offsets = [d if a + b + d >= 0 else -d for d in offsets]
        answers = [_listwise_answer(rng, a, b, d) for d in offsets]
        rng.shuffle(answers)
        distance = [float("inf") if x is None else abs(x - (a + b)) for _, x in answers]
        ranks = [1 + sum(other < d for other in distance) for d in distance]  # competition ranks
        rows.append({"prompt": prompt, "completions": [[{"role": "assistant", "content": text}] for text, _ in answers],
                     "ranks": ranks, "answer": str(a + b)})
    return rows


def process_rows(n: int, *, seed: int = 0, max_operand: int = 20) -> list[dict]:
    """PRM rows: a sum worked out in steps; half the rows have one step off by 5 to 15, and every step
    from the first error on is labelled false (the solution can no longer be right).

    Terms go up to max_operand / 2, so every running total stays within the sums the arithmetic task
    teaches (up to 2 x max_operand): the PRM starts from a model that can check such a step."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        terms = [rng.randint(0, max_operand // 2) for _ in range(rng.randint(3, 4))]
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


TASKS = {"arithmetic": arithmetic_rows, "largest": largest_rows, "preference": preference_rows, "kto": kto_rows,
         "listwise": listwise_rows, "process": process_rows,
         "code": code_rows, "instruct": instruct_rows}


def question_key(row: dict) -> tuple[str, ...]:
    """The numbers a question asks about: two rows with the same ones ask the same question."""
    return tuple(re.findall(r"\d+", json.dumps(row["prompt"])))


def prompt_key(row: dict) -> tuple[str, ...]:
    """The prompt itself (tasks whose questions differ by more than their numbers)."""
    return (json.dumps(row["prompt"]),)


TASK_KEYS = {"code": prompt_key, "instruct": prompt_key}


def write_task(task: str, out_dir: str | Path, *, train: int, test: int, seed: int = 0, **kwargs) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` (disjoint questions) for ``task``."""
    key_of = TASK_KEYS.get(task, question_key)
    rows = TASKS[task](train + test * 3, seed=seed, **kwargs)
    seen, unique = set(), []
    for row in rows:  # keep test questions out of the training set
        key = key_of(row)
        if key not in seen:
            seen.add(key)
            unique.append(row)
    test_rows = unique[:test]
    test_keys = {key_of(r) for r in test_rows}
    train_rows = [r for r in TASKS[task](train * 2, seed=seed + 1, **kwargs) if key_of(r) not in test_keys]
    train_rows = train_rows[:train]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, part in (("train", train_rows), ("test", test_rows)):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
        paths[name] = path
    return paths
