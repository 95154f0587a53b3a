"""``code_efficiency``: correctness from the unit tests plus a runtime term against a reference solution.

After ACECode (Yang et al., 2024, "ACECode: A Reinforcement Learning Framework for Aligning Code
Efficiency and Correctness in Code Language Models"): a training-free reward from execution feedback
that rewards code for passing its tests and for running faster than the original code. Our form:

    p        = the fraction of tests passed (the lowest over the repeats)
    t, t_ref = median CPU seconds of the completion and of the row's reference solution, each run
               ``repeats`` times against the same tests, interleaved, every run in a fresh sandbox
    speedup  = min(t_ref / t, max_speedup)
    reward   = (1 - w) * p + w * [p == 1] * speedup / max_speedup,    w = efficiency_weight

So a wrong program scores at most ``(1 - w)`` times its pass rate, a correct one at least ``1 - w``,
and a correct one scores more the faster it runs, up to ``max_speedup`` times the reference's speed.
CPU time is the kernel's count for the solution process and every process it started (the harness
reaps them all), measured outside the solution's reach; runs never share a file system, so a program
cannot cache answers from one run for the next. The noise of the measurement on our machines is in
docs/rewards.md.
"""

from __future__ import annotations

import statistics

from posttrain.errors import UserError
from reward_models.registry import reward_factory
from reward_models.types import Column, RewardOutput
from reward_models.unit_test import UnitTestReward, judge, unit_test


def efficiency_score(passed: float, seconds: float, reference_seconds: float, efficiency_weight: float,
                     max_speedup: float) -> tuple[float, float]:
    """``(reward, speedup)`` from the pass rate and the two median CPU times (formula in the module docstring)."""
    speedup = max_speedup if seconds <= 0 else min(reference_seconds / seconds, max_speedup)
    bonus = speedup / max_speedup if passed == 1.0 else 0.0
    return (1 - efficiency_weight) * passed + efficiency_weight * bonus, speedup


class CodeEfficiencyReward:
    """Runs every row's completion and reference ``repeats`` times each in the unit-test sandbox."""

    __name__ = "code_efficiency"

    def __init__(self, runner: UnitTestReward, repeats: int, efficiency_weight: float, max_speedup: float,
                 reference_column: str) -> None:
        self.runner = runner
        self.repeats = repeats
        self.efficiency_weight = efficiency_weight
        self.max_speedup = max_speedup
        self.reference_column = reference_column
        self.reward_columns = (*runner.reward_columns,
                               Column(reference_column, (str,), "a correct reference solution (Python source)"))

    def score(self, passed: float, seconds: float, reference_seconds: float) -> tuple[float, float]:
        return efficiency_score(passed, seconds, reference_seconds, self.efficiency_weight, self.max_speedup)

    def __call__(self, prompts: list, completions: list, tests: list | None = None,
                 entry_point: list | None = None, **columns) -> RewardOutput:
        if tests is None:
            raise KeyError("code_efficiency needs a 'tests' column (test source, or a list of test snippets)")
        references = columns.get(self.reference_column)
        if references is None:
            raise KeyError(f"code_efficiency needs a {self.reference_column!r} column (a reference solution)")
        entry_points = entry_point if entry_point is not None else [None] * len(completions)
        pool = self.runner._get_pool()
        pending = []
        for i, (completion, row_tests, reference, entry) in enumerate(
                zip(completions, tests, references, entry_points, strict=True)):
            if not row_tests or not reference:
                pending.append((i, None))
                continue
            runs = {"completion": [], "reference": []}
            for _ in range(self.repeats):  # interleaved: both sides see the same machine load
                for side, code in (("completion", completion), ("reference", reference)):
                    job, nonce, total = self.runner.job(code, row_tests, entry or self.runner.entry_point)
                    runs[side].append((pool.submit(job), nonce, total))
            pending.append((i, runs))
        scores: list[float | None] = [None] * len(completions)
        info: list[dict] = [{} for _ in completions]
        errors: dict[int, str] = {}
        for i, runs in pending:
            if runs is None:
                info[i] = {"skipped": "no tests or no reference solution"}
                continue
            results = {side: [judge(f.result(), nonce, total) for f, nonce, total in jobs]
                       for side, jobs in runs.items()}
            scores[i], info[i], error = self._row(results)
            if error:
                errors[i] = error
        return RewardOutput(scores, info, errors=errors)

    def _row(self, results: dict) -> tuple[float | None, dict, str | None]:
        reference = results["reference"]
        if any(score != 1.0 for score, _ in reference):
            verdict = next(i for s, i in reference if s != 1.0)
            return None, {"reference": verdict}, (
                f"the reference solution does not pass its tests ({verdict.get('verdict')}: "
                f"{verdict.get('error', verdict.get('detail', ''))})")
        passed = min(score for score, _ in results["completion"])
        first = dict(results["completion"][0][1])
        seconds = [i.get("solution_cpu_seconds") for _, i in results["completion"]]
        reference_seconds = [i.get("solution_cpu_seconds") for _, i in reference]
        if passed < 1.0 or None in seconds or None in reference_seconds:
            score, _ = self.score(passed, 1.0, 1.0)
            return score, first, None
        t, t_ref = statistics.median(seconds), statistics.median(reference_seconds)
        score, speedup = self.score(passed, t, t_ref)
        first.update(cpu_seconds=round(t, 6), reference_cpu_seconds=round(t_ref, 6), speedup=round(speedup, 4),
                     cpu_spread=round((max(seconds) - min(seconds)) / t, 4) if t > 0 else 0.0)
        return score, first, None

    def close(self) -> None:
        self.runner.close()


@reward_factory
def code_efficiency(*, repeats: int = 5, efficiency_weight: float = 0.5, max_speedup: float = 2.0,
                    reference_column: str = "reference_solution", **unit_test_args) -> CodeEfficiencyReward:
    """Build the reward.

    ``repeats``: runs of each side per row (median CPU time); ``efficiency_weight``: the share of the
    reward the runtime term can move; ``max_speedup``: the speedup over the reference that earns the
    whole runtime term; ``reference_column``: the column holding the reference solution. The other
    settings are ``unit_test``'s (``workers``, ``timeout``, ``memory_mb``, ``strict``, ...).
    """
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise UserError(f"code_efficiency: repeats must be a positive integer, got {repeats!r}.")
    if not 0.0 <= float(efficiency_weight) <= 1.0:
        raise UserError(f"code_efficiency: efficiency_weight must be in [0, 1], got {efficiency_weight!r}.")
    if not float(max_speedup) >= 1.0:
        raise UserError(f"code_efficiency: max_speedup must be at least 1, got {max_speedup!r}.")
    runner = unit_test(**unit_test_args)
    return CodeEfficiencyReward(runner, repeats, float(efficiency_weight), float(max_speedup), reference_column)
