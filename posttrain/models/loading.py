"""Load users' models and tokenizers from local paths (or a hub name when one is reachable)."""

from __future__ import annotations

from pathlib import Path

from posttrain.config.schema import ModelConfig
from posttrain.errors import UserError


def check_model_path(path: str) -> None:
    """Fail early, in user terms, for a model path that cannot be loaded."""
    location = Path(path)
    looks_local = path.startswith((".", "/", "~")) or location.exists() or path.count("/") != 1
    if looks_local and not location.exists():
        raise UserError(
            f"model.path {path!r} does not exist.",
            hint="Build a local model with `posttrain make-tiny-model DIR`, or point model.path at a "
            "Hugging Face model directory.",
        )
    if location.is_dir() and not (location / "config.json").is_file():
        raise UserError(f"model.path {path!r} is a directory without config.json: not a Hugging Face model.")


def load_tokenizer(cfg: ModelConfig, chat_template: str | None = None):
    from transformers import AutoTokenizer

    check_model_path(cfg.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load a tokenizer from model.path {cfg.path!r}: {err}") from None
    if chat_template:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"the tokenizer of {cfg.path!r} is not a fast tokenizer; posttrain needs offsets to mask losses.")
    return tokenizer


def load_causal_lm(cfg: ModelConfig):
    import torch
    from transformers import AutoModelForCausalLM

    check_model_path(cfg.path)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load a causal LM from model.path {cfg.path!r}: {err}") from None
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model
