"""Config dataclasses shared by every trainer.

Each field's ``help`` is its documentation; ``docs/recipes.md`` is generated
from these (``python -m posttrain.config.docs``). Defaults are chosen to work on
a laptop-sized CPU run and to be sane on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from posttrain.errors import ConfigError


def doc(default, help: str, **kwargs):  # noqa: A002 - mirrors dataclasses.field's vocabulary
    """A dataclass field with a default and a help string."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    if callable(default) and isinstance(default, type):
        return field(default_factory=default, metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class LoraConfig:
    enabled: bool = doc(False, "Train a PEFT LoRA adapter instead of all weights.")
    r: int = doc(8, "LoRA rank.")
    alpha: int = doc(16, "LoRA alpha (scaling = alpha / r).")
    dropout: float = doc(0.0, "Dropout on the LoRA input.")
    target_modules: list[str] = doc(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Module names that get adapters.",
    )
    save_merged: bool = doc(False, "Also save the base model with the adapter merged in each checkpoint.")


@dataclass
class ModelConfig:
    path: str | None = doc(None, "Local directory (or hub name when a hub is reachable) of a causal LM.")
    dtype: Literal["float32", "bfloat16"] = doc("float32", "Dtype the weights are loaded in.")
    trust_remote_code: bool = doc(False, "Passed to from_pretrained.")
    gradient_checkpointing: bool = doc(False, "Recompute activations in backward to save memory.")
    lora: LoraConfig = doc(LoraConfig, "PEFT LoRA settings.")

    def validate(self, source: str) -> None:
        if not self.path:
            raise ConfigError(f"model.path is not set in {source}.", hint="Point it at a model directory, e.g. one made by `posttrain make-tiny-model`.")


@dataclass
class DataConfig:
    path: str | None = doc(None, "Training data: a .jsonl/.json/.parquet/.csv file, a saved `datasets` directory, or a hub dataset name.")
    eval_path: str | None = doc(None, "Held-out data; when unset, `eval_fraction` of `path` is held out.")
    eval_fraction: float = doc(0.1, "Share of the training rows held out for evaluation when `eval_path` is unset.")
    split: str = doc("train", "Split to read from a saved DatasetDict or hub dataset.")
    columns: dict = doc({}, "Map of expected column name to the column name in your file, e.g. {prompt: question}.")
    max_length: int = doc(512, "Longest tokenised example (prompt + completion).")
    overlong: Literal["truncate", "drop", "error"] = doc(
        "truncate", "What to do with examples longer than max_length: cut the end, skip and count, or stop."
    )
    invalid_rows: Literal["error", "skip"] = doc(
        "error", "A row that breaks the format (missing field, empty text, bad role, chosen == rejected): stop "
        "with an error naming file, row and field, or skip it and count it in the log."
    )
    packing: bool = doc(False, "Pack several examples into one max_length row (SFT).")
    shuffle: bool = doc(True, "Shuffle the training data each epoch (seeded).")
    chat_template: str | None = doc(None, "A Jinja chat template that replaces the tokenizer's.")

    def validate(self, source: str) -> None:
        if not self.path:
            raise ConfigError(f"data.path is not set in {source}.", hint="Point it at a JSONL/JSON/Parquet/CSV file or a saved dataset.")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction in {source} must be in [0, 1), got {self.eval_fraction}.")
        if self.max_length < 8:
            raise ConfigError(f"data.max_length in {source} must be at least 8, got {self.max_length}.")


@dataclass
class LearnerConfig:
    zero_stage: Literal[0, 1, 2, 3] = doc(0, "DeepSpeed ZeRO stage.")
    precision: Literal["fp32", "bf16"] = doc("fp32", "Training precision (bf16 keeps fp32 master weights).")
    lr: float = doc(1e-4, "Peak learning rate.")
    weight_decay: float = doc(0.0, "AdamW weight decay.")
    betas: list[float] = doc([0.9, 0.999], "AdamW betas.")
    eps: float = doc(1e-8, "AdamW epsilon.")
    grad_clip: float = doc(1.0, "Clip the global gradient norm to this (0 disables).")
    scheduler: Literal["constant", "linear", "cosine"] = doc("cosine", "Learning-rate schedule after warmup.")
    warmup_steps: int = doc(0, "Linear warmup steps.")
    min_lr_ratio: float = doc(0.0, "Final learning rate as a share of the peak (linear and cosine).")

    def validate(self, source: str) -> None:
        if len(self.betas) != 2:
            raise ConfigError(f"learner.betas in {source} must have two values, got {self.betas}.")
        if self.lr <= 0:
            raise ConfigError(f"learner.lr in {source} must be positive, got {self.lr}.")


@dataclass
class TrainConfig:
    epochs: int = doc(1, "Passes over the training data.")
    max_steps: int | None = doc(None, "Stop after this many optimizer steps (overrides epochs).")
    global_batch_size: int = doc(16, "Examples per optimizer step, over all ranks and accumulation steps.")
    micro_batch_size: int = doc(4, "Examples per forward pass on one rank.")
    eval_every: int = doc(0, "Evaluate every N optimizer steps (0: at the start and the end only).")
    eval_batch_size: int = doc(8, "Examples per forward pass during evaluation.")
    log_every: int = doc(1, "Write metrics every N optimizer steps.")

    def validate(self, source: str) -> None:
        for name in ("epochs", "global_batch_size", "micro_batch_size", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} in {source} must be at least 1, got {getattr(self, name)}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps in {source} must be at least 1, got {self.max_steps}.")


@dataclass
class CheckpointConfig:
    every_n_steps: int = doc(0, "Save a checkpoint every N optimizer steps (0: only at the end).")
    keep_last: int = doc(2, "Keep this many newest checkpoints; older ones are deleted.")
    save_final: bool = doc(True, "Save a checkpoint when training ends.")


@dataclass
class LoggingConfig:
    tensorboard: bool = doc(True, "Write TensorBoard event files under <output_dir>/tensorboard.")
    plots: bool = doc(True, "Write PNG plots of the main curves at the end of the run.")
    progress: bool = doc(True, "Show a progress bar on rank 0.")
    wandb: bool = doc(False, "Log to Weights & Biases (needs `wandb` installed and configured).")
    wandb_project: str = doc("posttrain", "Weights & Biases project name.")


def check_batch_sizes(train: TrainConfig, world_size: int, source: str) -> int:
    """Return gradient-accumulation steps, or explain which numbers must divide which."""
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size ({train.global_batch_size}) in {source} must be a multiple of "
            f"train.micro_batch_size ({train.micro_batch_size}) x processes ({world_size}) = {per_step}."
        )
    return train.global_batch_size // per_step
