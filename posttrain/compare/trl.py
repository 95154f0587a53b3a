"""Build TRL trainers on the same model, data and settings as a posttrain recipe.

Used by the parity tests (same first-step loss and gradients) and by
``scripts/bench.py`` (throughput side by side). TRL is a dependency of the
product for exactly this: reference formats, reward signatures, parity.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: str | Path, columns: tuple[str, ...]) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [{k: r[k] for k in columns} for r in rows]


def dpo_trainer(model_path: str, rows: list[dict], out_dir: str | Path, *, batch_size: int, lr: float, beta: float,
                loss_type: str = "sigmoid", max_steps: int = 10, max_length: int = 128, seed: int = 0,
                precompute_ref_log_probs: bool = False, logging_steps: int = 1):
    """A TRL ``DPOTrainer`` on CPU in fp32, no dropout, no shuffling surprises (seeded)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    args = DPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, max_steps=max_steps, beta=beta,
        loss_type=[loss_type], max_length=max_length, use_cpu=True, bf16=False, fp16=False, report_to=[],
        save_strategy="no", logging_steps=logging_steps, seed=seed, data_seed=seed, dataloader_num_workers=0,
        precompute_ref_log_probs=precompute_ref_log_probs, disable_dropout=True, max_grad_norm=1e9,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
    )
    return DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                      processing_class=tokenizer)
