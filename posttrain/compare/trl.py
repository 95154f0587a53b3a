"""Build TRL trainers on the same model, data and settings as a posttrain recipe.

Used by the parity tests (same first-step loss and gradients) and by
``scripts/bench.py`` (throughput side by side). TRL is an optional extra for
exactly this (``pip install -e .[compare]``): nothing else imports it.
"""

from __future__ import annotations

import json
from pathlib import Path


def _trl():
    """The ``trl`` module, or a clear error naming the extra that installs it."""
    try:
        import trl
    except ImportError as e:
        raise ImportError("posttrain.compare needs TRL, an optional extra: pip install -e .[compare]") from e
    return trl


def read_jsonl(path: str | Path, columns: tuple[str, ...]) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [{k: r[k] for k in columns} for r in rows]


def dpo_trainer(model_path: str, rows: list[dict], out_dir: str | Path, *, batch_size: int, lr: float, beta: float,
                loss_type: str = "sigmoid", max_steps: int = 10, max_length: int = 128, seed: int = 0,
                precompute_ref_log_probs: bool = False, logging_steps: int = 1):
    """A TRL ``DPOTrainer`` on CPU in fp32, no dropout, no shuffling surprises (seeded)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    trl = _trl()
    DPOConfig, DPOTrainer = trl.DPOConfig, trl.DPOTrainer

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


def grpo_trainer(model_path: str, rows: list[dict], out_dir: str | Path, *, reward_funcs: list, num_generations: int,
                 prompts_per_step: int, max_completion_length: int, lr: float, max_steps: int, seed: int = 0,
                 temperature: float = 1.0, use_vllm: bool = False, vllm_kv_cache_gib: int = 1,
                 loss_type: str = "dapo", beta: float = 0.0, scale_rewards: str = "group", **config):
    """A TRL ``GRPOTrainer`` on CPU in fp32 with posttrain's GRPO recipe settings.

    One rollout of ``prompts_per_step`` prompts x ``num_generations`` samples per optimizer step (one
    micro-batch, one iteration), by default no reference model (``beta=0``), clip 0.2 on both sides,
    token-mean loss over the batch (TRL's ``dapo``), advantages scaled by the group's std; ``loss_type``,
    ``beta`` and ``scale_rewards`` are TRL's settings of those names; ``config`` goes to ``GRPOConfig``. With ``use_vllm`` it samples with
    a vLLM engine in its own process (``vllm_mode="colocate"``), whose CPU KV cache gets ``vllm_kv_cache_gib``.
    """
    import os

    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    trl = _trl()
    GRPOConfig, GRPOTrainer = trl.GRPOConfig, trl.GRPOTrainer

    if use_vllm:  # vLLM's CPU default reserves a share of all memory and fails on busy machines (docs/rollout.md)
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(vllm_kv_cache_gib)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    args = GRPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=prompts_per_step * num_generations,
        gradient_accumulation_steps=1, num_generations=num_generations, max_completion_length=max_completion_length,
        temperature=temperature, top_p=1.0, top_k=0, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
        max_steps=max_steps, beta=beta, num_iterations=1, epsilon=0.2, loss_type=loss_type, scale_rewards=scale_rewards,
        mask_truncated_completions=False, use_cpu=True, bf16=False, fp16=False, report_to=[], save_strategy="no",
        logging_steps=10**6, log_completions=False, seed=seed, data_seed=seed, dataloader_num_workers=0,
        disable_dropout=True, max_grad_norm=1.0, weight_decay=0.0, use_vllm=use_vllm, vllm_mode="colocate",
        vllm_enable_sleep_mode=False, **config,
    )
    return GRPOTrainer(model=model, reward_funcs=reward_funcs, args=args,
                       train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
