"""RSO (Liu et al., 2023): rejection sampling against its target distribution, pair selections, `posttrain pairs`
end to end into the DPO trainer (recipes/rso.yaml), and its input errors."""

from __future__ import annotations

import json
import math
from collections import Counter
from itertools import permutations

import pytest
import torch

from posttrain.algorithms import (
    PAIR_SELECTIONS,
    UnknownNameError,
    acceptance_probabilities,
    all_pairs,
    rso_select,
    select_pairs,
    tournament_pairs,
)
from tests.conftest import REPO, read_metrics, run_cli, write_jsonl

NAN = math.nan
TRIALS = 20_000


def chi_square(observed: Counter, expected: dict) -> float:
    assert set(observed) <= set(expected), set(observed) - set(expected)
    return sum((observed.get(k, 0) - TRIALS * p) ** 2 / (TRIALS * p) for k, p in expected.items())


def draws(rewards, num_select, beta, trials=TRIALS) -> Counter:
    return Counter(tuple(rso_select(rewards, num_select, beta, torch.Generator().manual_seed(seed)))
                   for seed in range(trials))


# ----------------------------------------------------------------------------- rejection sampling


def test_acceptance_probability_is_the_papers_ratio():
    rewards = [0.0, 0.5, 1.5, 3.0, NAN]
    probs = acceptance_probabilities(rewards, beta=0.7)
    expected = [math.exp((r - 3.0) / 0.7) for r in rewards[:4]] + [0.0]
    assert probs.tolist() == pytest.approx(expected, rel=1e-12)
    assert probs[3] == 1.0  # the best candidate is always accepted


def test_one_accepted_candidate_follows_pi_star():
    """An accepted candidate is i with probability exp(r_i / beta) / sum_j exp(r_j / beta): chi-square, 3 degrees
    of freedom, 21.1 is its 1e-4 quantile. Uniform picks (no rejection) would score in the thousands."""
    rewards, beta = [0.0, 0.5, 1.5, 3.0, NAN], 1.0
    weights = [math.exp(r / beta) for r in rewards[:4]]
    expected = {(i,): w / sum(weights) for i, w in enumerate(weights)}
    observed = draws(rewards, 1, beta)
    assert (4,) not in observed  # unscored: never selected
    assert chi_square(observed, expected) < 21.1
    uniform = {(i,): 0.25 for i in range(4)}
    assert chi_square(observed, uniform) > 1000  # the test can tell pi* from the proposal


def test_accepted_sequence_is_sampling_without_replacement_from_pi_star():
    """Exact enumeration of every ordered pair for N = 3 (+ one unscored): P(i then j) = w_i / W * w_j / (W - w_i),
    w = exp(r / beta). Chi-square with 5 degrees of freedom; 25.7 is its 1e-4 quantile."""
    rewards, beta = [NAN, 0.2, 1.0, 1.7], 0.8
    w = {i: math.exp(rewards[i] / beta) for i in (1, 2, 3)}
    total = sum(w.values())
    expected = {(i, j): w[i] / total * w[j] / (total - w[i]) for i, j in permutations(w, 2)}
    assert sum(expected.values()) == pytest.approx(1.0)
    observed = draws(rewards, 2, beta)
    assert chi_square(observed, expected) < 25.7
    # the set of accepted candidates: {1, 2} (the worst two) is the rarest
    sets = Counter(frozenset(k) for k in observed.elements())
    assert min(sets, key=sets.get) == frozenset({1, 2})


def test_large_beta_is_uniform_and_small_beta_picks_the_best():
    rewards = [0.0, 1.0, 2.0, 4.0]
    uniform = draws(rewards, 1, beta=1e6, trials=8000)
    assert all(abs(uniform[(i,)] / 8000 - 0.25) < 0.025 for i in range(4)), uniform
    greedy = draws(rewards, 3, beta=1e-3, trials=200)
    assert greedy == Counter({(3, 2, 1): 200})  # best first, then the next best, every time
    assert draws(rewards, 1, beta=math.inf, trials=50).keys() <= {(i,) for i in range(4)}


def test_ties_are_accepted_alike_and_the_pool_can_run_out():
    observed = draws([2.0, 2.0, 2.0], 1, beta=0.1, trials=6000)
    assert all(abs(observed[(i,)] / 6000 - 1 / 3) < 0.03 for i in range(3)), observed
    picked = rso_select([1.0, NAN, 0.0, NAN], 5, beta=1.0, generator=torch.Generator().manual_seed(0))
    assert sorted(picked) == [0, 2]  # all the scored ones, none twice, no NaN
    assert rso_select([NAN, NAN], 2, beta=1.0) == []


