"""Atomic, resumable checkpoints.

Layout of ``<output_dir>/checkpoints/step-000120/``::

    model/             Hugging Face model (or adapter/ and, on request, merged/) + tokenizer
    state/             DeepSpeed optimizer, scheduler and (partitioned) weights
    critic/            (PPO) the value model, a Hugging Face token-classification model
    critic_state/      (PPO) its DeepSpeed state
    rng/rank-<r>.pt    every rank's RNG states
    trainer_state.json step, data position, metrics so far, recipe fingerprint
    COMPLETE           written last: a checkpoint without it is ignored

A checkpoint is written under a ``.tmp-`` name and renamed only when every rank
has finished, so a kill at any moment leaves either the old set of checkpoints
or the old set plus one complete new one.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from posttrain.distributed import barrier, broadcast_object
from posttrain.errors import UserError

MARKER = "COMPLETE"
PREFIX = "step-"


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def fingerprint(identity: dict[str, Any]) -> str:
    """Stable hash of what makes two runs the same run (trainer, model, data, seed)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_identity(model_path: str) -> str:
    """Hash of a model directory's config.json, or the name itself for hub models."""
    config = Path(model_path) / "config.json"
    if config.is_file():
        return hashlib.sha256(config.read_bytes()).hexdigest()[:16]
    return model_path


def list_complete(checkpoint_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not checkpoint_root.is_dir():
        return []
    found = [p for p in checkpoint_root.iterdir() if p.name.startswith(PREFIX) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


class DiskFullError(UserError):
    """A checkpoint could not be written because its device is full."""


def disk_is_full(err: BaseException, where: Path) -> bool:
    """Whether ``err`` (anywhere in its chain) says the device is full, or the device of ``where`` has next
    to no space left (torch's zip writer reports a full disk only as "unexpected pos")."""
    import errno

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    probe = Path(where)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free < 16 * 2**20
    except OSError:
        return False


def rng_state() -> dict:
    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])


class Checkpointer:
    """Writes, prunes and finds checkpoints for one run. Every rank calls every method."""

    def __init__(self, output_dir: Path, *, rank: int, keep_last: int, identity: dict[str, Any]) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.rank = rank
        self.keep_last = max(1, keep_last)
        self.identity = identity
        self.fingerprint = fingerprint(identity)

    def save(self, step: int, trainer_state: dict, write_model, write_state) -> Path:
        """Write checkpoint ``step``; ``write_model(dir)`` and ``write_state(dir)`` are collective."""
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "rng").mkdir(parents=True)
        barrier()
        try:
            write_model(tmp)
            write_state(tmp / "state")
            torch.save(rng_state(), tmp / "rng" / f"rank-{self.rank}.pt")
            barrier()
            if self.rank == 0:
                state = dict(trainer_state, step=step, fingerprint=self.fingerprint, identity=self.identity)
                (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, default=str))
                (tmp / MARKER).write_text("ok\n")
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
                self._prune()
                self._point_last(final)
        except (OSError, RuntimeError) as err:
            if not disk_is_full(err, self.root):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # never counted (no COMPLETE), and its space is needed
            complete = list_complete(self.root)
            last = str(complete[-1]) if complete else "none (this run has no complete checkpoint yet)"
            raise DiskFullError(
                f"no space left on the device of {self.root} while writing the checkpoint of step {step}; "
                f"the partial checkpoint was removed. The last complete checkpoint is {last}.",
                hint="Free space (or lower checkpoint.keep_last, or move output_dir), then run again with "
                     "resume=auto.") from None
        barrier()
        return final

    def _point_last(self, final: Path) -> None:
        """``checkpoints/last`` -> the newest checkpoint, a stable path for the next stage's recipe."""
        link = self.root / "last"
        tmp = self.root / ".last.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(final.name)
        tmp.replace(link)

    def _prune(self) -> None:
        complete = list_complete(self.root)
        for old in complete[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def find_resume(self, resume: str) -> Path | None:
        """The checkpoint to resume from for ``resume`` = never | auto | <path>, checked against this run."""
        if resume == "never":
            return None
        if resume == "auto":
            complete = list_complete(self.root)
            chosen = complete[-1] if complete else None
        else:
            chosen = Path(resume)
            if not (chosen / MARKER).is_file():
                raise UserError(f"resume={resume!r} is not a complete checkpoint directory (no {MARKER} file).")
        chosen = broadcast_object(chosen)
        if chosen is not None:
            self.check_compatible(chosen)
        return chosen

    def check_compatible(self, checkpoint: Path) -> None:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        if state.get("fingerprint") == self.fingerprint:
            return
        theirs = state.get("identity", {})
        differing = [k for k in sorted(set(theirs) | set(self.identity)) if theirs.get(k) != self.identity.get(k)]
        details = "; ".join(f"{k}: checkpoint has {theirs.get(k)!r}, this run has {self.identity.get(k)!r}"
                            for k in differing)
        raise UserError(
            f"checkpoint {checkpoint} belongs to a different run ({details}).",
            hint="Use another output_dir, or resume=never with overwrite=true to start afresh.",
        )

    def load_rng(self, checkpoint: Path) -> None:
        path = checkpoint / "rng" / f"rank-{self.rank}.pt"
        if path.is_file():
            set_rng_state(torch.load(path, weights_only=False))

    @staticmethod
    def trainer_state(checkpoint: Path) -> dict:
        return json.loads((checkpoint / "trainer_state.json").read_text())
