"""RewardSet: combination rules, None skipping, failure policies, timeouts, async rewards."""

from __future__ import annotations

import asyncio
import logging
import math
import textwrap
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.errors import UserError
from reward_models import RewardFailure, RewardOutput, RewardSet, RewardSpec, combine, normalize_column


def const(*values):
    def reward(prompts, completions, **columns):
        return list(values)

    return reward


def test_combine_sum_skips_none():
    totals = combine([[1.0, None, None], [0.5, 2.0, None]], [2.0, 1.0], "sum")
    assert totals == [2.5, 2.0, None]


def test_combine_mean_divides_by_weights_present():
    totals = combine([[1.0, None], [0.0, 0.5]], [3.0, 1.0], "mean")
    assert totals == [pytest.approx(0.75), pytest.approx(0.5)]
    assert combine([[1.0], [1.0]], [1.0, -1.0], "mean") == [0.0]


def test_combine_normalize_then_sum():
    a = [1.0, 2.0, 3.0, None]
    z = normalize_column(a)
    std = math.sqrt(2 / 3)
    assert z[:3] == [pytest.approx(-1 / (std + 1e-6)), pytest.approx(0.0), pytest.approx(1 / (std + 1e-6))]
    assert z[3] is None
    totals = combine([a, [5.0, 5.0, 5.0, 5.0]], [1.0, 10.0], "normalize")
    assert totals[:3] == pytest.approx(z[:3])  # a constant reward normalises to 0
    assert totals[3] == pytest.approx(0.0)


def test_normalize_within_groups():
    z = normalize_column([1.0, 3.0, 10.0, 30.0], groups=["a", "a", "b", "b"])
    assert z == pytest.approx([-1.0, 1.0, -1.0, 1.0], abs=1e-5)


def test_reward_set_scores_weights_and_columns():
    with RewardSet([RewardSpec(const(1.0, None), weight=2.0, label="a"), RewardSpec(const(0.5, 0.25), label="b")],
                   rule="sum") as rs:
        result = rs.score(["p", "q"], ["x", "y"])
    assert result.totals == [2.5, 0.25]
    assert result.scores == {"a": [1.0, None], "b": [0.5, 0.25]}
    assert result.issues == []
    assert rs.stats["a"] == {"scored": 1, "skipped": 1, "failed": 0}


def test_columns_reach_rewards_and_labels_are_unique():
    seen = {}

    def reward(prompts, completions, answer, completion_ids, **columns):
        seen.update(answer=answer, ids=completion_ids, extra=columns)
        return [float(a == c) for a, c in zip(answer, completions, strict=True)]

    with RewardSet([reward, reward]) as rs:
        assert rs.labels == ["reward", "reward_2"]
        result = rs.score(["p", "p"], ["4", "5"], answer=["4", "4"], completion_ids=[[1], [2, 3]], topic=["m", "m"])
    assert result.totals == [2.0, 0.0]
    # trainer_state (None outside a trainer) reaches **columns, as TRL passes it to every reward
    assert seen == {"answer": ["4", "4"], "ids": [[1], [2, 3]], "extra": {"topic": ["m", "m"], "trainer_state": None}}


def test_async_rewards_run_concurrently():
    intervals = []

    async def slow(prompts, completions, **columns):
        start = time.monotonic()
        await asyncio.sleep(0.5)
        intervals.append((start, time.monotonic()))
        return [1.0] * len(completions)

    with RewardSet([slow, slow, slow]) as rs:
        result = rs.score(["p"], ["c"])
    assert result.totals == [3.0]
    assert max(s for s, _ in intervals) < min(e for _, e in intervals)  # all three were asleep at once


def test_score_inside_a_running_event_loop():
    async def main():
        with RewardSet([const(1.0)]) as rs:
            return rs.score(["p"], ["c"]).totals, (await rs.ascore(["p"], ["c"])).totals

    assert asyncio.run(main()) == ([1.0], [1.0])


def flaky(prompts, completions, **columns):
    if any("boom" in c for c in completions):
        raise ValueError("cannot score boom")
    return [1.0] * len(completions)


def test_raising_reward_names_reward_and_row_policy_fail():
    with RewardSet([flaky], on_error="fail") as rs:
        with pytest.raises(RewardFailure) as info:
            rs.score(["p"] * 3, ["ok", "boom", "fine"], row_ids=[10, 11, 12])
    assert isinstance(info.value, UserError)
    assert "reward 'flaky' on row 11" in str(info.value) and "cannot score boom" in str(info.value)


def test_raising_reward_policy_zero_keeps_other_rows(caplog):
    with RewardSet([flaky], on_error="zero") as rs, caplog.at_level(logging.WARNING):
        result = rs.score(["p"] * 3, ["ok", "boom", "fine"])
    assert result.scores["flaky"] == [1.0, 0.0, 1.0]
    assert [(i.row, i.kind) for i in result.issues] == [(1, "error")]
    assert rs.stats["flaky"] == {"scored": 2, "skipped": 0, "failed": 1}
    assert "reward 'flaky' on row 1" in caplog.text
    assert result.reward_info(1)["errors"][0]["kind"] == "error"


@pytest.mark.parametrize("values, kind", [
    ([1.0, float("nan")], "nan"),
    ([1.0, float("inf")], "nan"),
    ([1.0, "high"], "type"),
    ([1.0, [1.0]], "type"),
])
def test_bad_values_are_reported_per_row(values, kind):
    with RewardSet([RewardSpec(const(*values), label="bad")], on_error="zero") as rs:
        result = rs.score(["p", "q"], ["a", "b"])
    assert result.scores["bad"] == [1.0, 0.0]
    assert [(i.reward, i.row, i.kind) for i in result.issues] == [("bad", 1, kind)]


