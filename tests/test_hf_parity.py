"""Interoperability with Hugging Face transformers' Qwen2ForCausalLM."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is part of the [test] extra")

from base_model import QwenForCausalLM, convert, load_pretrained, save_pretrained  # noqa: E402
from base_model.checkpoint import config_to_hf  # noqa: E402
from conftest import QWEN_REF, randomize_biases, tiny_config  # noqa: E402


def _hf_from_ours(model):
    cfg = config_to_hf(model.config, torch.float32)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg))
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf.eval()


def test_random_gqa_weights_match_transformers():
    torch.manual_seed(0)
    model = randomize_biases(QwenForCausalLM(tiny_config(num_attention_heads=4, num_key_value_heads=2))).eval()
    hf = _hf_from_ours(model)
    ids = torch.randint(0, 300, (3, 40))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_saved_checkpoint_loads_in_transformers(tmp_path):
    torch.manual_seed(1)
    model = randomize_biases(QwenForCausalLM(tiny_config()), seed=1).eval()
    save_pretrained(model, tmp_path / "ckpt", max_shard_bytes=200_000)  # force several shards
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 10000.0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 33))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max().item() < 1e-4
    again = load_pretrained(tmp_path / "ckpt")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_converted_qwen1_checkpoint_loads_in_transformers(tmp_path):
    convert(QWEN_REF / "qwen1_tiny", tmp_path / "qwen2")
    ours = load_pretrained(QWEN_REF / "qwen1_tiny")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qwen2", dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, ours.config.seq_length))  # up to seq_length, where dynamic NTK is inactive
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max().item() < 1e-4
    reloaded = load_pretrained(tmp_path / "qwen2")
    assert reloaded.config.use_dynamic_ntk and reloaded.config.use_logn_attn and reloaded.config.seq_length == 32


def test_saved_tokenizer_loads_in_transformers(tmp_path, qwen_tokenizer):
    """AutoTokenizer on our tokenizer.json gives the reference tokenizer's ids (special text parsed, its default)."""
    from conftest import QWEN_REF

    save_pretrained(QwenForCausalLM(tiny_config()), tmp_path / "ckpt", qwen_tokenizer)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    cases = json.loads((QWEN_REF / "tokenizer.json").read_text())["strings"]
    for case in cases:
        assert hf.encode(case["text"], add_special_tokens=False) == case["ids"], case["text"]
        assert hf.decode(case["ids"]) == case["decoded"]
    messages = [{"role": "user", "content": "What is 2+2?"}]
    from align.core.chatml import render

    assert hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False) == render(
        messages, qwen_tokenizer, add_generation_prompt=True
    )
