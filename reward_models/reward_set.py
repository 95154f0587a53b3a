"""``RewardSet``: several weighted rewards scored together, with a failure policy and a report.

A trainer builds one from its recipe and calls ``score`` once per batch of rollouts:

    rewards = RewardSet([RewardSpec("math_verify", weight=1.0),
                         RewardSpec("format", weight=0.2, args={"pattern": r"<think>.*</think>.*"})])
    result = rewards.score(prompts, completions, answer=answers, completion_ids=ids)
    result.totals        # one float | None per sample
    result.scores        # {"math_verify": [...], "format": [...]}: each reward's own column
    result.issues        # [RewardIssue(reward, row, kind, message), ...]

Rewards run concurrently (sync ones in threads, ``async def`` ones on the event loop).
A reward that raises, times out, or returns NaN / a non-number / the wrong number of
values produces ``RewardIssue``s that name the reward and the row. When a batch call
raises, each row is retried alone so the failing rows are named and the others keep
their scores. ``on_error="fail"`` raises ``RewardFailure`` (a ``UserError``) on the
first issue; ``on_error="zero"`` scores those rows 0.0, logs a warning and counts them.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from posttrain.errors import UserError
from reward_models.calling import ISOLATIONS, Outcome, RowProblem, call, check_values
from reward_models.combine import RULES, combine, ensemble_column, objective_totals
from reward_models.loading import Reward, load_reward_with_defaults
from reward_models.types import Column

log = logging.getLogger(__name__)

POLICIES = ("fail", "zero")
DEFAULT_TIMEOUT = 600.0
_LOGGED_ISSUES_PER_REWARD = 10


@dataclass
class RewardSpec:
    """One entry of a recipe's reward list: ``{name: ..., weight: ..., args: {...}}``.

    ``name`` is a registry name, ``pkg.mod:fn``, ``./file.py:fn`` (or a callable in
    code); ``label`` names its column in results (default: the reward's name);
    ``timeout`` overrides the set's per-call limit; ``isolation`` is ``"thread"``
    or ``"process"`` (see ``reward_models.calling``).
    """

    name: str | Callable
    weight: float = 1.0
    args: dict = field(default_factory=dict)
    label: str | None = None
    isolation: str = "thread"
    timeout: float | None = None

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "reward") -> RewardSpec:
        """Build from a recipe mapping; unknown keys and wrong types are ``UserError``s naming ``where``."""
        if not isinstance(data, Mapping):
            raise UserError(f"{where}: expected a mapping like {{name: bleu, weight: 1.0, args: {{}}}}, "
                            f"got {data!r}.")
        known = ("name", "weight", "args", "label", "isolation", "timeout")
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                raise UserError(f"{where}: unknown key {key!r} (known: {', '.join(known)}).",
                                hint=f"Did you mean {close[0]!r}?" if close else None)
        if "name" not in data:
            raise UserError(f"{where}: missing 'name' (a reward name, 'module:function' or './file.py:function').")
        spec = cls(**{k: data[k] for k in known if k in data})
        spec.validate(where)
        return spec

    def validate(self, where: str = "reward") -> None:
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)):
            raise UserError(f"{where}: weight must be a number, got {self.weight!r}.")
        if not isinstance(self.args, Mapping):
            raise UserError(f"{where}: args must be a mapping of argument names to values, got {self.args!r}.")
        if self.isolation not in ISOLATIONS:
            raise UserError(f"{where}: isolation must be one of {', '.join(ISOLATIONS)}, got {self.isolation!r}.")
        if self.timeout is not None and (not isinstance(self.timeout, (int, float)) or self.timeout <= 0):
            raise UserError(f"{where}: timeout must be a positive number of seconds, got {self.timeout!r}.")


@dataclass
class RewardIssue:
    """A row a reward could not score: ``kind`` is error, timeout, nan, type or length."""

    reward: str
    row: int
    kind: str
    message: str

    def __str__(self) -> str:
        return f"reward {self.reward!r} on row {self.row}: {self.kind}: {self.message}"

    def as_dict(self) -> dict:
        return {"reward": self.reward, "kind": self.kind, "message": self.message}


class RewardFailure(UserError):
    """A reward failed on a row and the policy is ``fail``."""

    def __init__(self, issue: RewardIssue, others: int) -> None:
        self.issue, self.others = issue, others
        more = f" ({others} more issue(s) in this batch.)" if others else ""
        super().__init__(f"{issue}.{more}",
                         hint="Fix the reward or the data, or set on_error to 'zero' (--on-error zero) to score "
                              "failing rows 0 and continue.")


@dataclass
class BatchScores:
    """What ``RewardSet.score`` returns for a batch of n samples.

    ``totals``: n combined scores (``None`` where every reward abstained);
    ``scores``: reward label -> n scores after the failure policy (``None``: abstained or failed);
    ``info``:   n dicts, reward label -> the details that reward gave for the row;
    ``issues``: every problem, with the row id (``row_ids`` given to ``score``, else the index).
    """

    totals: list[float | None]
    scores: dict[str, list[float | None]]
    info: list[dict[str, dict]]
    issues: list[RewardIssue]
    row_ids: list[int]

    def reward_info(self, i: int) -> dict:
        """The ``reward_info`` object of row ``i``: scores, details, and errors when there were any."""
        out: dict = {"scores": {label: column[i] for label, column in self.scores.items()}}
        details = {label: d for label, d in self.info[i].items() if d}
        if details:
            out["details"] = details
        errors = [issue.as_dict() for issue in self.issues if issue.row == self.row_ids[i]]
        if errors:
            out["errors"] = errors
        return out


@dataclass
class Ensemble:
    """Several rewards (e.g. ``orm`` models) reduced to one column, ``label``, that takes their place in the
    combination with ``weight``: ``method`` mean, wco (worst case) or uwo (mean - uwo_coef * variance), per
    sample over ``members`` (reward labels). ("Reward Model Ensembles Help Mitigate Overoptimization", Coste
    et al., 2023.) The members' own columns are still reported."""

    members: Sequence[str]
    method: str = "mean"
    uwo_coef: float = 0.5
    label: str = "ensemble"
    weight: float = 1.0


@dataclass
class _Entry:
    reward: Reward
    label: str
    weight: float
    isolation: str
    timeout: float | None
    worker: object = None


def _as_spec(item: object, index: int) -> RewardSpec:
    if isinstance(item, RewardSpec):
        item.validate(f"rewards[{index}]")
        return item
    if isinstance(item, Mapping):
        return RewardSpec.from_dict(item, f"rewards[{index}]")
    if isinstance(item, (str, Reward)) or callable(item):
        return RewardSpec(item)
    raise UserError(f"rewards[{index}]: expected a reward name, a mapping or a callable, got {item!r}.")


class RewardSet:
    """Weighted rewards, scored together (see the module docstring).

    ``rule``: ``sum``, ``mean`` or ``normalize`` (``reward_models.combine``);
    ``ensemble``: an :class:`Ensemble` of some of the rewards, reduced to one column first;
    ``objectives``: instead of ``rule``, combine the (weighted) rewards as objectives with a method of
    ``posttrain.algorithms.OBJECTIVE_COMBINATIONS`` (weighted_sum, maxmin, min, softmin), ``temperature``
    for softmin; ``on_error``: ``fail`` or ``zero``; ``timeout``: seconds per reward call (None: no limit);
    ``workers``: passed as ``workers=`` to rewards that accept it (sandbox and math pools).
    """

    def __init__(self, rewards: Sequence[RewardSpec | Mapping | str | Callable], *, rule: str = "sum",
                 on_error: str = "fail", timeout: float | None = DEFAULT_TIMEOUT,
                 workers: int | None = None, ensemble: Ensemble | None = None, objectives: str | None = None,
                 temperature: float = 1.0) -> None:
        if rule not in RULES:
            raise UserError(f"unknown combination rule {rule!r}; expected one of {', '.join(RULES)}.")
        if on_error not in POLICIES:
            raise UserError(f"unknown failure policy {on_error!r}; expected one of {', '.join(POLICIES)}.")
        if not rewards:
            raise UserError("no rewards given.")
        self.rule, self.on_error, self.timeout = rule, on_error, timeout
        defaults = {"workers": workers} if workers else {}
        self._entries: list[_Entry] = []
        try:
            for index, item in enumerate(rewards):
                spec = _as_spec(item, index)
                reward = load_reward_with_defaults(spec.name, spec.args, defaults)
                label = self._unique_label(spec.label or reward.name)
                entry = _Entry(reward, label, float(spec.weight), spec.isolation,
                               spec.timeout if spec.timeout is not None else timeout)
                if spec.isolation == "process":
                    from reward_models.worker import ProcessWorker

                    try:
                        entry.worker = ProcessWorker(reward)
                    except ValueError as err:
                        raise UserError(f"rewards[{index}]: {err}.") from None
                self._entries.append(entry)
        except BaseException:
            self.close()
            raise
        self.ensemble, self.objectives, self.temperature = ensemble, objectives, temperature
        try:
            self._check_combination()
        except BaseException:
            self.close()
            raise
        self.stats: dict[str, dict[str, int]] = {
            e.label: {"scored": 0, "skipped": 0, "failed": 0} for e in self._entries}
        self._stats_lock = threading.Lock()
        self._logged: dict[str, int] = {}

    def _check_combination(self) -> None:
        from posttrain.algorithms import ENSEMBLE_REDUCTIONS, OBJECTIVE_COMBINATIONS

        labels = [e.label for e in self._entries]
        if self.ensemble is not None:
            members = list(self.ensemble.members)
            unknown = [m for m in members if m not in labels]
            if unknown:
                raise UserError(f"ensemble member {unknown[0]!r} is not a reward of this set (labels: "
                                f"{', '.join(labels)}).", hint="Name members by their label (default: the reward's name; "
                                "give two orm rewards labels of their own).")
            if len(set(members)) != len(members) or len(members) < 2:
                raise UserError(f"an ensemble needs at least two different members, got {members}.")
            if self.ensemble.label in labels:
                raise UserError(f"the ensemble's label {self.ensemble.label!r} is already a reward's label.")
            if self.ensemble.method not in ENSEMBLE_REDUCTIONS:
                raise UserError(ENSEMBLE_REDUCTIONS.unknown_message(self.ensemble.method))
        if self.objectives is not None:
            if self.objectives not in OBJECTIVE_COMBINATIONS:
                raise UserError(OBJECTIVE_COMBINATIONS.unknown_message(self.objectives))
            if self.rule != "sum":
                raise UserError(f"objectives ({self.objectives}) replace the combination rule; got rule "
                                f"{self.rule!r} as well.", hint="Leave the rule at 'sum' when combining objectives.")
            if self.temperature <= 0:
                raise UserError(f"the softmin temperature must be positive, got {self.temperature}.")

    def _unique_label(self, base: str) -> str:
        taken = {e.label for e in self._entries}
        label, n = base, 2
        while label in taken:
            label, n = f"{base}_{n}", n + 1
        return label

    @property
    def labels(self) -> list[str]:
        return [e.label for e in self._entries]

    @property
    def weights(self) -> dict[str, float]:
        return {e.label: e.weight for e in self._entries}

    @property
    def rewards(self) -> dict[str, Reward]:
        return {e.label: e.reward for e in self._entries}

    def columns(self) -> dict[str, tuple[Column, ...]]:
        """The dataset columns each reward declares it reads."""
        return {e.label: e.reward.columns for e in self._entries}

    # -- scoring -------------------------------------------------------------------------------

    def score(self, prompts: Sequence, completions: Sequence, *, groups: Sequence[Hashable] | None = None,
              row_ids: Sequence[int] | None = None, reduce_sum: Callable | None = None,
              trainer_state: object = None, **columns: Sequence) -> BatchScores:
        """Score a batch; ``columns`` are the dataset's extra columns (and ``completion_ids``), batched.

        Each reward is called by keyword as TRL calls it (``reward_models.convention``), with
        ``trainer_state`` (a ``TrainerState`` in training, None otherwise) passed as is.

        ``groups`` (one id per sample) scopes the ``normalize`` rule; ``row_ids`` are the
        row numbers used in issues and errors (default: 0..n-1); ``reduce_sum`` sums a list of floats
        over the processes that score the other parts of the batch (batch statistics of objectives
        such as maxmin; every process must then call ``score``). Safe to call from
        inside a running event loop (it then runs on a helper thread).
        """
        coroutine = self.ascore(prompts, completions, groups=groups, row_ids=row_ids, reduce_sum=reduce_sum,
                                trainer_state=trainer_state, **columns)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coroutine)
        box: dict = {}

        def run() -> None:
            try:
                box["value"] = asyncio.run(coroutine)
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                box["error"] = err

        thread = threading.Thread(target=run, name="reward-set")
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]

    async def ascore(self, prompts: Sequence, completions: Sequence, *,
                     groups: Sequence[Hashable] | None = None, row_ids: Sequence[int] | None = None,
                     reduce_sum: Callable | None = None, trainer_state: object = None,
                     **columns: Sequence) -> BatchScores:
        """``score`` for callers that are already async."""
        n = len(prompts)
        if len(completions) != n:
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        for name, column in columns.items():
            if len(column) != n:
                raise ValueError(f"column {name!r} has {len(column)} values for {n} samples")
        ids = list(row_ids) if row_ids is not None else list(range(n))
        batch = (list(prompts), list(completions), {k: list(v) for k, v in columns.items()})
        results = await asyncio.gather(*(self._score_one(e, *batch, trainer_state) for e in self._entries))
        scores: dict[str, list[float | None]] = {}
        info: list[dict[str, dict]] = [{} for _ in range(n)]
        issues: list[RewardIssue] = []
        for entry, (column, details, problems) in zip(self._entries, results, strict=True):
            for i, d in enumerate(details):
                info[i][entry.label] = d
            issues += [RewardIssue(entry.label, ids[p.row], p.kind, p.message) for p in problems]
            failed = {p.row for p in problems}
            self._count(entry.label, column, failed)
            if failed and self.on_error == "zero":
                column = [0.0 if i in failed else v for i, v in enumerate(column)]
            scores[entry.label] = column
        if issues and self.on_error == "fail":
            raise RewardFailure(issues[0], len(issues) - 1)
        self._log(issues)
        totals = self._totals(scores, groups, reduce_sum)
        return BatchScores(totals, scores, info, issues, ids)

    def _totals(self, scores: dict[str, list[float | None]], groups, reduce_sum) -> list[float | None]:
        """Per-row totals: the ensemble (added to ``scores`` under its label) in its members' place, then the
        rule or the objectives."""
        parts = [(e.label, e.weight) for e in self._entries]
        if self.ensemble is not None:
            members = list(self.ensemble.members)
            scores[self.ensemble.label] = ensemble_column([scores[m] for m in members], self.ensemble.method,
                                                          uwo_coef=self.ensemble.uwo_coef)
            first = next(i for i, (label, _) in enumerate(parts) if label in members)
            parts = [*parts[:first], (self.ensemble.label, self.ensemble.weight),
                     *(p for p in parts[first:] if p[0] not in members)]
        columns = [scores[label] for label, _ in parts]
        weights = [weight for _, weight in parts]
        if self.objectives is not None:
            return objective_totals(columns, weights, self.objectives, temperature=self.temperature,
                                    reduce_sum=reduce_sum)
        return combine(columns, weights, self.rule, groups)

    async def _score_one(self, entry: _Entry, prompts: list, completions: list, columns: dict,
                         trainer_state: object = None) -> tuple[list[float | None], list[dict], list[RowProblem]]:
        n = len(prompts)
        outcome = await self._call(entry, prompts, completions, columns, trainer_state)
        if outcome.kind == "ok":
            return check_values(outcome.value, n)
        if outcome.kind == "timeout" or n == 1:
            return [None] * n, [{} for _ in range(n)], [RowProblem(i, outcome.kind, outcome.message)
                                                         for i in range(n)]
        # The batch raised: score rows one by one to name the failing ones and keep the rest.
        column: list[float | None] = []
        details: list[dict] = []
        problems: list[RowProblem] = []
        for i in range(n):
            one = await self._call(entry, prompts[i:i + 1], completions[i:i + 1],
                                   {k: v[i:i + 1] for k, v in columns.items()}, trainer_state)
            if one.kind == "ok":
                values, row_info, row_problems = check_values(one.value, 1)
            else:
                values, row_info, row_problems = [None], [{}], [RowProblem(0, one.kind, one.message)]
            column += values
            details += row_info
            problems += [RowProblem(i, p.kind, p.message) for p in row_problems]
        return column, details, problems

    async def _call(self, entry: _Entry, prompts: list, completions: list, columns: dict,
                    trainer_state: object = None) -> Outcome:
        return await call(entry.reward, prompts, completions, columns, timeout=entry.timeout,
                          isolation=entry.isolation, worker=entry.worker, trainer_state=trainer_state)

    def _count(self, label: str, column: list[float | None], failed: set[int]) -> None:
        with self._stats_lock:
            stats = self.stats[label]
            stats["failed"] += len(failed)
            stats["skipped"] += sum(1 for i, v in enumerate(column) if v is None and i not in failed)
            stats["scored"] += sum(1 for v in column if v is not None)

    def _log(self, issues: list[RewardIssue]) -> None:
        for issue in issues:
            n = self._logged.get(issue.reward, 0)
            if n < _LOGGED_ISSUES_PER_REWARD:
                log.warning("%s; scored 0 (on_error=zero)", issue)
            elif n == _LOGGED_ISSUES_PER_REWARD:
                log.warning("reward %r: further failures are scored 0 and counted in stats, not logged one by one",
                            issue.reward)
            self._logged[issue.reward] = n + 1

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Release worker processes, sandbox pools and models held by the rewards."""
        for entry in self._entries:
            if entry.worker is not None:
                entry.worker.close()
            entry.reward.close()

    def __enter__(self) -> RewardSet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def combine_rewards(rewards: Sequence[RewardSpec | Mapping | str | Callable], **settings) -> RewardSet:
    """Shorthand for ``RewardSet(rewards, **settings)``."""
    return RewardSet(rewards, **settings)
