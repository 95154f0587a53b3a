"""Causal LM checkpoints with a scoring head: reward models (one score) and PRMs (per-token labels)."""

from __future__ import annotations

from posttrain.config.schema import ModelConfig
from posttrain.errors import UserError
from posttrain.models.loading import check_model_path


def load_scoring_model(cfg: ModelConfig, kind: str, pad_token_id: int | None):
    """``kind='sequence'``: AutoModelForSequenceClassification with 1 label (a reward);
    ``kind='token'``: AutoModelForTokenClassification with 2 labels (a step is good / bad).

    From a causal LM checkpoint the head is new (seeded by the caller); from a
    checkpoint of the same kind it is loaded.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    check_model_path(cfg.path)
    auto, labels = {"sequence": (AutoModelForSequenceClassification, 1),
                    "token": (AutoModelForTokenClassification, 2)}[kind]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    try:
        model = auto.from_pretrained(cfg.path, num_labels=labels, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load model.path {cfg.path!r} as a {kind}-scoring model: {err}") from None
    if pad_token_id is not None:
        # The sequence head pools at the last token that is not config.pad_token_id: it must be the id
        # batches are padded with, or padding would be read as the last token.
        model.config.pad_token_id = pad_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model
