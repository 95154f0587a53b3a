"""Bad preference data, tried as a new user would: a clear error naming file, row and field (exit 2,
nothing written), or with ``data.invalid_rows=skip`` a counted, reported skip."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, run_cli, write_jsonl

GOOD = {"prompt": "What is 1 + 1?", "chosen": " 1 + 1 = 2.", "rejected": " 1 + 1 = 3."}
LONG_PROMPT = "What is " + " + ".join(str(i) for i in range(60)) + "?"
BAD = {  # case: (row, what the message must name besides the row)
    "missing rejected": ({"prompt": "What is 2 + 2?", "chosen": " 4."}, "missing field 'rejected'"),
    "chosen equals rejected": ({"prompt": "What is 2 + 2?", "chosen": " 4.", "rejected": " 4."}, "identical"),
    "empty string": ({"prompt": "What is 2 + 2?", "chosen": "", "rejected": " 5."}, "field 'chosen' is empty"),
    "prompt over the limit": ({"prompt": LONG_PROMPT, "chosen": " 1770.", "rejected": " 17."},
                              "the prompt alone fills data.max_length=64"),
    "bad role": ({"prompt": [{"role": "human", "content": "What is 2 + 2?"}],
                  "chosen": [{"role": "assistant", "content": "4."}],
                  "rejected": [{"role": "assistant", "content": "5."}]}, "prompt[0] has role 'human'"),
}


def run_dpo(tiny_model, data, out, *extra):
    return run_cli("run", str(REPO / "recipes" / "dpo.yaml"), f"model.path={tiny_model}", f"data.path={data}",
                   "data.eval_path=null", "data.eval_fraction=0", "data.max_length=64", f"output_dir={out}",
                   "train.max_steps=1", "train.global_batch_size=4", "train.micro_batch_size=4",
                   "logging.progress=false", "logging.tensorboard=false", "logging.plots=false", *extra)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_row_is_one_paragraph_naming_file_row_field(case, tiny_model, tmp_path):
    row, expected = BAD[case]
    data = write_jsonl(tmp_path / "pairs.jsonl", [GOOD] * 6 + [row] + [GOOD] * 3)
    out = tmp_path / "run"
    result = run_dpo(tiny_model, data, out)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    text = " ".join(result.stderr.split())  # the paragraph is wrapped to the terminal
    assert f"{data}, row 7" in text and expected in text
    assert not out.exists(), "nothing may be written for a run that failed validation"


def test_skip_policy_counts_and_reports_every_bad_row(tiny_model, tmp_path):
    rows = [GOOD] * 8
    for row, _ in BAD.values():
        rows += [row, GOOD]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "run"
    result = run_dpo(tiny_model, data, out, "data.invalid_rows=skip")
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = json.loads((out / "summary.json").read_text())["skipped_rows"]
    assert sum(skipped.values()) == len(BAD)
    for reason in ("missing field 'rejected'", "field 'chosen' is empty", "the prompt alone fills data.max_length=64",
                   "'chosen' and 'rejected' are identical; the pair carries no preference",
                   "prompt[0] has role 'human'; expected one of system, user, assistant, tool"):
        assert skipped.get(reason) == 1, skipped
    assert f"{len(rows) - len(BAD)} train" in result.stderr and "invalid rows skipped" in result.stderr