def test_wrong_length_fails_every_row():
    with RewardSet([RewardSpec(const(1.0), label="short")], on_error="fail") as rs:
        with pytest.raises(RewardFailure, match="returned 1 values for 2 rows"):
            rs.score(["p", "q"], ["a", "b"])


def test_numpy_and_bool_values_are_numbers():
    import numpy as np

    with RewardSet([const(np.float32(0.5), True, np.int64(2))]) as rs:
        assert rs.score(["p"] * 3, ["c"] * 3).totals == [0.5, 1.0, 2.0]


def test_reward_output_errors_and_info():
    def partial(prompts, completions, **columns):
        return RewardOutput([1.0, None], info=[{"why": "ok"}, {}], errors={1: "could not check"})

    with RewardSet([partial], on_error="zero") as rs:
        result = rs.score(["p", "q"], ["a", "b"])
    assert result.scores["partial"] == [1.0, 0.0]
    assert result.reward_info(0) == {"scores": {"partial": 1.0}, "details": {"partial": {"why": "ok"}}}
    assert result.issues[0].message == "could not check"


def test_hanging_thread_reward_times_out():
    def hang(prompts, completions, **columns):
        time.sleep(5)
        return [1.0]

    with RewardSet([hang], timeout=0.5, on_error="zero") as rs:
        start = time.monotonic()
        result = rs.score(["p"], ["c"])
    assert time.monotonic() - start < 4.5  # did not wait for the 5 s reward
    assert result.issues[0].kind == "timeout" and result.scores["hang"] == [0.0]


def test_hanging_async_reward_is_cancelled():
    async def hang(prompts, completions, **columns):
        await asyncio.sleep(30)

    with RewardSet([hang], timeout=0.3, on_error="fail") as rs:
        with pytest.raises(RewardFailure, match="timeout"):
            rs.score(["p"], ["c"])


def test_process_isolation_kills_a_hung_call(tmp_path):
    path = tmp_path / "slow_rewards.py"
    path.write_text(textwrap.dedent('''
        import os, time
        def maybe_hang(prompts, completions, **columns):
            if "hang" in completions:
                while True:
                    pass
            return [float(os.getpid()) for _ in completions]
    '''))
    spec = RewardSpec(f"{path}:maybe_hang", isolation="process", timeout=3.0)
    with RewardSet([spec], on_error="zero") as rs:
        first = rs.score(["p"], ["fine"]).scores["maybe_hang"][0]
        hung = rs.score(["p"], ["hang"])
        again = rs.score(["p"], ["fine"]).scores["maybe_hang"][0]
    assert first != 0 and first != float(__import__("os").getpid())  # ran in another process
    assert hung.issues[0].kind == "timeout"
    assert again not in (0.0, first)  # a fresh worker replaced the killed one


def test_process_isolation_needs_a_loadable_spec():
    with pytest.raises(UserError, match="isolation='process' needs"):
        RewardSet([RewardSpec(const(1.0), isolation="process")])


def test_spec_from_dict_validates():
    spec = RewardSpec.from_dict({"name": "length", "weight": 0.5, "args": {"target": 10}})
    assert (spec.name, spec.weight, spec.args) == ("length", 0.5, {"target": 10})
    with pytest.raises(UserError, match="unknown key 'wieght'.*Did you mean 'weight'"):
        RewardSpec.from_dict({"name": "bleu", "wieght": 1})
    with pytest.raises(UserError, match="weight must be a number"):
        RewardSpec.from_dict({"name": "bleu", "weight": "heavy"})
    with pytest.raises(UserError, match="missing 'name'"):
        RewardSpec.from_dict({"weight": 1})
    with pytest.raises(UserError, match="unknown combination rule"):
        RewardSet(["bleu"], rule="product")
    with pytest.raises(UserError, match="unknown failure policy"):
        RewardSet(["bleu"], on_error="ignore")


def test_workers_setting_reaches_rewards_that_accept_it():
    with RewardSet([RewardSpec("unit_test"), RewardSpec("bleu")], workers=3) as rs:
        assert rs.rewards["unit_test"].args["workers"] == 3
        assert "workers" not in rs.rewards["bleu"].args


scores = st.one_of(st.none(), st.floats(-1e3, 1e3, allow_nan=False))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(scores, scores), min_size=1, max_size=12),
       st.tuples(st.floats(0.1, 5), st.floats(0.1, 5)))
def test_combination_rules_properties(rows, weights):
    a, b = [r[0] for r in rows], [r[1] for r in rows]
    totals = {rule: combine([a, b], list(weights), rule) for rule in ("sum", "mean", "normalize")}
    for i, (x, y) in enumerate(rows):
        present = [(w, v) for w, v in zip(weights, (x, y), strict=True) if v is not None]
        if not present:
            assert all(totals[rule][i] is None for rule in totals)
            continue
        assert totals["sum"][i] == pytest.approx(sum(w * v for w, v in present))
        low, high = min(v for _, v in present), max(v for _, v in present)
        assert low - 1e-9 <= totals["mean"][i] <= high + 1e-9  # a weighted mean of what is there
    for column in (a, b):
        z = [v for v in normalize_column(column) if v is not None]
        if z:
            assert sum(z) == pytest.approx(0.0, abs=1e-6 * len(z))
