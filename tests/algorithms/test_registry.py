"""Registries: the names recipes use, error messages, extension, and docstring conventions."""

from __future__ import annotations

import re

import pytest
import torch

import posttrain.algorithms as algos
from posttrain.algorithms import (
    ADVANTAGE_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    PREFERENCE_LOSSES,
    PolicyLossOutput,
    Registry,
    UnknownNameError,
    compute_policy_loss,
)
from posttrain.errors import ConfigError

EXPECTED = {
    "POLICY_LOSSES": {"ppo", "gspo", "cispo", "clip_cov", "kl_cov", "oreal"},
    "ADVANTAGE_ESTIMATORS": {
        "grpo",
        "dr_grpo",
        "rloo",
        "reinforce_pp_baseline",
        "bnpo",
        "remax",
        "reinforce",
        "spo",
        "oreal",
    },
    "TOKEN_ADVANTAGE_ESTIMATORS": {"gae", "egae", "discounted_returns", "reinforce_pp"},
    "PREFERENCE_LOSSES": {
        "sigmoid",
        "cdpo",
        "hinge",
        "ipo",
        "sigmoid_norm",
        "robust",
        "exo_pair",
        "nca_pair",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
        "discopop",
        "sft",
        "rpo",
        "simpo",
        "cpo",
        "orpo",
        "kto",
        "modpo",
    },
    "LOSS_AGGREGATIONS": {
        "token-mean",
        "seq-mean-token-sum",
        "seq-mean-token-mean",
        "seq-mean-token-sum-norm",
    },
    "KL_ESTIMATORS": {"k1", "k2", "k3", "low_var_kl", "k1+", "k3+"},
    "RANKING_LOSSES": {"lambda", "listmle", "pairwise_logistic", "softmax"},
    "ENSEMBLE_REDUCTIONS": {"mean", "wco", "uwo"},
    "OBJECTIVE_COMBINATIONS": {"weighted_sum", "maxmin", "min", "softmin"},
    "PAIR_SELECTIONS": {"rso", "best_worst", "random_pairs"},
    "LENGTH_REWARDS": {"cosine", "linear"},
}


@pytest.mark.parametrize("registry_name", sorted(EXPECTED))
def test_registered_names(registry_name):
    registry = getattr(algos, registry_name)
    assert set(registry.names()) == EXPECTED[registry_name]
    assert len(registry) == len(EXPECTED[registry_name])


@pytest.mark.parametrize(
    "registry,typo,suggestion",
    [
        (POLICY_LOSSES, "gpso", "gspo"),
        (ADVANTAGE_ESTIMATORS, "grpo_", "grpo"),
        (PREFERENCE_LOSSES, "simpo2", "simpo"),
        (LOSS_AGGREGATIONS, "seq-mean-token-means", "seq-mean-token-mean"),
    ],
)
def test_unknown_name_lists_valid_names_and_closest(registry, typo, suggestion):
    with pytest.raises(ValueError) as info:
        registry.get(typo)
    message = str(info.value)
    assert f"Did you mean {suggestion!r}" in message
    for name in registry.names():
        assert name in message
    assert isinstance(info.value, UnknownNameError) and isinstance(info.value, ConfigError)


def test_no_suggestion_for_unrelated_names_and_bad_types():
    with pytest.raises(ValueError) as info:
        POLICY_LOSSES.get("zzzzzzzz")
    assert "Did you mean" not in str(info.value)
    with pytest.raises(ValueError):
        POLICY_LOSSES.get(["ppo"])  # unhashable: still a clean ValueError


def test_third_party_registration_is_usable_by_name():
    registry = Registry("demo")

    @registry.register("double")
    def double(x):
        return 2 * x

    assert registry.get("double")(2) == 4 and "double" in registry
    with pytest.raises(ValueError, match="already registered"):
        registry.register("double", lambda x: x)

    @POLICY_LOSSES.register("test_vanilla_pg")
    def vanilla(logprobs, old_logprobs, advantages, mask, **_):
        return PolicyLossOutput(-advantages.unsqueeze(1) * logprobs * mask)

    try:
        lp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
        out = compute_policy_loss(
            "test_vanilla_pg", lp, lp, torch.tensor([2.0], dtype=torch.float64), torch.ones(1, 2)
        )
        assert out.loss.item() == pytest.approx(3.0)
    finally:
        POLICY_LOSSES._items.pop("test_vanilla_pg")


YEAR = re.compile(r"\b(19|20)\d\d\b")


@pytest.mark.parametrize("registry_name", sorted(EXPECTED))
def test_registered_functions_cite_a_paper_with_its_year(registry_name):
    registry = getattr(algos, registry_name)
    for name in registry.names():
        doc = registry.get(name).__doc__ or ""
        assert YEAR.search(doc), name
        assert "=" in doc, name  # the formula, in plain text


def test_public_api_has_docstrings_and_type_hints():
    for name in algos.__all__:
        obj = getattr(algos, name)
        if callable(obj) and not isinstance(obj, Registry):
            assert (obj.__doc__ or "").strip(), name
            if not isinstance(obj, type):
                assert "return" in obj.__annotations__, name
