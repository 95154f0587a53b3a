"""Bad bytes, a full disk and a diverging loss: one line naming what and where, nothing half-written kept."""

from __future__ import annotations

import os
import subprocess

import pytest

from posttrain.checkpoint import MARKER, list_complete
from posttrain.data.loading import load_rows
from posttrain.errors import DataError
from tests.conftest import REPO, run_cli
from tests.recipes.test_sft import RECIPE as SFT_RECIPE
from tests.recipes.test_sft import sft_args

LATIN1 = "café".encode("latin-1")


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("suffix, content, where", [
    (".jsonl", b'{"prompt": "ok", "completion": "fine"}\n{"prompt": "' + LATIN1 + b'", "completion": "x"}\n',
     "row 2"),
    (".json", b'[{"prompt": "ok"},\n {"prompt": "' + LATIN1 + b'"}]', "line 2"),
    (".csv", b"prompt,completion\nok,fine\n" + LATIN1 + b",x\n", "line 3"),
])
def test_bytes_that_are_not_utf8_name_the_file_and_the_row(suffix, content, where, tmp_path):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        load_rows(str(path))
    message = str(caught.value)
    assert str(path) in message and where in message and "not UTF-8" in message and "e9" in message


def test_a_training_run_on_non_utf8_data_stops_with_exit_2(tiny_model, tmp_path):
    data = tmp_path / "train.jsonl"
    good = b'{"prompt": "What is 1 + 1?", "completion": "2"}\n'
    data.write_bytes(good * 20 + b'{"prompt": "' + LATIN1 + b'", "completion": "x"}\n')
    result = run_cli("run", SFT_RECIPE, *sft_args(tiny_model, {"train": data}, tmp_path / "run"))
    assert result.returncode == 2
    line = _one_error_line(result.stderr)
    assert f"{data}, row 21: not UTF-8" in line


def test_a_recipe_that_is_not_utf8_is_a_config_error(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"trainer: sft\noutput_dir: " + LATIN1 + b"\n")
    result = run_cli("run", str(recipe))
    assert result.returncode == 2
    assert "is not UTF-8 text" in _one_error_line(result.stderr)


def test_score_input_that_is_not_utf8_names_the_row(tmp_path):
    rows = tmp_path / "samples.jsonl"
    rows.write_bytes(b'{"prompt": "p", "completion": "c", "answer": "1"}\n{"prompt": "' + LATIN1 + b'"}\n')
    result = run_cli("score", str(rows), "--reward", "math_verify", "--output", str(tmp_path / "out.jsonl"))
    assert result.returncode == 2
    assert f"{rows}, row 2: not UTF-8" in _one_error_line(result.stderr)


def test_a_diverging_sft_loss_is_training_diverged(tiny_model, arithmetic_data, tmp_path):
    result = run_cli("run", SFT_RECIPE, *sft_args(tiny_model, arithmetic_data, tmp_path / "run", "train.max_steps=3",
                                                  "checkpoint.every_n_steps=1"),
                     env={"POSTTRAIN_FAULT_NAN_LOSS_AT_STEP": "2"})
    assert result.returncode == 3
    line = _one_error_line(result.stderr)
    assert "the loss is nan at step 2" in line and "step-000001" in line and "is intact" in line


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size (root only: this is the real ENOSPC path, not a simulation)."""
    mounts = []

    def mount(size_bytes: int):
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the full-disk path needs one")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_stops_with_one_line_and_keeps_the_last_complete_checkpoint(tiny_model, arithmetic_data,
                                                                               tmp_path, small_disk):
    probe = tmp_path / "probe"
    sized = run_cli("run", SFT_RECIPE, *sft_args(tiny_model, arithmetic_data, probe, "train.max_steps=1"))
    assert sized.returncode == 0, sized.stderr[-3000:]
    (checkpoint,) = list_complete(probe / "checkpoints")
    size = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    # Room for the run's logs and one checkpoint, not two: the second save runs out of space.
    disk = small_disk(int(size * 1.5))
    out = disk / "run"
    result = run_cli("run", SFT_RECIPE, *sft_args(tiny_model, arithmetic_data, out, "train.max_steps=3",
                                                  "checkpoint.every_n_steps=1", "checkpoint.keep_last=1"))
    assert result.returncode == 2
    line = _one_error_line(result.stderr)
    assert "no space left on the device of" in line and "checkpoint of step 2" in line
    assert f"The last complete checkpoint is {out / 'checkpoints' / 'step-000001'}" in line
    root = out / "checkpoints"
    assert [p.name for p in list_complete(root)] == ["step-000001"]
    assert not list(root.glob(".tmp-*"))  # the partial one is gone, never mistaken for complete
    assert (root / "step-000001" / MARKER).is_file()


def test_error_messages_for_these_cases_are_documented():
    assert "not UTF-8" in (REPO / "docs" / "data.md").read_text()
    assert "no space left" in (REPO / "docs" / "checkpoints.md").read_text()
