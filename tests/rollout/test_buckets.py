"""Bucket planning (pure: names and sizes) and the rollout config checks."""

from __future__ import annotations

import pytest

from posttrain.errors import ConfigError
from posttrain.learner.gather import fused_group, module_path, plan_buckets
from posttrain.rollout.config import RolloutConfig

LAYER = "model.layers.0"


def _llama_layer(prefix: str = LAYER, size: int = 100) -> list[tuple[str, int]]:
    return [(f"{prefix}.self_attn.{p}.weight", size) for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
        (f"{prefix}.mlp.{p}.weight", size) for p in ("gate_proj", "up_proj", "down_proj")
    ]


def test_module_path_unwraps_peft_names():
    assert module_path(f"base_model.model.{LAYER}.self_attn.q_proj.base_layer.weight") == f"{LAYER}.self_attn.q_proj"
    assert module_path(f"base_model.model.{LAYER}.self_attn.q_proj.lora_A.default.weight") == f"{LAYER}.self_attn.q_proj"
    assert module_path("base_model.model.lm_head.modules_to_save.default.weight") == "lm_head"
    assert module_path("model.norm.weight") == "model.norm"
    assert fused_group(f"{LAYER}.self_attn.k_proj") == f"{LAYER}.self_attn.qkv_proj"
    assert fused_group(f"{LAYER}.mlp.up_proj") == f"{LAYER}.mlp.gate_up_proj"
    assert fused_group(f"{LAYER}.mlp.down_proj") == f"{LAYER}.mlp.down_proj"


def test_buckets_respect_bound_and_keep_fused_groups_whole():
    entries = _llama_layer()
    buckets = plan_buckets(entries, bucket_bytes=300)
    assert sorted(i for b in buckets for i in b) == list(range(len(entries)))  # every entry once, in order
    assert [i for b in buckets for i in b] == list(range(len(entries)))
    assert all(sum(entries[i][1] for i in b) <= 300 for b in buckets)
    # q/k/v (0, 1, 2) and gate/up (4, 5) each land in a single bucket.
    where = {i: n for n, b in enumerate(buckets) for i in b}
    assert where[0] == where[1] == where[2]
    assert where[4] == where[5]


def test_oversized_group_splits_by_module_and_oversized_module_stands_alone():
    entries = _llama_layer(size=100)
    buckets = plan_buckets(entries, bucket_bytes=150)  # qkv (300) cannot stay fused
    assert all(sum(entries[i][1] for i in b) <= 150 for b in buckets)
    huge = [("model.embed_tokens.weight", 1000), *entries]
    buckets = plan_buckets(huge, bucket_bytes=150)
    assert buckets[0] == [0]  # bigger than a bucket: alone, never merged with neighbours


def test_lora_factors_stay_with_their_base_weight():
    prefix = f"base_model.model.{LAYER}.self_attn"
    entries = []
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        entries += [(f"{prefix}.{proj}.base_layer.weight", 100), (f"{prefix}.{proj}.lora_A.default.weight", 10),
                    (f"{prefix}.{proj}.lora_B.default.weight", 10)]
    for bucket_bytes in (50, 130, 200, 400, 10_000):
        for bucket in plan_buckets(entries, bucket_bytes):
            modules = {module_path(entries[i][0]) for i in bucket}
            for module in modules:  # a module in this bucket has all three of its tensors here
                assert sum(1 for i in bucket if module_path(entries[i][0]) == module) == 3


def test_plan_rejects_non_positive_bucket():
    with pytest.raises(ValueError):
        plan_buckets([("a.weight", 1)], 0)


@pytest.mark.parametrize("field,value", [("n", 0), ("top_p", 0.0), ("temperature", -1.0), ("max_tokens", 0),
                                         ("kv_cache_bytes", 0), ("memory_fraction", 1.5), ("stop", [""])])
def test_config_validation_names_the_field(field, value):
    cfg = RolloutConfig(**{field: value})
    with pytest.raises(ConfigError, match=f"rollout.{field}"):
        cfg.validate("recipe.yaml")


def test_config_defaults_validate():
    RolloutConfig().validate()
