"""Run one recipe in this process: ``torchrun -m posttrain.run RECIPE.yaml [key=value ...]``.

Every rank runs this same program (SPMD) and takes its role from its rank.
``posttrain run`` calls it in-process for one process, or launches torchrun
with it for several.
"""

from __future__ import annotations

import argparse
import os
import sys

from posttrain.distributed import configure_environment


def run_recipe(recipe_path: str, overrides: list[str]) -> dict:
    """Validate, set up, train and save; returns the run summary (raises UserError on bad input)."""
    configure_environment()
    from posttrain.config.loader import load_recipe
    from posttrain.distributed import init_distributed
    from posttrain.trainers import trainer_module
    from posttrain.trainers.common import setup_logging

    cfg = load_recipe(recipe_path, overrides)
    rollout = getattr(cfg, "rollout", None)  # online recipes: their placement decides each rank's role
    if rollout is not None:
        from posttrain.rollout.layout import check_layout

        world_size = int(os.environ.get("WORLD_SIZE", 1))
        rollout.learner_ranks(world_size, recipe_path)
        check_layout(rollout, rollout.model or cfg.model.path, world_size, recipe_path)
    dist = init_distributed(rollout.rollout_ranks if rollout is not None else 0,
                            rollout.tensor_parallel_size if rollout is not None else 1)
    setup_logging(dist.is_main)
    if dist.role == "rollout":
        from posttrain.rollout.remote import serve

        serve(cfg, dist)
        return {}
    recipe = trainer_module(cfg.trainer).Recipe(cfg, dist, source=recipe_path)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        cleanup = getattr(recipe, "cleanup", None)
        if cleanup is not None:
            cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.run", description=__doc__)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    args = parser.parse_args(argv)
    from posttrain.cli.main import print_user_error
    from posttrain.errors import UserError

    try:
        run_recipe(args.recipe, args.overrides)
    except UserError as err:
        print_user_error(err)
        return err.exit_code
    finally:
        from posttrain.distributed import destroy

        destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
