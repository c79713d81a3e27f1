"""One value syntax for YAML files and every command's --set, and the typed model: section."""

from __future__ import annotations

from pathlib import Path

import pytest

from upperson.cli import main
from upperson.config import ConfigError, load_config, override_fields, parse_override, parse_value
from upperson.methods import CSKTConfig, UPPersonConfig


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True), ("False", False), ("yes", "yes"), ("no", "no"), ("on", "on"), ("off", "off"),
        ("null", None), ("~", None), ("10", 10), ("-3", -3), ("0.5", 0.5), ("1e-4", 1e-4), ("1e1", 10.0),
        ("2E+2", 200.0), (".inf", float("inf")), ("[1, 2]", [1, 2]), ("[1e1,yes]", [10.0, "yes"]),
        ("{a: 1}", {"a": 1}), ('"007"', "007"), ("'true'", "true"), ("abc", "abc"), ("/data/x", "/data/x"), ("", ""),
    ],
)
def test_value_syntax(text: str, value: object) -> None:
    assert parse_value(text) == value
    assert type(parse_value(text)) is type(value)


def test_override_keys() -> None:
    assert parse_override("model.lora_rank=16") == (["model", "lora_rank"], 16)
    assert parse_override("data.root=a=b") == (["data", "root"], "a=b")
    for bad in ("lora_rank", "=3", "model..rank=3"):
        with pytest.raises(ConfigError, match="must look like key=value"):
            parse_override(bad)


def test_yaml_files_read_values_like_set(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-4\ntrain:\n  epochs: 2\nmodel:\n  lambda_init: 1e2\n  learn_lambda: false\n")
    config = load_config(path)
    assert (config.optim.lr, config.model.lambda_init, config.model.learn_lambda) == (1e-4, 100.0, False)
    assert config == load_config(None, ["optim.lr=1e-4", "train.epochs=2", "model.lambda_init=1e2", "model.learn_lambda=false"])
    path.write_text("model:\n  learn_lambda: yes\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: model\.learn_lambda must be a boolean \(true or false\), got 'yes'"):
        load_config(path)
    path.write_text("train:\n  epochs: 2\ntrain:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*'train' is written twice"):
        load_config(path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.lambda_init=abc"], r"model\.lambda_init must be a number, got 'abc'"),
        (["model.depth_prefix=2.5"], r"model\.depth_prefix must be an integer or null, got 2\.5"),
        (['model.prefix="false"'], r"model\.prefix must be a boolean \(true or false\), got 'false'"),
        (["model.prefix_length=0"], r"model\.prefix_length must be >= 1, got 0"),
        (["model.depth_lora=-1"], r"model\.depth_lora must be >= 0 or null"),
        (["model.lora_type=lorax"], r"model\.lora_type must be one of .*lora.*got 'lorax'"),
        (["model.adapter_placement=middle"], r"model\.adapter_placement must be one of .*got 'middle'"),
        (["model.attention_backend=flash"], r"model\.attention_backend must be one of 'sdpa', 'explicit'"),
        (["method=cskt", "model.prompt_init=zeros"], r"model\.prompt_init must be one of 'paper', 'official'"),
        (["method=cskt", "model.depth=0"], r"model\.depth must be >= 1 or null"),
        (["method=cskt", "model.lora_rank=4"], r"unknown key\(s\) \['model\.lora_rank'\]"),
        (["method=nope"], r"method: unknown method 'nope'; available: cskt, full-finetune, up-person, zero-shot"),
        (["method=zero-shot", "train.losses=[sdm,id]"], r"trains nothing"),
    ],
)
def test_typed_model_section_errors_name_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_model_section_is_the_method_config() -> None:
    assert load_config(None, ["model.lora_rank=16"]).model == UPPersonConfig(lora_rank=16)
    assert load_config(None, ["method=cskt", "model.depth=null"]).model == CSKTConfig(depth=None)
    assert override_fields(UPPersonConfig(), ["lambda_init=100", "depth_lora=null"]) == UPPersonConfig(lambda_init=100.0, depth_lora=None)
    with pytest.raises(ConfigError, match=r"lora_rank must be an integer, got 'x'"):
        override_fields(UPPersonConfig(), ["lora_rank=x"])


def test_info_takes_the_same_set_syntax(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--image-size", "64", "32", "--set", "lora_rank=2", "--set", "model.depth_prefix=1"]) == 0
    assert "lora_rank=2" in capsys.readouterr().out
    assert main(["info", "--image-size", "64", "32", "--set", "learn_lambda=yes"]) == 1
    assert "model.learn_lambda must be a boolean (true or false), got 'yes'" in capsys.readouterr().err
