"""``math_verify``: 1.0 when the completion's final answer equals the ``answer`` column, else 0.0.

Built on Hugging Face's ``math-verify``: answers are parsed to SymPy (``\\boxed{}``,
plain numbers, fractions, decimals, LaTeX expressions, sets and intervals) and
compared for mathematical equivalence. A gold answer that cannot be parsed scores
``None`` (no opinion); a completion without a parseable answer scores 0.0.

Time limits: math-verify bounds its parsing and comparison with ``signal.alarm``,
which only works on a process's main thread. Rows are therefore checked in a pool of
worker processes (``workers``, default 2), where math-verify's own per-operation limit
(``timeout``) applies; in addition, a group of rows that overruns a hard limit kills
its worker, and those rows are reported as errors (a new worker starts next call).
"""

from __future__ import annotations

import logging
import queue
import re
from concurrent.futures import ThreadPoolExecutor

from posttrain.errors import UserError
from reward_models.calling import Outcome
from reward_models.registry import reward_factory
from reward_models.subproc import WorkerProcess
from reward_models.text import completion_text
from reward_models.types import Column, RewardOutput

log = logging.getLogger(__name__)

_ANCHORED = ("$", "\\boxed", "\\(", "\\[", "\\fbox")


def parse_gold(gold: str, timeout: int):
    """Parse a reference answer; bare LaTeX (``\\frac{3}{4}``, ``x^2+1``) is read as math mode."""
    from math_verify import parse

    # no_fallback: a gold answer that does not parse must abstain, not be compared as raw text.
    if not any(mark in gold for mark in _ANCHORED):
        parsed = parse(f"${gold}$", fallback_mode="no_fallback", parsing_timeout=timeout)
        if parsed:
            return parsed
    return parse(gold, fallback_mode="no_fallback", parsing_timeout=timeout)


def parse_prediction(text: str, boxed_only: bool, timeout: int):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    if boxed_only:
        if "\\boxed" not in text and "\\fbox" not in text:
            return []
        config = [LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)]
    else:
        config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return parse(text, extraction_config=config, parsing_timeout=timeout)


def answer_span(text: str, tag: str | None) -> str:
    """The content of the last ``<tag>...</tag>`` when there is one, else the text."""
    if tag:
        found = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, re.DOTALL)
        if found:
            return found[-1]
    return text


def check_group(gold: str, texts: list[str], boxed_only: bool, strict: bool,
                timeout: int) -> list[tuple[float | None, dict]]:
    """Score several completions against one gold answer (runs in a worker process's main thread)."""
    from math_verify import verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its timeouts are scored 0, not logged
    gold_parsed = parse_gold(gold, timeout)
    if not gold_parsed:
        return [(None, {"skipped": f"answer {gold!r} could not be parsed"})] * len(texts)
    out = []
    for text in texts:
        pred = parse_prediction(text, boxed_only, timeout)
        if not pred:
            out.append((0.0, {"gold": str(gold_parsed[0]), "parsed": None}))
            continue
        ok = verify(gold_parsed, pred, strict=strict, timeout_seconds=timeout)
        out.append((1.0 if ok else 0.0, {"gold": str(gold_parsed[0]), "parsed": str(pred[0])}))
    return out


class MathVerifier:
    """The reward: groups rows by gold answer and checks each group in a worker process."""

    __name__ = "math_verify"

    def __init__(self, *, workers: int, timeout: int, boxed_only: bool, strict: bool, column: str,
                 answer_tag: str | None) -> None:
        self.timeout, self.boxed_only, self.strict, self.column = timeout, boxed_only, strict, column
        self.answer_tag = answer_tag
        self.reward_columns = (Column(column, (str, int, float), "the reference answer (a string or number)"),)
        self._workers = [WorkerProcess("math_verify worker") for _ in range(workers)]
        self._free: queue.Queue = queue.Queue()
        for worker in self._workers:
            self._free.put(worker)

    def _check(self, gold: str, texts: list[str]) -> Outcome:
        # math-verify bounds each parse and comparison; this limit catches what escapes it
        # (the first call also imports math-verify, about a second).
        hard_limit = self.timeout * (2 + 4 * len(texts)) + 10
        worker = self._free.get()
        try:
            return worker.call("reward_models.math_answer:check_group", gold, texts, self.boxed_only,
                               self.strict, self.timeout, timeout=hard_limit)
        finally:
            self._free.put(worker)

    def __call__(self, prompts: list, completions: list, **columns) -> RewardOutput:
        golds = columns.get(self.column)
        if golds is None:
            raise KeyError(f"math_verify needs a {self.column!r} column with the reference answers")
        scores: list[float | None] = [None] * len(completions)
        info: list[dict] = [{} for _ in completions]
        errors: dict[int, str] = {}
        groups: dict[str, list[int]] = {}
        for i, gold in enumerate(golds):
            if gold is None or isinstance(gold, bool) or not isinstance(gold, (str, int, float)):
                info[i] = {"skipped": f"no usable answer ({gold!r})"}
                continue
            groups.setdefault(str(gold), []).append(i)
        jobs = [(gold, [answer_span(completion_text(completions[i]), self.answer_tag) for i in rows])
                for gold, rows in groups.items()]
        with ThreadPoolExecutor(max_workers=len(self._workers)) as pool:
            outcomes = list(pool.map(lambda job: self._check(*job), jobs))
        for rows, outcome in zip(groups.values(), outcomes, strict=True):
            if outcome.kind != "ok":
                errors.update({i: f"math_verify {outcome.kind}: {outcome.message}" for i in rows})
                continue
            for i, (score, row_info) in zip(rows, outcome.value, strict=True):
                scores[i], info[i] = score, row_info
        return RewardOutput(scores, info, errors)

    def close(self) -> None:
        for worker in self._workers:
            worker.close()


@reward_factory
def math_verify(*, workers: int = 2, timeout: int = 5, boxed_only: bool = False, strict: bool = True,
                column: str = "answer", answer_tag: str | None = "answer") -> MathVerifier:
    """Build the reward.

    ``workers``: processes checking answers; ``timeout``: math-verify's limit per parse or
    comparison, seconds; ``boxed_only``: only a ``\\boxed{}`` answer counts; ``strict``:
    math-verify's strict mode (variables must match; off lets ``x=1`` equal ``1``);
    ``column``: the column holding reference answers; ``answer_tag``: when the completion has
    ``<answer>...</answer>`` (this tag), only the last such span is read (None: always the whole text).
    """
    if not isinstance(workers, int) or workers < 1:
        raise UserError(f"math_verify: workers must be a positive integer, got {workers!r}.")
    if not isinstance(timeout, int) or timeout < 1:
        raise UserError(f"math_verify: timeout must be a positive integer (seconds), got {timeout!r}.")
    return MathVerifier(workers=workers, timeout=timeout, boxed_only=boxed_only, strict=strict, column=column,
                        answer_tag=answer_tag)
