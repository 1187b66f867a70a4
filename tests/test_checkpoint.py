"""Checkpoint IO: formats, name mapping, and clear errors for malformed folders."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from base_model import CheckpointError, QwenForCausalLM, load_pretrained, save_pretrained
from base_model.checkpoint import qwen1_to_qwen2, qwen2_to_qwen1
from conftest import QWEN_REF, randomize_biases, tiny_config


def test_qwen1_name_mapping_round_trips():
    v1 = load_file(str(QWEN_REF / "qwen1_tiny" / "model.safetensors"))
    v2 = qwen1_to_qwen2(v1)
    assert "model.layers.0.self_attn.q_proj.bias" in v2 and "model.layers.1.mlp.gate_proj.weight" in v2
    assert torch.equal(v2["model.layers.0.mlp.gate_proj.weight"], v1["transformer.h.0.mlp.w2.weight"])
    back = qwen2_to_qwen1(v2)
    assert back.keys() == v1.keys()
    assert all(torch.equal(back[k], v1[k]) for k in v1)


def test_qwen1_config_is_read(tmp_path):
    model = load_pretrained(QWEN_REF / "qwen1_tiny")
    c = model.config
    assert (c.intermediate_size, c.head_dim, c.seq_length, c.use_dynamic_ntk, c.use_logn_attn) == (
        176,
        16,
        32,
        True,
        True,
    )


def test_bin_and_sharded_bin_load(tmp_path):
    model = randomize_biases(QwenForCausalLM(tiny_config()))
    save_pretrained(model, tmp_path / "st")
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(tmp_path / "st" / "config.json", folder)
    state = model.state_dict()
    names = list(state)
    torch.save({k: state[k] for k in names[:5]}, folder / "pytorch_model-1.bin")
    torch.save({k: state[k] for k in names[5:]}, folder / "pytorch_model-2.bin")
    weight_map = {k: "pytorch_model-1.bin" if i < 5 else "pytorch_model-2.bin" for i, k in enumerate(names)}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_pretrained(folder)
    assert all(torch.equal(loaded.state_dict()[k], state[k]) for k in names)


def test_save_is_atomic_over_an_existing_checkpoint(tmp_path):
    model = QwenForCausalLM(tiny_config())
    save_pretrained(model, tmp_path / "ckpt")
    save_pretrained(model, tmp_path / "ckpt")  # overwriting works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folders left


def test_tied_embeddings_round_trip(tmp_path):
    model = QwenForCausalLM(tiny_config(tie_word_embeddings=True))
    save_pretrained(model, tmp_path / "tied")
    loaded = load_pretrained(tmp_path / "tied")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


@pytest.fixture
def sharded(tmp_path):
    model = QwenForCausalLM(tiny_config())
    save_pretrained(model, tmp_path / "ckpt", max_shard_bytes=100_000)
    return tmp_path / "ckpt"


def test_missing_shard_is_named(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name) as e:
        load_pretrained(sharded)
    assert "holds" in str(e.value)


def test_wrong_shape_names_file_and_tensor(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.1.self_attn.k_proj.weight"]
    tensors = load_file(str(sharded / shard))
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(sharded / shard))
    with pytest.raises(CheckpointError, match=rf"{shard}.*model.layers.1.self_attn.k_proj.weight.*shape \(3, 3\)"):
        load_pretrained(sharded)


def test_missing_tensor_is_named(tmp_path):
    model = QwenForCausalLM(tiny_config())
    save_pretrained(model, tmp_path / "ckpt")
    tensors = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.norm.weight' is missing"):
        load_pretrained(tmp_path / "ckpt")


def test_unknown_architecture_is_named(tmp_path):
    model = QwenForCausalLM(tiny_config())
    save_pretrained(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json: unknown architecture 'LlamaForCausalLM'"):
        load_pretrained(tmp_path / "ckpt")


def test_corrupt_safetensors_is_named(tmp_path):
    model = QwenForCausalLM(tiny_config())
    save_pretrained(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot read"):
        load_pretrained(tmp_path / "ckpt")


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(CheckpointError, match="missing key"):
        load_pretrained(tmp_path)
