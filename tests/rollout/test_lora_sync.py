"""Adapter-only LoRA weight sync into a real vLLM engine (CPU, tiny model), against transformers + PEFT.

One engine with vLLM's LoRA support serves the module. Each test syncs what it
needs first, so the order of tests does not matter.
"""

from __future__ import annotations

import pytest
import torch

from posttrain.errors import ConfigError, UserError
from tests.rollout.test_engine import LONG, PROMPTS, _hf_greedy, _load

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 4


@pytest.fixture(scope="module")
def engine(tiny_model):
    from posttrain.distributed import init_distributed
    from posttrain.rollout import RolloutConfig, RolloutEngine

    init_distributed()
    cfg = RolloutConfig(enforce_eager=True, max_model_len=512, max_num_seqs=16, max_tokens=16, seed=0,
                        lora_sync="adapter")  # auto merges on CPU (vLLM's CPU LoRA kernels are slow)
    eng = RolloutEngine(tiny_model, cfg, lora_rank=RANK)
    print(f"\nLoRA engine start: {eng.start_seconds:.2f} s")
    yield eng
    eng.close()


def _peft(tiny_model, seed: int, **lora_kwargs):
    """A PEFT LoRA model whose factors are all non-zero (random A and B)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # init_lora_weights=False draws B at random too
    cfg = LoraConfig(r=RANK, lora_alpha=16, init_lora_weights=False, target_modules=TARGETS, **lora_kwargs)
    return get_peft_model(_load(tiny_model), cfg).eval()


def _perturb_adapter(model, seed: int, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=gen) * scale)


def _greedy(engine, prompts=PROMPTS) -> list[list[int]]:
    return [s.completion_ids for s in engine.generate(prompts, temperature=0.0)]


def _expected(engine, model, prompts=PROMPTS) -> list[list[int]]:
    return [_hf_greedy(model, engine.tokenize(p)) for p in prompts]


def _adapter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)


def test_engine_starts_with_lora_support(engine):
    assert engine.lora_sync == "adapter" and engine.lora_enabled
    assert engine.max_lora_rank == 8  # the smallest rank vLLM accepts that holds rank 4
    assert engine.unsupported_lora_modules(["model.layers.0.self_attn.q_proj", "model.norm"]) == ["model.norm"]


def test_adapter_sync_matches_peft_and_never_serves_a_stale_adapter(engine, tiny_model):
    from posttrain.rollout import sync_weights

    base = _load(tiny_model)
    sync_weights(engine, base)  # plain weights: no adapter served
    assert engine.lora_request is None and not engine.has_adapter_base
    base_out = _greedy(engine)

    model = _peft(tiny_model, seed=5)
    first = sync_weights(engine, model)
    print(f"\nadapter sync, first (base + adapter): {first.seconds * 1000:.1f} ms, {first.bytes / 2**20:.2f} MiB")
    assert first.mode == "adapter" and first.base_bytes > 0  # the base is sent once, unmerged
    assert first.bytes - first.base_bytes == _adapter_bytes(model)
    expected = _expected(engine, model)
    assert expected != base_out, "the adapter should change greedy outputs"
    assert _greedy(engine) == expected
    version = engine.lora_request.lora_int_id

    _perturb_adapter(model, seed=1)
    second = sync_weights(engine, model)
    print(f"adapter sync, adapter only: {second.seconds * 1000:.1f} ms, {second.bytes / 2**10:.1f} KiB")
    assert second.mode == "adapter" and second.base_bytes == 0
    assert second.bytes == _adapter_bytes(model) and second.num_tensors == 2 * 7 * 2  # A and B, 7 layers x 2
    assert engine.lora_request.lora_int_id == version + 1
    new_expected = _expected(engine, model)
    assert new_expected != expected, "the perturbation should change greedy outputs"
    assert _greedy(engine) == new_expected
    assert second.as_metrics()["sync/adapter_only"] == 1.0


def test_new_adapter_version_isolates_the_prefix_cache(engine, tiny_model, monkeypatch):
    # vLLM keys cached KV blocks by adapter name: a new name per sync keeps blocks computed with the
    # previous adapter out, even without the prefix-cache reset.
    from posttrain.rollout import sync_weights

    old, new = _peft(tiny_model, seed=6), _peft(tiny_model, seed=7)
    sync_weights(engine, old)
    engine.generate([LONG], temperature=0.0)  # caches LONG's first KV block under the old adapter
    expected = _hf_greedy(new, LONG)
    assert expected != _hf_greedy(old, LONG)
    with monkeypatch.context() as patch:
        patch.setattr(engine, "reset_prefix_cache", lambda: None)
        sync_weights(engine, new)
        assert _greedy(engine, [LONG])[0] == expected


def test_lora_scaling_override_is_folded_into_b(engine, tiny_model):
    from posttrain.rollout import sync_weights

    model = _peft(tiny_model, seed=8)
    sync_weights(engine, _load(tiny_model))
    base_out = _greedy(engine)
    stats = sync_weights(engine, model, lora_scaling=0.0)  # B' = 0 * B: the base model's outputs
    assert stats.mode == "adapter" and _greedy(engine) == base_out
    sync_weights(engine, model)  # each layer's own alpha / r = 4
    assert _greedy(engine) == _expected(engine, model)


def test_merged_fallback_on_a_lora_engine(engine, tiny_model):
    from posttrain.rollout import sync_weights

    model = _peft(tiny_model, seed=9)
    sync_weights(engine, model)
    merged = sync_weights(engine, model, lora_sync="merged")
    assert merged.mode == "merged" and engine.lora_request is None  # the adapter must not apply twice
    assert merged.bytes == sum(p.numel() * p.element_size() for p in _load(tiny_model).parameters())
    assert _greedy(engine) == _expected(engine, model)

    # The engine now holds merged weights, so the next adapter sync must send the base again.
    _perturb_adapter(model, seed=2)
    again = sync_weights(engine, model)
    assert again.mode == "adapter" and again.base_bytes > 0
    assert _greedy(engine) == _expected(engine, model)


def test_auto_merges_what_an_adapter_cannot_carry(engine, tiny_model):
    from posttrain.rollout import adapter_sync_problem, resolve_lora_sync, sync_weights

    model = _peft(tiny_model, seed=10, modules_to_save=["lm_head"])  # a trained full copy of lm_head
    assert "outside the adapter" in adapter_sync_problem(model)
    stats = sync_weights(engine, model, lora_sync="auto")
    assert stats.mode == "merged" and engine.lora_request is None
    assert _greedy(engine) == _expected(engine, model)
    with pytest.raises(UserError, match="lora_sync is 'adapter'.*outside the adapter"):
        resolve_lora_sync(engine, model, lora_sync="adapter")

    assert "DoRA" in adapter_sync_problem(_peft(tiny_model, seed=11, use_dora=True))
    plain_lora = _peft(tiny_model, seed=12)
    assert adapter_sync_problem(plain_lora, engine=engine) is None
    assert resolve_lora_sync(engine, _load(tiny_model)) == "full"
    assert resolve_lora_sync(engine, plain_lora, lora_sync="auto") == "adapter"  # on an engine with LoRA support
    with pytest.raises(ValueError, match="without an engine"):
        resolve_lora_sync(None, plain_lora)  # a rank without an engine cannot decide 'auto' alone


def test_adapter_sync_from_zero3_learner(engine, tiny_model):
    from posttrain.config.schema import LearnerConfig
    from posttrain.learner.engine import build_learner
    from posttrain.rollout import sync_weights
    from tests.workers.gathered import gathered_state

    model = _peft(tiny_model, seed=13).train()
    learner = build_learner(model, LearnerConfig(zero_stage=3, lr=5e-2, scheduler="constant"),
                            world_size=1, micro_batch_size=2, grad_accum=1, total_steps=4)
    batch = torch.randint(5, 900, (2, 24), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # AdamW steps change the adapter (only it trains)
        learner.backward(learner(input_ids=batch, labels=batch).loss)
        learner.step()
    params = list(learner.module.parameters())
    assert all(p.numel() == 0 for p in params), "ZeRO-3 should keep parameters partitioned"
    trained = gathered_state(learner)
    reference = _peft(tiny_model, seed=13)
    reference.load_state_dict(trained)
    before = _peft(tiny_model, seed=13)
    assert _expected(engine, reference) != _expected(engine, before), "training should change greedy outputs"

    stats = sync_weights(engine, learner, bucket_bytes=64 * 1024)
    print(f"\nadapter sync (ZeRO-3): {stats.seconds * 1000:.1f} ms, {stats.num_buckets} buckets")
    assert stats.mode == "adapter"
    assert _greedy(engine) == _expected(engine, reference)
    again = sync_weights(engine, learner)  # adapter only now: the base is in place
    assert again.base_bytes == 0 and _greedy(engine) == _expected(engine, reference)


def test_lora_sync_setting_is_resolved_before_the_engine_starts(tiny_model):
    from posttrain.rollout import RolloutConfig, RolloutEngine
    from posttrain.rollout.engine import engine_lora_mode

    llama = {"architectures": ["LlamaForCausalLM"]}
    assert engine_lora_mode("auto", None, on_cpu=False, hf_config=llama) == ("merged", None)  # no LoRA learner
    assert engine_lora_mode("auto", 4, on_cpu=False, hf_config=llama) == ("adapter", 8)  # smallest vLLM rank >= 4
    assert engine_lora_mode("auto", 4, on_cpu=True, hf_config=llama) == ("merged", None)  # slow CPU LoRA kernels
    assert engine_lora_mode("adapter", 16, on_cpu=True, hf_config=llama) == ("adapter", 16)
    assert engine_lora_mode("auto", 1024, on_cpu=False, hf_config=llama) == ("merged", None)
    assert engine_lora_mode("merged", 4, on_cpu=False, hf_config=llama) == ("merged", None)
    with pytest.raises(ConfigError, match="trains no LoRA adapter"):
        RolloutEngine(tiny_model, RolloutConfig(lora_sync="adapter"))
    with pytest.raises(ConfigError, match="rank 1024 is above vLLM's largest"):
        RolloutEngine(tiny_model, RolloutConfig(lora_sync="adapter"), lora_rank=1024)
