"""Entry point of the ``posttrain`` command.

Every subcommand module exposes ``add_parser(subparsers)``, which registers an
``argparse`` parser whose ``func`` default takes the parsed arguments and
returns an exit status. User errors are caught here, once, and printed as one
paragraph with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from posttrain import __version__
from posttrain.errors import UserError

# Imported lazily by name so that `posttrain --help` stays fast and a missing
# optional dependency of one command does not break the others.
COMMAND_MODULES = (
    "posttrain.cli.run",
    "posttrain.cli.recipes",
    "posttrain.cli.tiny",
    "posttrain.cli.data",
    "posttrain.cli.score",
    "posttrain.cli.serve_reward",
    "posttrain.cli.eval",
    "posttrain.cli.pairs",
)

DESCRIPTION = """\
posttrain: post-training for language models.

Typical first steps:
  posttrain recipes                       list the recipes that ship
  posttrain make-tiny-model runs/tiny     build a tiny local model and tokenizer
  posttrain run recipes/sft.yaml          run a recipe (add --nproc 2 for torchrun)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posttrain",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"posttrain {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # the command is not part of this install yet
                continue
            raise
        module.add_parser(subparsers)
    return parser


def print_user_error(err: UserError) -> None:
    """One paragraph on one line (the terminal wraps it; grep still finds it)."""
    from posttrain.errors import print_user_error as print_once

    print_once(err)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `posttrain run r.yaml --nproc 2 a.b=1`: overrides may come after options.
        if getattr(args, "accepts_overrides", False) and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print_user_error(err)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
