"""Data loading, format checks, masking, length policies, packing and sampling."""

from __future__ import annotations

import json

import pytest

from posttrain.data.formats import check_preference, sft_kind
from posttrain.data.loading import Row, load_rows, split_train_eval
from posttrain.data.sampler import GlobalBatchSampler
from posttrain.data.tokenize import IGNORE, LengthReport, collate, fit_length, pack_examples, sft_example
from posttrain.errors import DataError
from tests.conftest import write_jsonl


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


ROWS = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]


def test_all_file_types_load_the_same_rows(tmp_path):
    import datasets

    write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    dataset = datasets.Dataset.from_list(ROWS)
    dataset.to_parquet(str(tmp_path / "d.parquet"))
    dataset.to_csv(str(tmp_path / "d.csv"), index=False)
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "saved"))
    for name in ("d.jsonl", "d.json", "d.parquet", "d.csv", "saved"):
        rows = load_rows(str(tmp_path / name))
        assert [r.data for r in rows] == ROWS, name
        assert rows[2].number == 3


def test_malformed_jsonl_row_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], "{not json", ROWS[1]])
    with pytest.raises(DataError, match=r"bad.jsonl, row 2: not valid JSON"):
        load_rows(str(path))


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_rows(str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"))


def test_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "response": "a"}])
    rows = load_rows(str(path), columns={"prompt": "question", "completion": "response"})
    assert rows[0].data == {"prompt": "q", "completion": "a"}
    with pytest.raises(DataError, match="no column 'answer'"):
        load_rows(str(path), columns={"x": "answer"})


def test_format_errors_name_row_and_field():
    with pytest.raises(DataError, match=r"f, row 4: .*'completion'"):
        sft_kind(Row({"prompt": "p"}, "f", 4))
    with pytest.raises(DataError, match=r"messages\[1\] has role 'robot'"):
        sft_kind(Row({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}, "f", 1))
    with pytest.raises(DataError, match="no SFT columns"):
        sft_kind(Row({"foo": 1}, "f", 1))
    with pytest.raises(DataError, match="missing field 'rejected'"):
        check_preference(Row({"prompt": "p", "chosen": "a"}, "f", 1))
    with pytest.raises(DataError, match="identical"):
        check_preference(Row({"prompt": "p", "chosen": "a", "rejected": "a"}, "f", 1))
    with pytest.raises(DataError, match="'chosen' is empty"):
        check_preference(Row({"prompt": "p", "chosen": " ", "rejected": "a"}, "f", 1))


def decoded_targets(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE])


def test_loss_mask_covers_only_completions(tokenizer):
    conversation = {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 + 4?"},
        {"role": "assistant", "content": "7"}, {"role": "user", "content": "And 5 + 5?"},
        {"role": "assistant", "content": "ten"},
    ]}
    assert decoded_targets(tokenizer, sft_example(tokenizer, Row(conversation, "f", 1))) == "7<|end|>\nten<|end|>\n"
    plain = sft_example(tokenizer, Row({"prompt": "What is 3 + 4? ", "completion": "7"}, "f", 1))
    # the BPE token " 7" straddles the boundary and must still be trained
    assert decoded_targets(tokenizer, plain) == " 7<|end|>"
    chat_pc = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}
    assert decoded_targets(tokenizer, sft_example(tokenizer, Row(chat_pc, "f", 1))) == "yo<|end|>\n"
    text = sft_example(tokenizer, Row({"text": "all of it"}, "f", 1))
    assert decoded_targets(tokenizer, text) == "all of it<|end|>"


def test_overlong_policies(tokenizer):
    example = sft_example(tokenizer, Row({"prompt": "word " * 30, "completion": "end"}, "f", 9))
    report = LengthReport()
    assert fit_length(example, 10, "drop", "f, row 9", report) is None
    assert report.dropped_too_long == 1
    # truncation that removes every target token drops the example, counted separately
    assert fit_length(example, 10, "truncate", "f, row 9", report) is None
    assert report.truncated == 1 and report.dropped_no_target == 1
    with pytest.raises(DataError, match="f, row 9: .* longer than data.max_length=10"):
        fit_length(example, 10, "error", "f, row 9", report)


def test_packing_keeps_examples_whole(tokenizer):
    examples = [sft_example(tokenizer, Row({"prompt": f"q{i} ", "completion": "a" * (i + 1)}, "f", i)) for i in range(8)]
    packed = pack_examples(examples, 24)
    assert sum(len(p.input_ids) for p in packed) == sum(len(e.input_ids) for e in examples)
    assert all(len(p.input_ids) <= 24 for p in packed) and len(packed) < len(examples)
    batch = collate(packed, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape


def test_split_is_seeded_and_disjoint():
    rows = list(range(100))
    train, held = split_train_eval(rows, 0.1, seed=3)
    assert len(held) == 10 and not set(train) & set(held)
    assert split_train_eval(rows, 0.1, seed=3) == (train, held)
    assert split_train_eval(rows, 0.1, seed=4)[1] != held


def test_global_batches_do_not_depend_on_world_size():
    sampler = GlobalBatchSampler(50, 8, seed=1)
    assert sampler.steps_per_epoch == 6 and sampler.dropped_per_epoch == 2
    for step in (0, 5, 6, 13):
        one = [i for mb in sampler.micro_batches(step, 0, 1, 2) for i in mb]
        two = [i for rank in range(2) for mb in sampler.micro_batches(step, rank, 2, 2) for i in mb]
        assert one == two == sampler.global_batch(step)
    epoch0 = [i for s in range(6) for i in sampler.global_batch(s)]
    assert len(set(epoch0)) == 48
    assert sampler.global_batch(6) != sampler.global_batch(0)  # reshuffled each epoch
    assert GlobalBatchSampler(50, 8, seed=1).global_batch(7) == sampler.global_batch(7)  # resumable by step
