"""Settings of the vLLM rollout engine (``rollout:`` in a recipe).

Every field's help is its documentation (``docs/rollout.md`` explains the
choices in more depth). Defaults suit a colocated engine: it shares the device
with the learner, so it takes a bounded KV cache and sleeps while the learner
trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.config.schema import doc
from posttrain.errors import ConfigError


@dataclass
class RolloutConfig:
    # --- sampling -----------------------------------------------------------------
    n: int = doc(1, "Samples per prompt (GRPO's group size).")
    temperature: float = doc(1.0, "Sampling temperature; 0 is greedy.")
    top_p: float = doc(1.0, "Nucleus sampling: keep the smallest token set with this much probability (1 disables).")
    top_k: int = doc(0, "Keep only the k most likely tokens (0 disables).")
    max_tokens: int = doc(256, "Longest completion, in tokens.")
    stop: list[str] = doc([], "Strings that end a completion (the text stops before them).")
    seed: int | None = doc(
        0,
        "Seed of the sampler. Each generate() call derives per-request seeds from it and a call counter, so a "
        "run is reproducible and calls differ; None leaves sampling unseeded.",
    )
    skip_special_tokens: bool = doc(True, "Drop special tokens (e.g. EOS) from completion text; token ids keep them.")
    add_special_tokens: bool = doc(
        True, "Let the tokenizer add its special tokens (e.g. BOS) to plain-string prompts. Chat prompts never get "
        "extra ones: the chat template places them."
    )
    logprobs_mode: Literal["processed", "raw"] = doc(
        "processed",
        "Distribution the returned sampler log-probs come from. 'processed': the one actually sampled from, after "
        "temperature (and top-k/top-p truncation, renormalised) -- equal to a learner's log_softmax(logits / T) "
        "when top-k/top-p are off. 'raw': the model's untempered log_softmax(logits).",
    )
    # --- engine ---------------------------------------------------------------------
    model: str | None = doc(None, "Model directory for the engine; None uses the trainer's model.path.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = doc(
        "auto", "Engine weight/activation dtype; 'auto' takes the checkpoint's dtype (float32 stays float32)."
    )
    max_model_len: int | None = doc(None, "Longest prompt + completion; None takes the model's context length.")
    max_num_seqs: int = doc(64, "Most sequences the engine decodes at once.")
    enforce_eager: bool = doc(
        False, "Skip torch.compile and CUDA graphs: starts several times faster, decodes slower. Tests use True."
    )
    kv_cache_bytes: int | None = doc(
        None,
        "KV-cache size in bytes. None: on CPU, sized from the model to hold max_num_seqs sequences of "
        "max_model_len tokens (capped by cpu_kv_cache_max_fraction of free memory); on GPU, memory_fraction decides.",
    )
    memory_fraction: float = doc(
        0.3,
        "GPU only, when kv_cache_bytes is None: share of GPU memory vLLM may take for weights, activations and "
        "KV cache (vLLM's gpu_memory_utilization). Keep room for the colocated learner.",
    )
    cpu_kv_cache_max_fraction: float = doc(0.25, "CPU only: the automatic KV-cache size never exceeds this share of "
                                           "available memory.")
    enable_prefix_caching: bool = doc(True, "Reuse KV blocks of shared prompt prefixes (reset after every weight sync).")
    load_weights: bool = doc(
        True, "Load the checkpoint's weights at start. False starts with dummy weights, for a colocated engine "
        "that always receives a weight sync before its first generate (generate refuses to run before it)."
    )
    sleep_mode: bool = doc(True, "GPU only: allow sleep()/wake_up() to free GPU memory while the learner trains.")
    sleep_level: Literal[1, 2] = doc(
        1, "GPU sleep level: 1 moves weights to CPU and drops the KV cache; 2 also drops the weights (they must be "
        "synced again before generating, which every colocated RL step does anyway)."
    )
    tensor_parallel_size: int = doc(
        1, "Ranks (GPUs, or CPU processes) one engine shards its model over. Colocated: the world splits into "
        "world / T generation groups of T consecutive ranks; disaggregated: rollout.ranks / T engines. It must "
        "divide the engine ranks and the model's attention heads, vocabulary and MLP size (docs/rollout.md)."
    )
    # --- placement (online trainers) ------------------------------------------------
    placement: Literal["colocated", "disaggregated"] = doc(
        "colocated",
        "Online trainers: 'colocated' runs a learner shard and an engine on every rank; 'disaggregated' runs "
        "engines only on the last rollout.ranks ranks and the learner only on the others (docs/rl.md).",
    )
    ranks: int = doc(1, "Disaggregated: how many ranks (the last ones) run rollout engines; the rest are learners.")
    timeout: float = doc(
        600.0,
        "Disaggregated: seconds a rollout rank may take to answer one request (a step's generation, an "
        "evaluation, a weight load). A rank that dies or stays silent longer stops the run with an error naming "
        "it and the last intact checkpoint.",
    )
    start_timeout: float = doc(900.0, "Disaggregated: seconds a rollout rank may take to start its engine.")
    lora_sync: Literal["auto", "adapter", "merged"] = doc(
        "auto",
        "How a LoRA learner's weights reach the engine. 'adapter': only the adapter's factors, served by vLLM's "
        "LoRA kernels (the engine starts with LoRA support; an error if vLLM or the adapter cannot do it). "
        "'merged': the adapter merged into the base weights, all of them streamed (plain, faster kernels). "
        "'auto': 'adapter' where possible on GPU, else 'merged' (on CPU, vLLM's LoRA kernels halve generation "
        "speed, which costs more than a merged sync).",
    )
    schedule: Literal["sync", "one_step_async"] = doc(
        "sync",
        "Online trainers: 'sync' generates each step's batch with the latest weights; 'one_step_async' "
        "(disaggregated only) lets the rollout ranks generate step t+1 while the learners train on step t, with "
        "weights one step stale (logged as staleness; pair it with grpo.tis_cap, docs/rl.md).",
    )

    def validate(self, source: str = "the recipe") -> None:
        """Raise ``ConfigError`` naming the first bad field."""
        checks = [
            (self.n >= 1, "n", "at least 1"),
            (self.temperature >= 0, "temperature", "0 or more"),
            (0 < self.top_p <= 1, "top_p", "in (0, 1]"),
            (self.top_k >= 0, "top_k", "0 (off) or more"),
            (self.max_tokens >= 1, "max_tokens", "at least 1"),
            (self.max_num_seqs >= 1, "max_num_seqs", "at least 1"),
            (self.max_model_len is None or self.max_model_len >= 2, "max_model_len", "at least 2"),
            (self.kv_cache_bytes is None or self.kv_cache_bytes > 0, "kv_cache_bytes", "positive"),
            (0 < self.memory_fraction <= 1, "memory_fraction", "in (0, 1]"),
            (0 < self.cpu_kv_cache_max_fraction <= 1, "cpu_kv_cache_max_fraction", "in (0, 1]"),
            (self.tensor_parallel_size >= 1, "tensor_parallel_size", "at least 1"),
            (self.ranks >= 1, "ranks", "at least 1"),
            (self.timeout > 0, "timeout", "positive (seconds)"),
            (self.start_timeout > 0, "start_timeout", "positive (seconds)"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(f"rollout.{name} in {source} must be {expected}, got {getattr(self, name)!r}.")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"rollout.stop in {source} must be a list of non-empty strings, got {self.stop!r}.")
        if self.schedule == "one_step_async" and self.placement != "disaggregated":
            # Colocated, the engine and the learner share the process and its devices: nothing could overlap.
            raise ConfigError(f"rollout.schedule=one_step_async in {source} needs rollout.placement=disaggregated "
                              "(generation overlaps training only on rollout ranks of their own).",
                              hint="Set rollout.placement=disaggregated and run with --nproc 2 or more, or use "
                              "rollout.schedule=sync.")

    @property
    def rollout_ranks(self) -> int:
        """Ranks that run only engines: ``ranks`` when disaggregated, else 0."""
        return self.ranks if self.placement == "disaggregated" else 0

    def learner_ranks(self, world_size: int, source: str = "the recipe") -> int:
        """How many of ``world_size`` ranks hold the learner; a ``ConfigError`` when the placement cannot fit."""
        if self.placement == "colocated":
            return world_size
        if world_size < 2:
            raise ConfigError(f"rollout.placement=disaggregated in {source} needs at least 2 processes (rollout and "
                              f"learner ranks apart), got {world_size}.", hint="Run with --nproc 2 or more, or use "
                              "rollout.placement=colocated.")
        if self.ranks >= world_size:
            raise ConfigError(f"rollout.ranks ({self.ranks}) in {source} must leave at least one learner rank out of "
                              f"{world_size} processes.", hint=f"Set rollout.ranks to at most {world_size - 1}.")
        return world_size - self.ranks