def test_same_seed_same_selection_and_bad_settings_fail():
    rewards = torch.randn(16, generator=torch.Generator().manual_seed(3))
    runs = [rso_select(rewards, 6, 0.5, torch.Generator().manual_seed(11)) for _ in range(2)]
    assert runs[0] == runs[1] and len(set(runs[0])) == 6
    with pytest.raises(ValueError, match="beta"):
        rso_select(rewards, 2, 0.0)
    with pytest.raises(ValueError, match="beta"):
        rso_select(rewards, 2, NAN)
    with pytest.raises(ValueError, match="num_select"):
        rso_select(rewards, -1, 1.0)


# ----------------------------------------------------------------------------- pairs


def test_tournament_and_all_pairs_label_by_reward_and_skip_ties():
    rewards = [0.1, 0.9, 0.5, 0.5, 0.3]
    assert tournament_pairs([0, 1, 2, 4, 3], rewards) == [(1, 0), (2, 4)]  # 3 is the odd one out
    assert tournament_pairs([2, 3], rewards) == []  # a tie says nothing
    assert sorted(all_pairs([0, 2, 3], rewards)) == [(2, 0), (3, 0)]  # (2, 3) tied


@pytest.mark.parametrize("name", ["rso", "random_pairs", "best_worst"])
@pytest.mark.parametrize("pairing", ["tournament", "all_pairs"])
def test_chosen_always_has_the_higher_reward_and_nan_is_never_paired(name, pairing):
    gen = torch.Generator().manual_seed(0)
    seen_pairs = 0
    for seed in range(300):
        rewards = torch.randint(0, 4, (8,), generator=gen).double()  # many ties
        rewards[torch.rand(8, generator=gen) < 0.25] = NAN
        pairs = select_pairs(name, rewards, num_select=4, beta=0.5, generator=torch.Generator().manual_seed(seed),
                             pairing=pairing)
        seen_pairs += len(pairs)
        for chosen, rejected in pairs:
            assert rewards[chosen] > rewards[rejected], (rewards, pairs)  # strictly: NaN compares False
        used = [i for p in pairs for i in p]
        if name == "best_worst":
            assert len(pairs) <= 1
            finite = rewards[torch.isfinite(rewards)]
            if pairs:
                assert rewards[pairs[0][0]] == finite.max() and rewards[pairs[0][1]] == finite.min()
            else:
                assert finite.numel() == 0 or finite.max() == finite.min()
        elif pairing == "tournament":
            assert len(used) == len(set(used)) and len(pairs) <= 2  # disjoint, 4 selected -> at most 2 pairs
        else:
            assert len(set(pairs)) == len(pairs) and len(set(used)) <= 4 and len(pairs) <= 6
    assert seen_pairs > 100  # the checks above ran on real pairs


def test_rso_pairs_favour_high_rewards_over_random_pairs():
    """rso's chosen and rejected both come from pi*, so both sit higher than uniform SFT samples' do."""
    rewards = torch.linspace(0, 3, 12, dtype=torch.float64)

    def mean_rewards(name):
        picked = [i for seed in range(2000) for p in select_pairs(
            name, rewards, num_select=4, beta=0.5, generator=torch.Generator().manual_seed(seed)) for i in p]
        return rewards[picked].mean().item()

    assert mean_rewards("random_pairs") == pytest.approx(1.5, abs=0.05)
    assert mean_rewards("rso") > 2.2


def test_unknown_selection_names_the_valid_ones():
    assert {"rso", "best_worst", "random_pairs"} <= set(PAIR_SELECTIONS)
    with pytest.raises(UnknownNameError, match="best_worst.*Did you mean 'rso'"):
        select_pairs("rsoo", [1.0, 0.0], num_select=2, beta=1.0)


# ----------------------------------------------------------------------------- posttrain pairs -> dpo


def test_completions_take_the_prompts_format_and_the_recipe_is_listed():
    from posttrain.cli.pairs import _completion, selection_seed

    assert _completion("What is 1 + 2?", " 3") == " 3"
    assert _completion([{"role": "user", "content": "1 + 2?"}], "3") == [{"role": "assistant", "content": "3"}]
    assert selection_seed(0, 1) == selection_seed(0, 1) != selection_seed(0, 2) != selection_seed(1, 2)
    listing = run_cli("recipes")
    assert listing.returncode == 0
    assert any(line.split()[:2] == ["rso", "dpo"] for line in listing.stdout.splitlines()), listing.stdout

