"""The vLLM rollout engine and weight sync, end to end on CPU with the tiny model.

One engine serves the whole module (each start-up costs seconds on a 2-core
machine). Every test that depends on the engine's weights syncs them itself
first, so tests do not depend on their order.
"""

from __future__ import annotations

import copy

import pytest
import torch

from posttrain.errors import UserError

MAX_TOKENS = 16
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 12 + 30?"}]
TEXT = "The answer is"
LONG = list(range(5, 300))  # longer than one KV block (128 on CPU): exercises the prefix cache
PROMPTS = [CHAT, TEXT, LONG]
START: dict = {}


@pytest.fixture(scope="module")
def engine(tiny_model):
    from posttrain.distributed import init_distributed
    from posttrain.rollout import RolloutConfig, RolloutEngine

    init_distributed()  # a world of one, before the engine, as under torchrun
    cfg = RolloutConfig(enforce_eager=True, max_model_len=512, max_num_seqs=16, max_tokens=MAX_TOKENS, seed=0)
    torch.manual_seed(1234)
    expected_draw = torch.rand(4)
    torch.manual_seed(1234)
    eng = RolloutEngine(tiny_model, cfg)
    START["draw_after_start"], START["expected_draw"] = torch.rand(4), expected_draw
    print(f"\nengine start: {eng.start_seconds:.2f} s, KV cache {eng.kv_cache_bytes / 2**20:.0f} MiB")
    yield eng
    eng.close()


