"""Trained models built straight into ZeRO-3 partitions (`build_partitioned`): the same values as the whole model
(a seeded initialisation, a checkpoint, a reward model), tied weights kept tied, and never more than a bucket of
the model whole on a rank while it is built."""

import pytest
import torch
import yaml

from align.core.engine import build_partitioned, gathered_parameters, is_partitioned
from align.core.modeling import build_model, load_partitioned
from align.core.sections import DeepSpeedSection, ModelSource
from base_model import QwenConfig, QwenForCausalLM, save_pretrained
from conftest import tiny_config
from rm.model import RewardModel, load_reward_model, open_reward_model

ZERO3 = DeepSpeedSection(zero_stage=3)


def small_config(**overrides) -> QwenConfig:
    return tiny_config(**{"vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, **overrides})


def gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(gathered_parameters(model))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name].to(a[name].dtype)), name


@pytest.mark.parametrize("tied", [False, True])
def test_fresh_model_in_partitions_equals_the_seeded_whole_model(tied):
    config = small_config(tie_word_embeddings=tied)
    reference = QwenForCausalLM(config, device="cpu", seed=7)
    with torch.device("meta"):
        model = QwenForCausalLM(config)
    generator = torch.Generator("cpu").manual_seed(7)
    build_partitioned(model, lambda name, t: model.init_parameter(name, t, generator), ZERO3, bucket_bytes=4096)
    assert is_partitioned(model)
    assert all(p.numel() == 0 or p.ds_status is not None for p in model.parameters())
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert_same(gathered(model), dict(reference.named_parameters()))


def test_checkpoint_in_partitions_equals_load_pretrained(tmp_path):
    config = small_config()
    whole = QwenForCausalLM(config, device="cpu", seed=3)
    save_pretrained(whole, tmp_path / "ckpt", max_shard_bytes=20_000)  # sharded: tensors read from several files
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    model = load_partitioned(tmp_path / "ckpt", ZERO3)
    assert is_partitioned(model)
    assert_same(gathered(model), dict(whole.named_parameters()))


def test_bf16_partitions_hold_the_cast_values(tmp_path):
    config = small_config()
    whole = QwenForCausalLM(config, device="cpu", seed=3)
    save_pretrained(whole, tmp_path / "ckpt")
    model = load_partitioned(tmp_path / "ckpt", DeepSpeedSection(zero_stage=3, bf16=True))
    state = gathered(model)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert_same(state, {k: v.to(torch.bfloat16) for k, v in whole.named_parameters()})


def test_reward_model_in_partitions_equals_load_reward_model(tmp_path):
    rm = RewardModel(QwenForCausalLM(small_config(), device="cpu", seed=5), "last", mean=0.5, std=2.0)
    with torch.no_grad():
        rm.score.bias.fill_(0.25)
    rm.save(tmp_path / "rm", None)
    model, fill = open_reward_model(tmp_path / "rm")
    build_partitioned(model, fill, ZERO3)
    assert (model.mean, model.std, model.pooling) == (0.5, 2.0, "last")
    assert_same(gathered(model), dict(load_reward_model(tmp_path / "rm").named_parameters()))


def test_no_rank_holds_more_than_a_bucket_whole():
    """While the model is built, the parameters materialised whole (not yet partitioned) never exceed one bucket
    plus the parameter being filled: the model as a whole is never on the device."""
    config = small_config(num_hidden_layers=6)
    with torch.device("meta"):
        model = QwenForCausalLM(config)
    bucket = 16_384
    largest = max(p.numel() * 4 for p in model.parameters())
    total = sum(p.numel() * 4 for p in model.parameters())
    peaks = []

    def fill(name, t):
        whole = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta and p.numel())
        peaks.append(whole + t.numel() * t.element_size())
        t.normal_()

    build_partitioned(model, fill, ZERO3, bucket_bytes=bucket)
    assert len(peaks) == len(list(model.parameters()))
    assert max(peaks) <= bucket + 2 * largest < total / 2
    assert sum(p.numel() for p in model.parameters()) == 0  # every parameter is a partition (one rank: whole)


def test_build_model_follows_the_deepspeed_section(tmp_path):
    """`build_model` with a ZeRO-3 section gives the partitioned model with the seeded whole model's values."""
    config_path = tmp_path / "model.yaml"
    config_path.write_text(yaml.safe_dump(small_config().model_dump()))
    source = ModelSource(config=str(config_path), tokenizer="bytes", fit_vocab=True)
    whole, _ = build_model(source, seed=11)
    parts, _ = build_model(source, seed=11, deepspeed=ZERO3)
    assert not is_partitioned(whole) and is_partitioned(parts)
    assert_same(gathered(parts), dict(whole.named_parameters()))


def test_partitioning_refuses_a_built_model():
    with pytest.raises(ValueError, match="not on the meta device"):
        build_partitioned(QwenForCausalLM(small_config(), device="cpu"), lambda n, t: None, ZERO3)
    with torch.device("meta"):
        model = QwenForCausalLM(small_config())
    with pytest.raises(ValueError, match="zero_stage=3"):
        build_partitioned(model, lambda n, t: None, DeepSpeedSection(zero_stage=2))
