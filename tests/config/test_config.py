"""Recipe validation: unknown keys, types, overrides."""

from __future__ import annotations

import pytest

from posttrain.config.loader import apply_overrides, from_dict, load_recipe, parse_override
from posttrain.errors import ConfigError
from posttrain.trainers.sft import Config as SFTConfig


def recipe(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


BASE = "trainer: sft\nmodel: {path: m}\ndata: {path: d.jsonl}\n"


def test_valid_recipe_with_overrides(tmp_path):
    cfg = load_recipe(recipe(tmp_path, BASE), ["learner.zero_stage=3", "learner.lr=1e-5", "train.max_steps=7"])
    assert cfg.learner.zero_stage == 3
    assert cfg.learner.lr == pytest.approx(1e-5)  # YAML reads 1e-5 as a string; we accept it as a float
    assert cfg.train.max_steps == 7
    assert cfg.model.lora.enabled is False


def test_unknown_key_names_closest_and_file(tmp_path):
    path = recipe(tmp_path, BASE + "learner: {zero_stag: 2}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    text = str(err.value)
    assert "learner.zero_stag" in text and "learner.zero_stage" in text and str(path) in text


def test_unknown_override_key(tmp_path):
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        load_recipe(recipe(tmp_path, BASE), ["train.global_batch=4"])


def test_wrong_type_names_expected_type(tmp_path):
    with pytest.raises(ConfigError, match="must be int"):
        load_recipe(recipe(tmp_path, BASE), ["train.micro_batch_size=four"])
    with pytest.raises(ConfigError, match="one of 0, 1, 2, 3"):
        load_recipe(recipe(tmp_path, BASE), ["learner.zero_stage=5"])
    with pytest.raises(ConfigError, match="bool"):
        from_dict(SFTConfig, {"trainer": "sft", "model": {"path": "m"}, "data": {"path": "d", "packing": "yes"}})


def test_literal_suggestion(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'cosine'"):
        load_recipe(recipe(tmp_path, BASE), ["learner.scheduler=cosin"])


def test_unknown_trainer_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'sft'"):
        load_recipe(recipe(tmp_path, "trainer: sfft\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_missing_model_path(tmp_path):
    with pytest.raises(ConfigError, match="model.path is not set"):
        load_recipe(recipe(tmp_path, "trainer: sft\ndata: {path: d.jsonl}\n"))


def test_override_parsing():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=x=y") == (["a"], "x=y")
    with pytest.raises(ConfigError):
        parse_override("novalue")
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}


def test_batch_size_rule():
    from posttrain.config.schema import TrainConfig, check_batch_sizes

    assert check_batch_sizes(TrainConfig(global_batch_size=16, micro_batch_size=4), 2, "r") == 2
    with pytest.raises(ConfigError, match=r"multiple of train.micro_batch_size \(4\) x processes \(3\) = 12"):
        check_batch_sizes(TrainConfig(global_batch_size=16, micro_batch_size=4), 3, "r")
