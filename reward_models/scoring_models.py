"""Shared by ``orm`` and ``prm``: loading a local scoring checkpoint, chat rendering, batching."""

from __future__ import annotations

from pathlib import Path

from posttrain.errors import UserError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def load_checkpoint(path: str, auto_class_name: str, device: str, dtype: str, what: str):
    """(tokenizer, model in eval mode on ``device``) from a local checkpoint directory."""
    import torch
    import transformers

    if dtype not in DTYPES:
        raise UserError(f"{what}: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    if not Path(path).is_dir():
        raise UserError(f"{what}: model directory {path!r} does not exist.",
                        hint="Give the path of a checkpoint saved with save_pretrained (model and tokenizer).")
    auto_class = getattr(transformers, auto_class_name)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        model = auto_class.from_pretrained(
            path, dtype="auto" if dtype == "auto" else getattr(torch, dtype))
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{what}: cannot load {path!r} as {auto_class_name} with its tokenizer: {err}") from None
    if model.config.pad_token_id is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        model.config.pad_token_id = pad
    try:
        model.to(device)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"{what}: cannot move the model to device {device!r}: {err}") from None
    model.eval()
    return tokenizer, model


def pad_id(tokenizer, model) -> int:
    for candidate in (model.config.pad_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def render_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    """A conversation as text through the tokenizer's chat template (which must exist)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the data is conversational but the model's tokenizer has no chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def as_messages(value: object, role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": str(value)}]


def batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding), longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padded(sequences: list[list[int]], pad: int, device: str):
    """Right-padded ``input_ids`` and ``attention_mask`` tensors on ``device``."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids.to(device), mask.to(device)
