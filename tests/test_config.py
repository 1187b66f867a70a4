"""Typed configuration: every shipped YAML loads; bad keys and values are named."""

import pytest

from align.config_types import config_type_for
from align.core.config import ConfigError, load_config
from base_model import QwenConfig
from conftest import ROOT

SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))


def test_configs_exist():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in SHIPPED}
    assert {"model/tiny.yaml", "model/qwen-1.8b.yaml", "model/qwen-7b.yaml", "model/qwen-14b.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_every_shipped_config_loads(path):
    cfg = load_config(config_type_for(path), path)
    assert cfg is not None


def test_model_presets_match_released_checkpoints():
    load = lambda n: load_config(QwenConfig, ROOT / "configs" / "model" / f"{n}.yaml")
    q18, q7, q14 = load("qwen-1.8b"), load("qwen-7b"), load("qwen-14b")
    assert (q18.hidden_size, q18.num_hidden_layers, q18.num_attention_heads, q18.intermediate_size) == (
        2048,
        24,
        16,
        5504,
    )
    assert (q7.hidden_size, q7.num_hidden_layers, q7.num_attention_heads, q7.intermediate_size) == (4096, 32, 32, 11008)
    assert (q14.hidden_size, q14.num_hidden_layers, q14.num_attention_heads, q14.intermediate_size) == (
        5120,
        40,
        40,
        13696,
    )
    assert q14.vocab_size == 152064 and q14.seq_length == 2048
    for c in (q18, q7):
        assert c.vocab_size == 151936 and c.seq_length == 8192
    for c in (q18, q7, q14):
        assert c.rope_theta == 10000 and c.rms_norm_eps == 1e-6
    assert 1.7e9 < q18.num_parameters() < 1.9e9 and 7.5e9 < q7.num_parameters() < 7.9e9


def test_overrides_apply(tmp_path):
    cfg = load_config(
        QwenConfig, ROOT / "configs/model/tiny.yaml", ["hidden_size=128", "rms_norm_eps=1e-5", "window_sizes=[4, null]"]
    )
    assert cfg.hidden_size == 128 and cfg.rms_norm_eps == 1e-5 and cfg.window_sizes == [4, None]


def test_unknown_key_names_key_value_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("hidden_size: 64\nhiden_layers: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'hiden_layers' \(value 3\)"):
        load_config(QwenConfig, path)


def test_wrong_type_names_key_value_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("hidden_size: big\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: key 'hidden_size' has invalid value 'big'"):
        load_config(QwenConfig, path)


def test_bad_override_is_attributed_to_the_command_line():
    with pytest.raises(ConfigError, match=r"command-line override: key 'num_hidden_layers' has invalid value 'x'"):
        load_config(QwenConfig, ROOT / "configs/model/tiny.yaml", ["num_hidden_layers=x"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(QwenConfig, ROOT / "configs/model/tiny.yaml", ["hidden_size"])


@pytest.mark.parametrize(
    "config,override",
    [("ppo/tiny.yaml", "ppo.top_p=0"), ("ppo/tiny.yaml", "ppo.temperature=-1"), ("ppo/tiny.yaml", "ppo.top_k=-2"),
     ("dpo/tiny.yaml", "eval_generation.top_p=1.5")],
)  # fmt: skip
def test_sampling_settings_out_of_range_are_refused_when_the_config_loads(config, override):
    """Not later, at the first rollout or evaluation, after the models were built."""
    path = ROOT / "configs" / config
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"command-line override: key '{key}' has invalid value"):
        load_config(config_type_for(path), path, [override])


def test_invalid_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml: invalid YAML"):
        load_config(QwenConfig, path)
    with pytest.raises(ConfigError, match="nope.yaml: config file not found$"):
        load_config(QwenConfig, tmp_path / "nope.yaml")


def test_a_relative_path_not_found_says_where_it_was_looked_for(tmp_path, monkeypatch, capsys):
    """Paths in configs (the shipped ones included) are relative to the working folder: run from elsewhere, the
    error says which folder that was."""
    from align.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"configs/model/tiny.yaml: config file not found .*folder, {tmp_path}"):
        load_config(QwenConfig, "configs/model/tiny.yaml")
    assert main(["data", "pack", "--input", "docs.jsonl", "--output", "packed"]) == 2
    assert f"docs.jsonl: file not found (a relative path: looked for in the working folder, {tmp_path})" in (
        capsys.readouterr().err
    )


def test_unmapped_config_folder_is_an_error(tmp_path):
    with pytest.raises(KeyError):
        config_type_for(ROOT / "configs" / "nonexistent" / "x.yaml")


def test_every_stage_of_a_shipped_multi_stage_config_validates():
    from sft.train import SFTConfig, stage_configs

    staged = [p for p in SHIPPED if p.parent.name == "sft" and "stages:" in p.read_text()]
    assert staged, "a shipped multi-stage SFT config"
    for path in staged:
        stages = stage_configs(load_config(SFTConfig, path))
        assert len(stages) >= 2 and stages[1].model.init.endswith("final")


def test_a_benchmark_other_than_humaneval_needs_its_data():
    from align.eval.harness import BenchmarkConfig

    assert BenchmarkConfig(name="humaneval").data is None
    with pytest.raises(ValueError, match="needs `data`"):
        BenchmarkConfig(name="mbpp")
