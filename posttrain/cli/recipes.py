"""``posttrain recipes``: list the recipes that ship."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml


def recipes_dir() -> Path:
    """The repository's ``recipes/`` directory (posttrain is installed editable from its checkout)."""
    return Path(__file__).resolve().parents[2] / "recipes"


def describe(path: Path) -> tuple[str, str]:
    """(trainer, first comment line) of a recipe file."""
    text = path.read_text()
    first = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), "")
    try:
        trainer = (yaml.safe_load(text) or {}).get("trainer", "?")
    except yaml.YAMLError:
        trainer = "?"
    return str(trainer), first


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("recipes", help="list the recipes that ship",
                                   description="List the recipes in recipes/ with their trainer and purpose.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    root = recipes_dir()
    files = sorted(root.glob("*.yaml"))
    if not files:
        print(f"no recipes found in {root}")
        return 1
    width = max(len(f.stem) for f in files)
    print(f"{'recipe'.ljust(width)}  trainer  description")
    for path in files:
        trainer, text = describe(path)
        print(f"{path.stem.ljust(width)}  {trainer.ljust(7)}  {text}")
    print(f"\nrun one with: posttrain run {root.relative_to(Path.cwd()) if root.is_relative_to(Path.cwd()) else root}/NAME.yaml")
    return 0
