"""Deterministic tiny Llama-style models with a locally trained BPE tokenizer.

No model hub is reachable on our CI machines, so tests, examples and the
quickstarts build their models here. The tokenizer is a byte-level BPE (every
string is representable) trained on a small synthetic corpus; it ships a chat
template so conversational data works end to end. head_dim is 64 because vLLM's
CPU attention kernels need head_dim >= 32.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

WORDS = (
    "the a an of to and in is it that for on with as was at by be this are from or have not but what all "
    "were when we there can your which their said if will each about how up out them then she many some "
    "so these would other into has more her two like him see time could no make than first been its who now "
    "people my made over did down only way find use may water long little very after words called just where "
    "most know get through back much before go good new write our used me man too any day same right look "
    "think also around another came come work three word must because does part even place well such here take "
    "why things help put years different away again off went old number great tell men say small every found "
    "still between name should home big give air line set own under read last never us left end along while "
    "might next sound below saw something thought both few those always looked show large often together asked "
    "house world going want school important until form food keep children feet land side without boy once "
    "animals life enough took sometimes four head above kind began almost live page got earth need far hand "
    "high year mother light parts country father let night following picture being study second eyes soon "
    "question answer step solve compute add sum total plus minus times equals result therefore so final "
    "reverse sort copy count letters digits list string function return def print python code test assert "
    "user assistant system hello thanks please yes no true false"
).split()


def synthetic_corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    """Lines of words, numbers, arithmetic, code and chat markup for tokenizer training."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        kind = i % 4
        if kind == 0:
            lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + ".")
        elif kind == 1:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            lines.append(f"What is {a} + {b}? {a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}.")
        elif kind == 2:
            name = rng.choice(["f", "g", "solve", "add", "count"])
            lines.append(f"def {name}(x, y):\n    return x + y  # {rng.randint(0, 99)}\nassert {name}(1, 2) == 3")
        else:
            word = rng.choice(WORDS)
            lines.append(f"<|user|>\nReverse {word}<|end|>\n<|assistant|>\n{word[::-1]}<|end|>\n")
    return lines


def build_tokenizer(vocab_size: int = 1024, seed: int = 0):
    """Train a byte-level BPE tokenizer; return a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(synthetic_corpus(seed=seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<|pad|>",
        eos_token="<|end|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 2048
    return fast


def make_tiny_model(
    out_dir: str | Path,
    *,
    vocab_size: int = 1024,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> Path:
    """Build and save a tiny Llama causal LM and its tokenizer in ``out_dir``.

    The same arguments give the same weights and tokenizer, byte for byte.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    head_dim = 64
    if hidden_size % head_dim:
        raise ValueError(f"hidden_size must be a multiple of 64 (head_dim), got {hidden_size}")
    out = Path(out_dir)
    tokenizer = build_tokenizer(vocab_size, seed=seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        torch_dtype="float32",
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "posttrain_tiny.json").write_text(
        json.dumps(
            {"vocab_size": vocab_size, "hidden_size": hidden_size, "num_layers": num_layers, "seed": seed,
             "parameters": sum(p.numel() for p in model.parameters())},
            indent=2,
        )
    )
    return out
