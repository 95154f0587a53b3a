"""``bleu``: sentence BLEU of the completion against a ``references`` column, in [0, 1].

The score equals ``sacrebleu.sentence_bleu(completion, references).score / 100`` with
sacrebleu's defaults (exponential smoothing, 13a tokenisation, effective order), as
in BLEUBERI (Chang et al., 2025, "BLEUBERI: BLEU is a surprisingly effective reward
for instruction following").
"""

from __future__ import annotations

from reward_models.registry import reward_factory
from reward_models.text import completion_text
from reward_models.types import Column, RewardOutput, declare_columns

REFERENCES = Column("references", (str, list), "a reference string or a list of reference strings")


@reward_factory
def bleu(*, lowercase: bool = False, tokenize: str | None = None, smooth_method: str = "exp",
         smooth_value: float | None = None, column: str = "references"):
    """Build the reward; the arguments are sacrebleu's (``tokenize=None`` means sacrebleu's default, 13a).

    A row whose references are missing or empty scores ``None`` (no opinion).
    """
    from sacrebleu.metrics import BLEU

    metric = BLEU(lowercase=lowercase, tokenize=tokenize, smooth_method=smooth_method,
                  smooth_value=smooth_value, effective_order=True)

    def bleu_reward(prompts: list, completions: list, **columns) -> RewardOutput:
        refs_column = columns.get(column)
        if refs_column is None:
            raise KeyError(f"bleu needs a {column!r} column (a reference string or a list of them)")
        scores: list[float | None] = []
        info: list[dict] = []
        for completion, refs in zip(completions, refs_column, strict=True):
            refs = [refs] if isinstance(refs, str) else list(refs or [])
            if not refs or not all(isinstance(r, str) for r in refs):
                scores.append(None)
                info.append({"skipped": "no reference strings"})
                continue
            scores.append(metric.sentence_score(completion_text(completion), refs).score / 100.0)
            info.append({})
        return RewardOutput(scores, info)

    bleu_reward.__name__ = "bleu"
    return declare_columns(bleu_reward, Column(column, REFERENCES.types, REFERENCES.description))
