"""Fixtures for the reward tests: CLI runner, leftover-process checks, tiny scoring models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SANDBOX_UID_MIN = 2_000_000  # reward_models.sandbox.runner._UID_BASE

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_score(*args: str, cwd: Path | None = None, env: dict | None = None,
              timeout: int = 300) -> subprocess.CompletedProcess:
    """``posttrain score ARGS`` in a fresh interpreter, as a user would run it."""
    pythonpath = os.pathsep.join([str(REPO)] + ([env.pop("PYTHONPATH")] if env and "PYTHONPATH" in env else []))
    full_env = dict(os.environ, PYTHONPATH=pythonpath, **(env or {}))
    return subprocess.run([sys.executable, "-m", "posttrain.cli.main", "score", "--no-progress", *args],
                          cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def sandbox_processes() -> list[tuple[int, int, str]]:
    """(pid, uid, command) of every live process running as a sandbox uid.

    Zombies are dead processes whose exit status their (host) parent has not collected yet;
    they hold no memory, files or CPU, so they are not counted.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        uid = int(fields["Uid"].split()[0])
        if uid >= SANDBOX_UID_MIN and not fields["State"].strip().startswith("Z"):
            found.append((int(entry), uid, cmd))
    return found


@pytest.fixture
def no_leftovers():
    """Fails the test if a sandboxed process is still alive after it."""
    assert sandbox_processes() == [], "sandbox processes alive before the test"
    yield
    assert sandbox_processes() == []


# -- tiny scoring models --------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "What is 2 + 3? First add the numbers. 2 + 3 = 5. The answer is 5.",
    "Solve x + 1 = 4. Subtract one from both sides. x = 3.",
    "The cat sat on the mat and the dog sat on the log.",
    "Step 1: read the question.\n\nStep 2: compute.\n\nStep 3: answer.",
    "<|user|>hello<|end|><|assistant|>hi there<|end|>",
] * 4


def build_tokenizer():
    """A small byte-level BPE tokenizer with pad/eos tokens and a chat template, trained locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|pad|>", "<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(kind: str, tokenizer, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification, LlamaForTokenClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         num_labels=1 if kind == "orm" else 2)
    cls = LlamaForSequenceClassification if kind == "orm" else LlamaForTokenClassification
    model = cls(config)
    with torch.no_grad():  # a visible spread of scores: random heads start near zero
        head = model.score
        head.weight.normal_(0, 1.0)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_scoring_models(tmp_path_factory) -> dict[str, Path]:
    """{"orm": dir, "prm": dir}: tiny Llama scoring checkpoints with their tokenizer."""
    tokenizer = build_tokenizer()
    out = {}
    for seed, kind in enumerate(("orm", "prm")):
        path = tmp_path_factory.mktemp(kind)
        build_model(kind, tokenizer, seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[kind] = path
    return out
