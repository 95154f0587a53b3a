"""A thin DeepSpeed engine wrapper: one learner for every recipe.

ZeRO 0-3, fp32 or bf16 (fp32 master weights), gradient accumulation, clipping
and warmup schedules all come from DeepSpeed's own config; this module only
translates our ``LearnerConfig`` and keeps the few numbers a recipe needs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import torch

from posttrain.config.schema import LearnerConfig, LoraConfig
from posttrain.learner.schedule import lr_multiplier

log = logging.getLogger(__name__)


def deepspeed_config(cfg: LearnerConfig, *, micro_batch_size: int, grad_accum: int, world_size: int) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        # Small models on CPU: keep every parameter partitioned, no persistence shortcut,
        # so what we test is the real partitioned path.
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=False)
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.lr,
                "betas": list(cfg.betas),
                "eps": cfg.eps,
                "weight_decay": cfg.weight_decay,
                "torch_adam": True,  # DeepSpeed's fused kernels need CUDA; torch's AdamW runs anywhere
            },
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def apply_lora(model: torch.nn.Module, cfg: LoraConfig, *, task_type: str | None = "CAUSAL_LM",
               train_in_full: tuple[str, ...] = ()) -> torch.nn.Module:
    """Wrap ``model`` with a PEFT LoRA adapter (only adapter weights train).

    ``task_type`` is PEFT's (None: a plain ``PeftModel``, e.g. for a scoring model, which cannot generate);
    modules named in ``train_in_full`` (e.g. a reward model's new ``score`` head) train in full beside the
    adapters: they are in the merged model that ``model.lora.save_merged`` writes, not in the adapter."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in cfg.target_modules if t in present]
    if not targets:
        from posttrain.errors import ConfigError

        raise ConfigError(
            f"model.lora.target_modules {cfg.target_modules} match no module of the model; "
            f"its linear layers include {sorted(n for n in present if 'proj' in n)[:12]}."
        )
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                              task_type=task_type)
    wrapped = get_peft_model(model, peft_cfg)
    for name, param in wrapped.named_parameters():
        if any(f".{module}." in f".{name}" for module in train_in_full):
            param.requires_grad_(True)
    return wrapped


@dataclass
class Learner:
    """A model under a DeepSpeed engine, plus what recipes read from it."""

    engine: object  # deepspeed.DeepSpeedEngine
    config: LearnerConfig
    grad_accum: int
    is_peft: bool

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def __call__(self, **batch):
        return self.engine(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        """Called after every micro-batch; DeepSpeed steps the optimizer at accumulation boundaries."""
        if self.config.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
            # Without ZeRO, DeepSpeed clips but does not report the norm; grads are reduced by now.
            grads = [p.grad.detach().float() for p in self.module.parameters() if p.grad is not None]
            self._plain_grad_norm = float(torch.sqrt(sum((g * g).sum() for g in grads))) if grads else 0.0
        self.engine.step()

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    @property
    def grad_norm(self) -> float | None:
        """Global gradient norm of the last optimizer step, before clipping."""
        value = self.engine.get_global_grad_norm()
        if value is None:
            return getattr(self, "_plain_grad_norm", None)
        return float(value.item() if torch.is_tensor(value) else value)

    def save_state(self, directory: str, client_state: dict | None = None) -> None:
        """Optimizer, scheduler and (partitioned) weights; collective."""
        self.engine.save_checkpoint(directory, tag="state", client_state=client_state or {})

    def load_state(self, directory: str) -> dict:
        path, client_state = self.engine.load_checkpoint(
            directory, tag="state", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed found no state in {directory}")
        return client_state


def forget_stale_deepspeed_groups() -> None:
    """Drop DeepSpeed's cached clone of the world group if that world is gone.

    DeepSpeed keeps the clone in a module global; after the process group is destroyed and created again in
    the same process (tests, notebooks), the stale clone makes ``deepspeed.initialize`` fail with "Group ... is
    not registered".
    """
    import torch.distributed as dist
    from deepspeed.utils import groups

    cached = getattr(groups, "_WORLD_GROUP", None)
    if cached is not None and (not dist.is_initialized() or cached not in dist.distributed_c10d._world.pg_group_ranks):
        groups._WORLD_GROUP = None


def initialize_deepspeed(**kwargs):
    """``deepspeed.initialize`` after ``forget_stale_deepspeed_groups``: every DeepSpeed engine we build goes
    through here."""
    import deepspeed

    forget_stale_deepspeed_groups()
    return deepspeed.initialize(**kwargs)


def build_learner(
    model: torch.nn.Module,
    cfg: LearnerConfig,
    *,
    world_size: int,
    micro_batch_size: int,
    grad_accum: int,
    total_steps: int,
) -> Learner:
    """Put ``model`` under DeepSpeed with AdamW and the configured schedule."""

    ds_config = deepspeed_config(cfg, micro_batch_size=micro_batch_size, grad_accum=grad_accum, world_size=world_size)
    schedule = partial(lr_multiplier, total_steps=total_steps, warmup_steps=cfg.warmup_steps, kind=cfg.scheduler,
                       min_ratio=cfg.min_lr_ratio)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def make_scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    engine, _, _, _ = initialize_deepspeed(
        model=model, model_parameters=trainable, config=ds_config, lr_scheduler=make_scheduler
    )
    is_peft = type(model).__name__.startswith("Peft")
    return Learner(engine=engine, config=cfg, grad_accum=grad_accum, is_peft=is_peft)
