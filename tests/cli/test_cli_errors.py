"""Bad input, tried as a new user would: one paragraph, exit 2, no traceback, nothing written."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, run_cli, write_jsonl

GOOD_ROW = {"prompt": "What is 1 + 1? ", "completion": "2"}


@pytest.fixture()
def good_data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", [GOOD_ROW] * 40)


CASES = {
    "unknown key": (["learner.zero_stag=2"], "unknown key 'learner.zero_stag'", "learner.zero_stage"),
    "wrong type": (["train.max_steps=many"], "train.max_steps", "must be int"),
    "missing data file": (["data.path={tmp}/nope.jsonl"], "nope.jsonl", "does not exist"),
    "malformed row": (["data.path={tmp}/bad.jsonl"], "bad.jsonl, row 3", "not valid JSON"),
    "empty dataset": (["data.path={tmp}/empty.jsonl"], "empty.jsonl", "empty"),
    "missing field": (["data.path={tmp}/nofield.jsonl"], "nofield.jsonl, row 2", "'completion'"),
    "missing model": (["model.path={tmp}/no-model"], "no-model", "does not exist"),
    "batch rule": (["train.global_batch_size=10", "train.micro_batch_size=4"], "global_batch_size (10)", "multiple"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_paragraph_exit_2(case, tmp_path, tiny_model, good_data):
    write_jsonl(tmp_path / "bad.jsonl", [GOOD_ROW, GOOD_ROW, '{"prompt": "x", "completion": ', GOOD_ROW])
    (tmp_path / "empty.jsonl").write_text("")
    write_jsonl(tmp_path / "nofield.jsonl", [GOOD_ROW, {"prompt": "only a prompt"}])
    overrides, *expected = CASES[case]
    out = tmp_path / "run"
    args = [f"model.path={tiny_model}", f"data.path={good_data}", f"output_dir={out}"]
    args += [o.format(tmp=tmp_path) for o in overrides]
    result = run_cli("run", str(REPO / "recipes" / "sft.yaml"), *args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    for text in expected:
        assert text in result.stderr
    assert not out.exists(), "nothing may be written for a run that failed validation"


def test_help_is_useful():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("run", "recipes", "make-tiny-model", "make-data"):
        assert command in result.stdout
    run_help = run_cli("run", "--help").stdout
    assert "--nproc" in run_help and "key.sub=value" in run_help


def test_recipes_lists_sft():
    result = run_cli("recipes")
    assert result.returncode == 0 and "sft" in result.stdout
