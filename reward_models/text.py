"""Text helpers shared by built-in rewards: the text of a completion and code extraction."""

from __future__ import annotations

import re

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3", "py3", ""}


def completion_text(completion: object) -> str:
    """The text of a completion: the string itself, or the content of the last message of a list.

    Conversational completions are lists of ``{"role", "content"}`` messages (TRL's format);
    a reward that reads text reads the final assistant message.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion:
        last = completion[-1]
        if isinstance(last, dict):
            content = last.get("content", "")
            if isinstance(content, list):  # multimodal content parts: keep the text ones
                return "".join(part.get("text", "") for part in content if isinstance(part, dict))
            return "" if content is None else str(content)
    if isinstance(completion, list):
        return ""
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def prompt_text(prompt: object) -> str:
    """The text of a prompt: the string itself, or its messages' contents joined by newlines."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict))
    return "" if prompt is None else str(prompt)


def extract_code(text: str, mode: str = "last") -> str:
    """The Python code in a model's answer.

    ``mode``: ``"last"`` (the last fenced block tagged python/py or untagged), ``"first"``,
    ``"all"`` (those blocks joined), or ``"none"`` (the text as is). When the text has no
    such fenced block it is returned unchanged: a raw continuation is code already.
    An unclosed final fence (a completion cut at max length) still counts as a block.
    """
    if mode == "none":
        return text
    blocks = [body for tag, body in _FENCE.findall(text) if tag.lower() in _PYTHON_TAGS]
    if not blocks:
        return text
    if mode == "first":
        return blocks[0]
    if mode == "last":
        return blocks[-1]
    if mode == "all":
        return "\n\n".join(blocks)
    raise ValueError(f"unknown extract mode {mode!r}; expected last, first, all or none")
