"""Choosing preference pairs among sampled candidates: RSO's statistical rejection sampling and baselines.

"Statistical Rejection Sampling Improves Preference Optimization" (Liu et al., 2023, arXiv 2309.06657; RSO)
observes that the policy DPO and SLiC are meant to learn is the KL-regularised optimum

    pi*(y | x)  proportional to  pi_sft(y | x) exp(r(x, y) / beta),

so preference pairs should be sampled from pi*, not from pi_sft. Given N candidates y_1..y_N drawn from pi_sft
for one prompt and their rewards r_i, its Algorithm 1 accepts candidates by rejection sampling with pi_sft as the
proposal: a candidate drawn uniformly from the N (a draw from pi_sft's empirical distribution) is accepted with
probability

    a_i = pi*(y_i) / (M pi_sft(y_i)) = exp((r_i - r_max) / beta),   r_max = max_j r_j,

which is the bound M = exp(r_max / beta) / Z of the target over the proposal. An accepted candidate is then
distributed as pi*(i) = exp(r_i / beta) / sum_j exp(r_j / beta) over the candidates. Accepted candidates leave
the pool and r_max is taken again over what is left, until ``num_select`` are accepted (or the pool is empty), so
the accepted sequence is a draw without replacement from pi*: the k-th accepted is i with probability
w_i / sum_{j left} w_j, w = exp(r / beta). beta -> infinity accepts every draw (uniform: plain SFT samples);
beta -> 0 accepts the best candidate first. The accepted candidates are then paired ("tournament": the first
round of a knock-out, (a_1, a_2), (a_3, a_4), ...; or all pairs) and each pair is labelled by its rewards, the
higher one chosen.

Here, unlike the paper's listing (which sweeps the remaining candidates in their stored order, one coin each per
sweep), every proposal is a fresh uniform draw, so the result does not depend on the candidates' order and each
accepted candidate follows pi* exactly; the accepted set is shuffled before pairing, so pairs do not depend on
the acceptance order either. Non-finite rewards (NaN: no reward had an opinion) mark unscored candidates, which
are never selected. Pairs whose rewards tie carry no preference and are left out.

``PAIR_SELECTIONS`` maps names to functions ``(rewards [N], *, num_select, beta, generator, pairing) -> [(chosen,
rejected), ...]`` of candidate indices; :func:`select_pairs` calls one by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import combinations

import torch
from torch import Tensor

from posttrain.algorithms.registry import PAIR_SELECTIONS

Pair = tuple[int, int]  # (chosen index, rejected index)
_CHUNK = 32  # proposals drawn at once: the random stream, hence the result, is fixed by the seed alone


def _as_rewards(rewards: Tensor | Sequence[float]) -> Tensor:
    values = torch.as_tensor(rewards, dtype=torch.float64)
    if values.dim() != 1:
        raise ValueError(f"rewards must be one-dimensional (one per candidate), got shape {tuple(values.shape)}")
    return values


def _check_beta(beta: float) -> None:
    if not beta > 0:  # also rejects NaN
        raise ValueError(f"beta must be positive (math.inf: uniform), got {beta!r}")


def scored_indices(rewards: Tensor | Sequence[float]) -> list[int]:
    """Indices of the candidates with a finite reward (the others are unscored and never selected)."""
    values = _as_rewards(rewards)
    return torch.isfinite(values).nonzero().flatten().tolist()


def acceptance_probabilities(rewards: Tensor | Sequence[float], beta: float) -> Tensor:
    """RSO's acceptance probability of each candidate, exp((r_i - r_max) / beta) [N] (float64), r_max the largest
    finite reward; 0 for unscored (non-finite) candidates. A uniform proposal accepted with these probabilities
    yields candidate i with probability exp(r_i / beta) / sum_j exp(r_j / beta)."""
    _check_beta(beta)
    values = _as_rewards(rewards)
    finite = torch.isfinite(values)
    out = torch.zeros_like(values)
    if finite.any():
        scored = values[finite]
        out[finite] = torch.exp((scored - scored.max()) / beta)
    return out


def rso_select(rewards: Tensor | Sequence[float], num_select: int, beta: float,
               generator: torch.Generator | None = None) -> list[int]:
    """Statistical rejection sampling (RSO, Liu et al. 2023, Algorithm 1): indices of up to ``num_select``
    candidates accepted from pi*(i) proportional to exp(r_i / beta), in acceptance order.

    Repeatedly draw a not-yet-accepted scored candidate uniformly and accept it with probability
    exp((r_i - r_max) / beta), r_max the largest reward not yet accepted; stop when ``num_select`` are accepted or
    none is left. The best remaining candidate is always accepted when drawn, so each acceptance takes at most as
    many proposals, in expectation, as there are candidates left. ``generator`` seeds the draws (None: torch's
    default generator)."""
    _check_beta(beta)
    if num_select < 0:
        raise ValueError(f"num_select must be >= 0, got {num_select}")
    values = _as_rewards(rewards)
    left = torch.tensor(scored_indices(values), dtype=torch.long)
    accepted: list[int] = []
    while len(accepted) < num_select and left.numel():
        probs = acceptance_probabilities(values[left], beta)
        while True:
            proposals = torch.randint(left.numel(), (_CHUNK,), generator=generator)
            coins = torch.rand(_CHUNK, generator=generator, dtype=torch.float64)
            hits = (coins < probs[proposals]).nonzero()
            if hits.numel():
                break
        pick = int(proposals[hits[0, 0]])
        accepted.append(int(left[pick]))
        left = torch.cat([left[:pick], left[pick + 1:]])
    return accepted


def _labelled(a: int, b: int, values: Tensor) -> Pair | None:
    if values[a] > values[b]:
        return a, b
    if values[b] > values[a]:
        return b, a
    return None  # a tie (or an unscored candidate) says nothing


def tournament_pairs(indices: Sequence[int], rewards: Tensor | Sequence[float]) -> list[Pair]:
    """The first round of a knock-out over ``indices`` in their order: (i_1, i_2), (i_3, i_4), ... (an odd one out
    is left over), each as (chosen, rejected) with the higher reward chosen; tied pairs are left out."""
    values = _as_rewards(rewards)
    pairs = (_labelled(indices[k], indices[k + 1], values) for k in range(0, len(indices) - 1, 2))
    return [p for p in pairs if p is not None]


def all_pairs(indices: Sequence[int], rewards: Tensor | Sequence[float]) -> list[Pair]:
    """Every pair of distinct ``indices`` (k(k-1)/2 of them), as (chosen, rejected) with the higher reward chosen;
    tied pairs are left out."""
    values = _as_rewards(rewards)
    pairs = (_labelled(a, b, values) for a, b in combinations(indices, 2))
    return [p for p in pairs if p is not None]


PAIRINGS: dict[str, Callable[[Sequence[int], Tensor | Sequence[float]], list[Pair]]] = {
    "tournament": tournament_pairs,
    "all_pairs": all_pairs,
}


def _pairing(name: str):
    try:
        return PAIRINGS[name]
    except KeyError:
        raise ValueError(f"Unknown pairing {name!r}. Valid names: {', '.join(PAIRINGS)}.") from None


def _shuffled(indices: list[int], generator: torch.Generator | None) -> list[int]:
    order = torch.randperm(len(indices), generator=generator).tolist()
    return [indices[k] for k in order]


@PAIR_SELECTIONS.register("rso")
def rso_pairs(rewards: Tensor | Sequence[float], *, num_select: int, beta: float,
              generator: torch.Generator | None = None, pairing: str = "tournament") -> list[Pair]:
    """RSO's rso-sample-rank ("Statistical Rejection Sampling Improves Preference Optimization", Liu et al.,
    2023): ``num_select`` candidates accepted by :func:`rso_select` (candidate i accepted with probability
    a_i = exp((r_i - r_max) / beta), so accepted ones follow pi*(i) = exp(r_i / beta) / Z), shuffled, then paired
    (``pairing``: tournament or all_pairs) and labelled by reward, chosen = the higher reward."""
    pair = _pairing(pairing)
    return pair(_shuffled(rso_select(rewards, num_select, beta, generator), generator), rewards)


@PAIR_SELECTIONS.register("random_pairs")
def random_pairs(rewards: Tensor | Sequence[float], *, num_select: int, beta: float = math.inf,
                 generator: torch.Generator | None = None, pairing: str = "tournament") -> list[Pair]:
    """RSO's sft-sample-rank baseline (Liu et al., 2023; SLiC-HF's sample-and-rank, Zhao et al., 2023):
    ``num_select`` scored candidates drawn uniformly without replacement (SFT samples as they come: rso with
    beta = infinity, every a_i = 1), paired and labelled by reward, chosen = the higher. ``beta`` is not used."""
    pair = _pairing(pairing)
    return pair(_shuffled(scored_indices(rewards), generator)[:num_select], rewards)


@PAIR_SELECTIONS.register("best_worst")
def best_worst(rewards: Tensor | Sequence[float], *, num_select: int = 2, beta: float = math.inf,
               generator: torch.Generator | None = None, pairing: str = "tournament") -> list[Pair]:
    """Best-versus-worst of N, the common heuristic of iterative DPO (e.g. "RLHF Workflow", Dong et al., 2024):
    chosen = argmax_i r_i, rejected = argmin_i r_i (ties for either broken uniformly at random), one pair per
    prompt, none when every scored reward is equal. ``num_select``, ``beta`` and ``pairing`` are not used."""
    values = _as_rewards(rewards)
    scored = scored_indices(values)
    if not scored:
        return []
    finite = values[scored]
    high, low = finite.max(), finite.min()
    if high == low:
        return []

    def pick(target: Tensor) -> int:
        tied = [i for i in scored if values[i] == target]
        return tied[int(torch.randint(len(tied), (1,), generator=generator))]

    return [(pick(high), pick(low))]


def select_pairs(name: str, rewards: Tensor | Sequence[float], *, num_select: int, beta: float,
                 generator: torch.Generator | None = None, pairing: str = "tournament") -> list[Pair]:
    """(chosen, rejected) candidate index pairs from the selection registered as ``name`` in ``PAIR_SELECTIONS``
    (an ``UnknownNameError`` naming the valid ones otherwise)."""
    fn = PAIR_SELECTIONS.get(name)
    return fn(rewards, num_select=num_select, beta=beta, generator=generator, pairing=pairing)