REWARD = '''
def spread(prompts, completions, answer, **columns):
    """A graded, deterministic score of the text (a random model's samples all fail math_verify)."""
    out = []
    for completion, right in zip(completions, answer):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        out.append(float(sum(map(ord, text)) % 5) + (str(right) in text))
    return out
'''


def spread(text: str, answer: str) -> float:
    return float(sum(map(ord, text)) % 5) + (answer in text)


def pairs_args(tiny_model, prompts, reward_file, out, *extra):
    return ["pairs", str(prompts), "--model", str(tiny_model), "--reward", f"{reward_file}:spread", "-n", "4",
            "--max-tokens", "8", "--limit", "8", "--selection", "rso", "--beta", "0.5", "--num-select", "4",
            "--seed", "3", "--no-progress", "-o", str(out), *extra]


@pytest.mark.slow
def test_pairs_writes_rows_the_rso_recipe_trains_on(tiny_model, arithmetic_data, tmp_path):
    reward_file = tmp_path / "rewards.py"
    reward_file.write_text(REWARD)
    out = tmp_path / "pairs.jsonl"
    result = run_cli(*pairs_args(tiny_model, arithmetic_data["train"], reward_file, out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    prompts = [json.loads(line) for line in arithmetic_data["train"].read_text().splitlines()][:8]
    assert 4 <= len(rows) <= 16  # at most two tournament pairs from 4 accepted per prompt
    by_prompt = Counter(json.dumps(r["prompt"]) for r in rows)
    assert max(by_prompt.values()) <= 2 and set(by_prompt) <= {json.dumps(p["prompt"]) for p in prompts}
    for row in rows:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert row["chosen"][0]["role"] == "assistant" and isinstance(row["prompt"], list)
        assert row["chosen_reward"] == spread(chosen, row["answer"])  # the reward of that very text
        assert row["rejected_reward"] == spread(rejected, row["answer"])
        assert row["chosen_reward"] > row["rejected_reward"]
    assert f"{len(rows)} pairs (rso)" in result.stderr

    # Deterministic for a seed, whatever the batch size; another seed gives other samples.
    again = tmp_path / "again.jsonl"
    result = run_cli(*pairs_args(tiny_model, arithmetic_data["train"], reward_file, again, "--batch-size", "3"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert again.read_text() == out.read_text()

    run = tmp_path / "run"
    result = run_cli("run", str(REPO / "recipes" / "rso.yaml"), f"model.path={tiny_model}", f"data.path={out}",
                     f"data.eval_path={out}", f"output_dir={run}", "train.max_steps=2", "train.global_batch_size=4",
                     "train.micro_batch_size=2", "train.eval_every=0", "logging.progress=false",
                     "logging.tensorboard=false", "logging.plots=false")
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [(m["step"], m["loss"]) for m in read_metrics(run) if "loss" in m]
    assert [s for s, _ in losses] == [1, 2]
    assert losses[0][1] == pytest.approx(1.0, abs=1e-6)  # hinge: max(0, 1 - beta * 0) while policy == reference
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_end"]["loss"] < summary["eval_start"]["loss"]


@pytest.mark.parametrize("case", ["missing_file", "bad_row", "unknown_selection", "missing_column", "bad_beta"])
def test_bad_input_is_one_line_and_exit_2(case, tiny_model, tmp_path):
    good = {"prompt": "What is 1 + 2?", "answer": "3"}
    prompts = write_jsonl(tmp_path / "p.jsonl", [good, good])
    args = ["--reward", "math_verify", "--selection", "rso"]
    expected = {"missing_file": "does not exist", "bad_row": "p.jsonl, row 2", "unknown_selection": "Did you mean",
                "missing_column": "'answer'", "bad_beta": "--beta"}[case]
    if case == "missing_file":
        prompts = tmp_path / "nope.jsonl"
    elif case == "bad_row":
        write_jsonl(prompts, [good, {"prompt": 7, "answer": "3"}])
    elif case == "unknown_selection":
        args[-1] = "rs0"
    elif case == "missing_column":
        write_jsonl(prompts, [good, {"prompt": "What is 2 + 2?"}])
    else:
        args += ["--beta", "0"]
    result = run_cli("pairs", str(prompts), "--model", str(tiny_model), *args, "-o", str(tmp_path / "o.jsonl"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert not (tmp_path / "o.jsonl").exists()
