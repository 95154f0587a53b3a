"""``posttrain make-tiny-model``: build a small local model for tests and quickstarts."""

from __future__ import annotations

import argparse
import json

from posttrain.errors import UserError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "make-tiny-model",
        help="build a tiny Llama-style model and BPE tokenizer locally",
        description=(
            "Build a deterministic tiny Llama-style causal LM (head_dim 64) with a byte-level BPE tokenizer "
            "trained locally and a chat template, saved with save_pretrained. No hub access is needed."
        ),
    )
    parser.add_argument("out_dir", help="directory to write the model and tokenizer to")
    parser.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size (default 1024)")
    parser.add_argument("--hidden-size", type=int, default=128, help="hidden size, a multiple of 64 (default 128)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default hidden-size / 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and tokenizer (default 0)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from posttrain.models.tiny import make_tiny_model

    if args.hidden_size % 64 or args.hidden_size <= 0:
        raise UserError(f"--hidden-size must be a positive multiple of 64 (head_dim), got {args.hidden_size}.")
    if args.vocab_size < 300:
        raise UserError(f"--vocab-size must be at least 300 (256 bytes plus merges), got {args.vocab_size}.")
    out = make_tiny_model(
        args.out_dir,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=args.heads or args.hidden_size // 64,
        seed=args.seed,
    )
    info = json.loads((out / "posttrain_tiny.json").read_text())
    print(f"wrote a tiny model with {info['parameters']:,} parameters to {out}")
    return 0
