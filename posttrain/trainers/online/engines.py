"""Which engine an online recipe's rank generates with, and the rewards that generate with it too."""

from __future__ import annotations

from posttrain.distributed import DistInfo
from posttrain.rollout.protocol import Engine


def open_engine(cfg, dist: DistInfo, tokenizer) -> Engine:
    """This rank's engine: a disaggregated learner's ``RemoteEngine`` (the rollout ranks generate), else an
    in-process ``RolloutEngine``, wrapped as a ``GenerationGroup`` when it is one tensor-parallel shard of its
    group's engine."""
    if dist.role == "learner":
        from posttrain.rollout.remote import RemoteEngine

        return RemoteEngine(dist, cfg.rollout, cfg.output_dir)
    from posttrain.rollout import RolloutEngine

    lora = cfg.model.lora  # a LoRA learner's engine may serve its adapter (rollout.lora_sync)
    engine = RolloutEngine(cfg.rollout.model or cfg.model.path, cfg.rollout, tokenizer=tokenizer,
                           lora_rank=lora.r if lora.enabled else None)
    if cfg.rollout.tensor_parallel_size == 1:
        return engine
    from posttrain.rollout.groups import GenerationGroup
    from posttrain.rollout.layout import Layout

    return GenerationGroup(engine, Layout(dist.world_size, cfg.rollout.tensor_parallel_size), dist.rank)


def bind_engine(rewards, settings, engine) -> None:
    """Hand the started engine to the rewards that ask for it: a reward object with a ``bind_engine(engine)``
    method (the ``judge`` reward: ``engine: policy`` judges with it, ``engine: own`` starts its own engine
    then). Rewards in a worker process (``isolation: process``) are not reached."""
    from reward_models import RewardSpec

    specs = [RewardSpec.from_dict(item, f"{settings.section}.rewards[{i}]") for i, item in enumerate(settings.rewards)]
    for spec, reward in zip(specs, rewards.rewards.values(), strict=True):
        bind = getattr(reward.fn, "bind_engine", None)
        if spec.isolation == "thread" and callable(bind):
            bind(engine)