def _load(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def _perturbed(tiny_model, seed: int, scale: float = 0.05):
    model = _load(tiny_model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * scale)
    return model


def _hf_greedy(model, prompt_ids: list[int], max_new_tokens: int = MAX_TOKENS) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def _vllm_greedy(engine, prompts=PROMPTS) -> list[list[int]]:
    return [s.completion_ids for s in engine.generate(prompts, temperature=0.0)]


def _assert_matches_hf(engine, model, prompts=PROMPTS) -> None:
    got = _vllm_greedy(engine, prompts)
    for prompt, ids in zip(prompts, got):
        assert ids == _hf_greedy(model, engine.tokenize(prompt)), f"vLLM and transformers differ for {prompt!r}"


# ---- generation -------------------------------------------------------------------------------

def test_prompt_forms_and_result_structure(engine):
    from posttrain.data.tokenize import render_chat

    tok = engine.tokenizer
    assert engine.tokenize(CHAT) == tok(render_chat(tok, CHAT, add_generation_prompt=True),
                                        add_special_tokens=False).input_ids
    assert tok.decode(engine.tokenize(CHAT)).endswith("<|assistant|>\n")  # generation prompt appended
    assert engine.tokenize(TEXT) == tok(TEXT).input_ids
    assert engine.tokenize(LONG) == LONG

    batch = engine.generate(PROMPTS, n=2, temperature=1.0)
    assert len(batch) == 6 and batch.num_prompts == 3 and batch.n == 2
    assert [(s.group, s.index) for s in batch] == [(g, i) for g in range(3) for i in range(2)]
    for sample in batch:
        assert sample.prompt_ids == engine.tokenize(PROMPTS[sample.group])
        assert 1 <= len(sample.completion_ids) <= MAX_TOKENS
        assert len(sample.logprobs) == len(sample.completion_ids)
        assert all(lp <= 0.0 for lp in sample.logprobs)
        assert sample.finish_reason in ("stop", "length")
    assert [len(g) for g in batch.groups()] == [2, 2, 2]
    assert len(engine.generate([])) == 0

    tensors = batch.collate(pad_token_id=tok.pad_token_id)
    row = 3  # group 1, sample 1
    s = batch[row]
    p, c = len(s.prompt_ids), len(s.completion_ids)
    assert tensors["input_ids"][row, : p + c].tolist() == s.prompt_ids + s.completion_ids
    assert tensors["completion_mask"][row].sum() == c and tensors["completion_mask"][row, p] == 1
    assert torch.allclose(tensors["sampler_logprobs"][row, p : p + c], torch.tensor(s.logprobs))
    assert tensors["group"].tolist() == [0, 0, 1, 1, 2, 2]


def test_engine_start_leaves_the_learners_rng_alone(engine):
    # vLLM seeds the global generators at start; the engine puts them back.
    assert torch.equal(START["draw_after_start"], START["expected_draw"])


def test_bad_prompts_are_user_errors(engine):
    with pytest.raises(UserError, match="list of prompts"):
        engine.generate(TEXT)
    with pytest.raises(UserError, match="prompt must be"):
        engine.generate([[1.5, 2.5]])
    with pytest.raises(UserError, match="prompt 1 has 600 tokens"):
        engine.generate([TEXT, list(range(600))])


def test_seeded_n_sampling_is_reproducible(engine):
    first = engine.generate([TEXT, CHAT], n=4, temperature=1.0, seed=123)
    again = engine.generate([TEXT, CHAT], n=4, temperature=1.0, seed=123)
    other = engine.generate([TEXT, CHAT], n=4, temperature=1.0, seed=124)
    assert [s.completion_ids for s in first] == [s.completion_ids for s in again]
    assert [s.logprobs for s in first] == [s.logprobs for s in again]
    assert [s.completion_ids for s in first] != [s.completion_ids for s in other]
    assert len({tuple(s.completion_ids) for s in first.groups()[0]}) > 1  # samples of a group differ
    # Without an explicit seed, successive calls draw fresh (config-derived) seeds.
    a, b = engine.generate([TEXT], n=2), engine.generate([TEXT], n=2)
    assert [s.completion_ids for s in a] != [s.completion_ids for s in b]


def test_per_prompt_seeds_make_samples_independent_of_the_split(engine):
    """What a disaggregated run relies on: prompt i with seed s samples the same alone or in a batch."""
    whole = engine.generate([TEXT, CHAT], n=3, temperature=1.0, seed=50)
    same = engine.generate([TEXT, CHAT], n=3, temperature=1.0, seeds=[50, 53])
    second = engine.generate([CHAT], n=3, temperature=1.0, seeds=[53])
    assert [s.completion_ids for s in same] == [s.completion_ids for s in whole]
    assert [s.completion_ids for s in second] == [s.completion_ids for s in whole.groups()[1]]
    with pytest.raises(ValueError, match="1 seeds for 2 prompts"):
        engine.generate([TEXT, CHAT], seeds=[1])


def test_max_tokens_gives_length_finish(engine):
    batch = engine.generate([TEXT, CHAT], temperature=0.0, max_tokens=5)
    for sample in batch:
        if sample.finish_reason == "length":
            assert len(sample.completion_ids) == 5
        else:  # ended early on EOS
            assert sample.finish_reason == "stop" and sample.completion_ids[-1] == engine.tokenizer.eos_token_id
    assert any(s.finish_reason == "length" for s in batch)


def test_stop_string_cuts_text_and_reports_stop(engine):
    free = engine.generate([TEXT], temperature=0.0, max_tokens=MAX_TOKENS)[0]
    tok = engine.tokenizer
    # A stop string that greedy decoding is known to produce: the text of tokens 3..4.
    stop = tok.decode(free.completion_ids[3:5]).strip()
    assert stop, "the greedy completion should contain some visible text"
    cut = free.text.index(stop)
    stopped = engine.generate([TEXT], temperature=0.0, stop=[stop])[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    assert stopped.text == free.text[:cut]
    assert len(stopped.completion_ids) < len(free.completion_ids)
    assert free.completion_ids[: len(stopped.completion_ids)] == stopped.completion_ids


def test_a_full_replica_holds_every_parameter(engine, tiny_model):
    from transformers import AutoModelForCausalLM

    # vLLM CPU empties the repacked linear weights; the count must still cover them.
    reference = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert engine.held_parameters() == sum(p.numel() for p in reference.parameters())


def test_sleep_and_wake_are_noops_on_cpu(engine):
    engine.sleep()
    assert not engine.is_sleeping
    engine.wake_up()
    assert engine.generate([TEXT], max_tokens=2)[0].completion_ids


# ---- weight sync -------------------------------------------------------------------------------

def test_sync_plain_module_matches_transformers(engine, tiny_model):
    from posttrain.rollout import sync_weights

    base = _load(tiny_model)
    sync_weights(engine, base)
    _assert_matches_hf(engine, base)
    before = _vllm_greedy(engine)

    model = _perturbed(tiny_model, seed=1)
    expected = [_hf_greedy(model, engine.tokenize(p)) for p in PROMPTS]
    assert before != expected, "the perturbation should change greedy outputs"
    stats = sync_weights(engine, model, bucket_bytes=64 * 1024)
    print(f"\nsync (plain, 64 KiB buckets): {stats.seconds * 1000:.1f} ms, {stats.num_buckets} buckets, "
          f"{stats.bytes / 2**20:.2f} MiB, peak bucket {stats.peak_bucket_bytes / 2**10:.0f} KiB, "
          f"measured peak {stats.measured_peak_bytes} B ({stats.memory_source})")
    assert _vllm_greedy(engine) == expected


def test_bucket_bound_and_stats(engine, tiny_model):
    from posttrain.rollout import sync_weights

    model = _perturbed(tiny_model, seed=2)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    bucket_bytes = 100 * 1024
    stats = sync_weights(engine, model, bucket_bytes=bucket_bytes)
    assert stats.num_buckets > 1
    assert stats.largest_tensor_bytes == largest
    assert stats.peak_bucket_bytes <= bucket_bytes + largest
    assert stats.bytes == total and stats.num_tensors == len(list(model.parameters()))
    assert stats.seconds > 0 and 0 <= stats.gather_seconds <= stats.seconds
    metrics = stats.as_metrics()
    assert metrics["sync/num_buckets"] == stats.num_buckets and "sync/memory_source" not in metrics
    one_bucket = sync_weights(engine, model, bucket_bytes=1 << 30)
    assert one_bucket.num_buckets == 1 and one_bucket.peak_bucket_bytes == total


def test_prefix_cache_is_reset_by_sync(engine, tiny_model, monkeypatch):
    from posttrain.rollout import sync_weights

    old, new = _perturbed(tiny_model, seed=3), _perturbed(tiny_model, seed=4)
    sync_weights(engine, old)
    engine.generate([LONG], temperature=0.0)  # caches LONG's first KV block under the old weights
    expected = _hf_greedy(new, LONG)
    with monkeypatch.context() as patch:
        patch.setattr(engine, "reset_prefix_cache", lambda: None)
        sync_weights(engine, new)
        stale = _vllm_greedy(engine, [LONG])[0]
    assert stale != expected, "without the reset, cached KV from the old weights leaks into the new ones"
    sync_weights(engine, new)
    assert _vllm_greedy(engine, [LONG])[0] == expected


def test_engine_less_rank_still_iterates(tiny_model):
    from posttrain.rollout import sync_weights

    model = _load(tiny_model)
    stats = sync_weights(None, model, bucket_bytes=128 * 1024)
    assert stats.num_buckets > 1
    assert stats.bytes == sum(p.numel() * p.element_size() for p in model.parameters())


def test_sync_zero3_engine_matches_transformers(engine, tiny_model):
    from posttrain.config.schema import LearnerConfig
    from posttrain.learner.engine import build_learner
    from posttrain.rollout import sync_weights
    from tests.workers.gathered import gathered_state

    learner = build_learner(_load(tiny_model).train(), LearnerConfig(zero_stage=3, lr=1e-2, scheduler="constant"),
                            world_size=1, micro_batch_size=2, grad_accum=1, total_steps=4)
    batch = torch.randint(5, 900, (2, 24), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # a few AdamW steps: weights now differ from the checkpoint
        learner.backward(learner(input_ids=batch, labels=batch).loss)
        learner.step()
    params = list(learner.module.parameters())
    assert all(p.numel() == 0 for p in params), "ZeRO-3 should keep parameters partitioned"
    trained = gathered_state(learner)
    reference = _load(tiny_model)
    reference.load_state_dict(trained)
    sync_weights(engine, _load(tiny_model))
    assert _vllm_greedy(engine) != [_hf_greedy(reference, engine.tokenize(p)) for p in PROMPTS], \
        "training should change greedy outputs"

    stats = sync_weights(engine, learner, bucket_bytes=200 * 1024)
    print(f"\nsync (ZeRO-3): {stats.seconds * 1000:.1f} ms, {stats.num_buckets} buckets")
    assert stats.num_buckets > 1
    _assert_matches_hf(engine, reference)


def test_sync_peft_lora_merges_adapter(engine, tiny_model):
    from peft import LoraConfig, get_peft_model

    from posttrain.rollout import sync_weights

    torch.manual_seed(5)  # init_lora_weights=False draws B at random (non-zero)
    lora = LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(_load(tiny_model), lora).eval()
    assert any(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    base = _load(tiny_model)
    sync_weights(engine, base)
    base_out = _vllm_greedy(engine)

    stats = sync_weights(engine, peft_model, bucket_bytes=150 * 1024)
    print(f"\nsync (PEFT LoRA, merged): {stats.seconds * 1000:.1f} ms, {stats.num_buckets} buckets")
    assert stats.bytes == sum(p.numel() * p.element_size() for p in base.parameters())  # merged, HF-shaped
    assert stats.mode == "merged" and engine.lora_sync == "merged"  # an engine started without LoRA support
    assert _vllm_greedy(engine) != base_out, "the adapter should change greedy outputs"
    _assert_matches_hf(engine, peft_model)

    # The merge used each layer's own scaling (alpha / r = 4); an explicit override changes the result.
    sync_weights(engine, peft_model, lora_scaling=0.0)
    assert _vllm_greedy(engine) == base_out
    merged = copy.deepcopy(peft_model).merge_and_unload()
    sync_weights(engine, merged)
    _assert_matches_hf(engine, peft_model)


# ---- sampler log-probs vs the learner -----------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_match_learner_recompute(engine, tiny_model, temperature):
    from posttrain.rollout import drift_stats, sync_weights, token_logprobs

    model = _perturbed(tiny_model, seed=6)
    sync_weights(engine, model)
    batch = engine.generate(PROMPTS, n=3, temperature=temperature, seed=11)
    tensors = batch.collate(pad_token_id=engine.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits
    learner = token_logprobs(logits, tensors["input_ids"], tensors["completion_mask"], temperature=temperature)
    stats = drift_stats(tensors["sampler_logprobs"], learner, tensors["completion_mask"])
    print(f"\nlog-prob drift at T={temperature}: max {stats['abs_diff_max']:.2e}, mean {stats['abs_diff_mean']:.2e}, "
          f"ratio {stats['ratio_mean']:.6f} over {stats['tokens']} tokens")
    assert stats["tokens"] == batch.num_completion_tokens
    assert stats["abs_diff_max"] < 1e-3
    # The sampler's numbers are tempered: at T=1 they would be off by far more than the bound.
    if temperature != 1.0:
        untempered = token_logprobs(logits, tensors["input_ids"], tensors["completion_mask"], temperature=1.0)
        assert drift_stats(tensors["sampler_logprobs"], untempered, tensors["completion_mask"])["abs_diff_max"] > 1e-2


def test_top_k_logprobs_are_of_the_truncated_distribution(engine, tiny_model):
    from posttrain.rollout import drift_stats, sync_weights, token_logprobs

    model = _perturbed(tiny_model, seed=6)
    sync_weights(engine, model)
    batch = engine.generate([TEXT, CHAT], n=2, temperature=1.0, top_k=5, seed=3)
    tensors = batch.collate(pad_token_id=engine.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits
    full = token_logprobs(logits, tensors["input_ids"], tensors["completion_mask"])
    mask = tensors["completion_mask"].bool()
    # Renormalised over the 5 kept tokens, every sampled token gets more mass than under the full softmax.
    assert (tensors["sampler_logprobs"][mask] >= full[mask] - 1e-5).all()
    assert drift_stats(tensors["sampler_logprobs"], full, tensors["completion_mask"])["abs_diff_mean"] > 1e-2
    top5 = logits.topk(5, dim=-1).values  # exact check: log_softmax over the top 5 logits
    renorm = torch.zeros_like(full)
    rows, cols = mask.nonzero(as_tuple=True)
    for r, c in zip(rows.tolist(), cols.tolist()):
        renorm[r, c] = logits[r, c - 1, tensors["input_ids"][r, c]] - torch.logsumexp(top5[r, c - 1], dim=-1)
    assert drift_stats(tensors["sampler_logprobs"], renorm, tensors["completion_mask"])["abs_diff_max"] < 1e-3
