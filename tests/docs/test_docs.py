"""Docs generated from code stay in step with it."""

from __future__ import annotations

from tests.conftest import REPO


def test_config_reference_is_current():
    from posttrain.config.docs import render

    assert (REPO / "docs" / "config.md").read_text() == render(), "run: python -m posttrain.config.docs"


def test_every_recipe_validates():
    from posttrain.config.loader import load_recipe

    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        load_recipe(path)
