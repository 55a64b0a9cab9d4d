import json

import pytest

from tvrn.config import ConfigError, apply_overrides, deep_merge, load_config, parse_override, save_config


def test_parse_override_json_and_string():
    assert parse_override("train.lr=1e-4") == (["train", "lr"], 1e-4)
    assert parse_override("model.name=tvrn_sgr") == (["model", "name"], "tvrn_sgr")
    assert parse_override("train.lr_milestones=[20, 30]") == (["train", "lr_milestones"], [20, 30])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.lr")


def test_apply_overrides_nested_and_does_not_mutate():
    base = {"train": {"lr": 1.0, "epochs": 3}, "model": {"name": "a"}}
    out = apply_overrides(base, ["train.lr=0.5", "model.sizes.d=16"])
    assert out == {"train": {"lr": 0.5, "epochs": 3}, "model": {"name": "a", "sizes": {"d": 16}}}
    assert base["train"]["lr"] == 1.0
    with pytest.raises(ConfigError, match="'name' is not a section"):
        apply_overrides(base, ["model.name.x=1"])


def test_deep_merge_child_wins():
    assert deep_merge({"a": {"b": 1, "c": 2}, "d": 1}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}, "d": 1}


def test_load_config_file_base_chain_and_errors(tmp_path):
    parent = tmp_path / "parent.json"
    parent.write_text(json.dumps({"train": {"lr": 1, "epochs": 2}}))
    child = tmp_path / "child.json"
    child.write_text(json.dumps({"base": str(parent), "train": {"epochs": 5}}))
    assert load_config(str(child)) == {"train": {"lr": 1, "epochs": 5}}

    bad = tmp_path / "bad.json"
    bad.write_text("{\n  \"a\": 1,,\n}")
    with pytest.raises(ConfigError, match=r"bad.json is not valid JSON: line 2"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="no preset named 'no_such_preset'"):
        load_config("no_such_preset")


def test_save_config_roundtrip_atomic(tmp_path):
    cfg = {"model": {"name": "x"}, "train": {"lr": 0.1}}
    save_config(cfg, tmp_path / "run" / "config.json")
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == cfg
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.json"]
