"""The DPO family's pure parts: sequence log-probs of a pair's chosen and rejected responses (policy and
reference) and the per-pair losses of ``dpo.loss_type`` (weighted sum of ``posttrain.algorithms`` preference losses)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from posttrain import algorithms
from posttrain.data.preference import PreferenceExample
from posttrain.errors import DataError
from posttrain.learner.logprobs import completion_logprobs
from posttrain.trainers.reference import (
    FrozenReference,
)

if TYPE_CHECKING:
    from posttrain.trainers.dpo import DPOSettings


def sequence_logps(forward, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs [N] and completion token counts [N] of a collated batch under ``forward``."""
    logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return completion_logprobs(logits, batch["input_ids"], batch["completion_mask"])


def policy_pair_logps(forward, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Policy log-prob sums and lengths of a ``collate_preference`` batch (chosen rows first, then rejected):
    one concatenated forward for both."""
    sums, counts = sequence_logps(forward, batch)
    chosen, rejected = sums.chunk(2)
    chosen_len, rejected_len = counts.chunk(2)
    return {"chosen": chosen, "rejected": rejected, "chosen_len": chosen_len, "rejected_len": rejected_len}


def reference_pair_logps(reference: FrozenReference, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference log-prob sums (``ref_chosen``, ``ref_rejected``) of the same batch, without a graph."""
    sums, _ = reference.sequence_logps(batch)
    ref_chosen, ref_rejected = sums.chunk(2)
    return {"ref_chosen": ref_chosen, "ref_rejected": ref_rejected}


def modpo_margin_rewards(examples: list[PreferenceExample]) -> dict[str, torch.Tensor]:
    """MODPO's margin rewards [B, K-1] of chosen and rejected, from the data's columns."""
    missing = next((i for i, e in enumerate(examples) if e.margin_rewards is None), None)
    if missing is not None:
        raise DataError("dpo.loss_type modpo needs the columns margin_rewards_chosen and margin_rewards_rejected on "
                        "every row (the other objectives' rewards of each completion, e.g. from posttrain score).")
    widths = {len(e.margin_rewards[0]) for e in examples}
    if len(widths) > 1:
        raise DataError(f"dpo.loss_type modpo: rows have different numbers of margin rewards ({sorted(widths)}).")
    return {"margin_rewards_chosen": torch.tensor([e.margin_rewards[0] for e in examples]),
            "margin_rewards_rejected": torch.tensor([e.margin_rewards[1] for e in examples])}


def pair_losses(settings: DPOSettings, logps: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-pair loss: the weighted sum of the configured preference losses.

    ``logps`` holds summed log-probs (``chosen``, ``rejected`` and, unless every loss is
    reference-free, ``ref_chosen``, ``ref_rejected``) and completion token counts.
    """
    return algorithms.preference_loss(
        settings.loss_type, logps["chosen"], logps["rejected"], logps.get("ref_chosen"), logps.get("ref_rejected"),
        beta=settings.beta, label_smoothing=settings.label_smoothing, loss_weights=settings.loss_weights,
        chosen_lengths=logps["chosen_len"], rejected_lengths=logps["rejected_len"],
        **{k: logps[k] for k in ("margin_rewards_chosen", "margin_rewards_rejected") if k in logps},
        **settings.loss_args)
