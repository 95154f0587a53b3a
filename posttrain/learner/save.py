"""Write a learner's weights as Hugging Face directories, from any training layout.

The result loads with ``AutoModelForCausalLM.from_pretrained`` (or PEFT's
``PeftModel.from_pretrained`` for adapters) with no posttrain installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from posttrain.learner.gather import is_lora_name, iter_full_parameters, merge_lora_tensors, peft_base_name


def gather_state_dict(module: torch.nn.Module, *, keep: bool) -> dict[str, torch.Tensor]:
    """Full CPU tensors by name; collective; ranks with ``keep=False`` hold nothing."""
    state: dict[str, torch.Tensor] = {}
    for bucket in iter_full_parameters(module, bucket_bytes=64 * 2**20):
        if keep:
            # Copied: the bucket's tensors alias the gathered parameters, released with the next bucket.
            state.update((name, tensor.detach().to("cpu", copy=True)) for name, tensor in bucket)
    return state


def _write_safetensors(state: dict[str, torch.Tensor], directory: Path, tied: bool) -> None:
    from safetensors.torch import save_file

    if tied:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})


def save_hf_model(module: torch.nn.Module, directory: Path, *, tokenizer, is_main: bool,
                  lora_scaling: float | None = None, save_merged: bool = False, name: str = "model") -> None:
    """Save ``module`` (plain or PEFT-wrapped) under ``directory``; collective.

    Plain models go to ``directory/<name>`` (``model`` by default). PEFT models go to
    ``directory/adapter`` and, with ``save_merged``, ``directory/merged``.
    """
    state = gather_state_dict(module, keep=is_main)
    if not is_main:
        return
    is_peft = lora_scaling is not None
    base = module.get_base_model() if is_peft else module
    config = base.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    targets = []
    if is_peft:
        adapter_dir = directory / "adapter"
        adapter_dir.mkdir(parents=True, exist_ok=True)
        adapter = {peft_base_name(k).replace(".default.", "."): v for k, v in state.items() if is_lora_name(k)}
        from safetensors.torch import save_file

        save_file({f"base_model.model.{k}": v.contiguous() for k, v in adapter.items()},
                  str(adapter_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
        peft_config = module.peft_config["default"].to_dict()
        peft_config["base_model_name_or_path"] = str(config._name_or_path)
        for key, value in list(peft_config.items()):
            if isinstance(value, set):
                peft_config[key] = sorted(value)
        (adapter_dir / "adapter_config.json").write_text(json.dumps(peft_config, indent=2, default=str))
        tokenizer.save_pretrained(adapter_dir)
        if save_merged:
            targets.append((directory / "merged", merge_lora_tensors(state, scaling=lora_scaling)))
    else:
        targets.append((directory / name, state))
    config.architectures = [type(base).__name__]  # what from_pretrained instantiates by default
    for target, weights in targets:
        target.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(target)
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(target)
        _write_safetensors(weights, target, tied)
        tokenizer.save_pretrained(target)
