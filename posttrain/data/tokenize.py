"""Tokenisation with loss masks.

Trainable spans are found on the rendered *string* (by rendering growing
prefixes of a conversation), then mapped to tokens through the fast
tokenizer's offsets. That keeps masking right for any chat template whose
renders are prefix-stable, without needing ``{% generation %}`` markers.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.data.formats import sft_kind
from posttrain.data.loading import Row
from posttrain.errors import DataError, UserError

IGNORE = -100


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken

    @property
    def num_trainable(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


def render_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the tokenizer has no chat template, but the data is conversational.",
            hint="Set data.chat_template in the recipe, or use prompt/completion strings.",
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    text = render_chat(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = render_chat(tokenizer, messages[: i + 1])
        if not text.startswith(before) or not text.startswith(through):
            raise DataError(
                f"{where}: the chat template does not render conversations prefix-stably, so assistant turns "
                "cannot be located for loss masking. Use a template whose render of the first k messages is a "
                "prefix of the render of all messages."
            )
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_spans(tokenizer, text: str, spans: list[tuple[int, int]] | None) -> TokenizedExample:
    """Tokenise ``text``; tokens overlapping ``spans`` are trainable (all if spans is None).

    Overlap, not start position, because byte-level BPE merges a prompt's
    trailing space into the completion's first token (" 7").
    """
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    if spans is None:
        return TokenizedExample(ids, list(ids))
    labels = []
    for token, (start, end) in zip(ids, encoded["offset_mapping"]):
        trainable = any(start < hi and end > lo for lo, hi in spans)
        labels.append(token if trainable else IGNORE)
    return TokenizedExample(ids, labels)


def sft_example(tokenizer, row: Row) -> TokenizedExample:
    """Tokenise one SFT row; loss only on assistant/completion tokens (all tokens for ``text``)."""
    kind = sft_kind(row)
    eos = tokenizer.eos_token or ""
    if kind == "messages":
        text, spans = assistant_spans(tokenizer, row.data["messages"], row.where)
        return tokenize_spans(tokenizer, text, spans)
    if kind == "text":
        return tokenize_spans(tokenizer, row.data["text"] + eos, None)
    prompt, completion = row.data["prompt"], row.data["completion"]
    if isinstance(prompt, list):
        text, spans = assistant_spans(tokenizer, prompt + completion, row.where)
        # Only the completion's turns are trained, not assistant turns inside the prompt.
        prompt_len = len(render_chat(tokenizer, prompt, add_generation_prompt=True))
        spans = [(max(lo, prompt_len), hi) for lo, hi in spans if hi > prompt_len]
        return tokenize_spans(tokenizer, text, spans)
    return tokenize_spans(tokenizer, prompt + completion + eos, [(len(prompt), len(prompt) + len(completion) + len(eos))])


@dataclass
class LengthReport:
    """What happened to over-long or empty examples (reported in the log)."""

    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0

    def summary(self) -> str:
        return (
            f"{self.truncated} truncated, {self.dropped_too_long} dropped as too long, "
            f"{self.dropped_no_target} dropped with no trainable tokens left"
        )


def fit_length(
    example: TokenizedExample, max_length: int, policy: str, where: str, report: LengthReport
) -> TokenizedExample | None:
    """Apply the ``data.overlong`` policy; ``None`` means the example is skipped (and counted)."""
    if len(example.input_ids) > max_length:
        if policy == "error":
            raise DataError(
                f"{where}: {len(example.input_ids)} tokens, longer than data.max_length={max_length}.",
                hint="Raise data.max_length, or set data.overlong to 'truncate' or 'drop'.",
            )
        if policy == "drop":
            report.dropped_too_long += 1
            return None
        report.truncated += 1
        example = TokenizedExample(example.input_ids[:max_length], example.labels[:max_length])
    if example.num_trainable == 0:
        report.dropped_no_target += 1
        return None
    return example


def pack_examples(examples: list[TokenizedExample], max_length: int) -> list[TokenizedExample]:
    """Greedy in-order packing of whole examples into rows of at most ``max_length`` tokens.

    Examples in one row share attention (the usual packing trade-off on
    attention kernels without variable-length support); no example is split.
    """
    packed: list[TokenizedExample] = []
    ids: list[int] = []
    labels: list[int] = []
    for example in examples:
        if ids and len(ids) + len(example.input_ids) > max_length:
            packed.append(TokenizedExample(ids, labels))
            ids, labels = [], []
        ids = ids + example.input_ids
        labels = labels + example.labels
    if ids:
        packed.append(TokenizedExample(ids, labels))
    return packed


def collate(examples: list[TokenizedExample], pad_token_id: int) -> dict:
    """Right-pad a micro-batch into ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[i, :n] = torch.tensor(example.input_ids)
        labels[i, :n] = torch.tensor(example.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
