"""Exact agreement with outputs recorded from the original Qwen v1 code (tests/fixtures/qwen_reference)."""

import pytest
import torch

from base_model import load_pretrained
from base_model.generate import SamplingParams, generate
from conftest import QWEN_REF

CASES = ["a_short", "b_medium", "c_long", "d_long_plain", "x_long_ntk_only", "x_long_logn_only"]


@pytest.fixture(scope="module")
def qwen1_tiny():
    return load_pretrained(QWEN_REF / "qwen1_tiny")


@pytest.mark.parametrize("name", CASES)
def test_logits_match_reference(qwen1_tiny, reference_logits, name):
    tensors, meta = reference_logits
    case = next(c for c in meta["cases"] if c["name"] == name)
    model = load_pretrained(QWEN_REF / "qwen1_tiny")
    model.config.use_dynamic_ntk = case["use_dynamic_ntk"]
    model.config.use_logn_attn = case["use_logn_attn"]
    with torch.no_grad():
        logits = model(tensors[case["input_key"]]).logits
    expected = tensors[case["logits_key"]]
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() < 1e-4


def test_flags_matter_past_seq_length(reference_logits):
    """Guard against a test that passes by accident: the long cases differ from each other."""
    tensors, _ = reference_logits
    assert (tensors["logits.c_long"] - tensors["logits.d_long_plain"]).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["e_greedy_short", "f_greedy_cross_seq_length"])
def test_greedy_generation_with_cache_matches_reference(qwen1_tiny, reference_logits, name):
    tensors, _ = reference_logits
    prompt = tensors[f"gen.{name}.prompt_ids"][0].tolist()
    expected = tensors[f"gen.{name}.output_ids"][0, len(prompt) :].tolist()
    out = generate(
        qwen1_tiny, [prompt], SamplingParams(max_new_tokens=len(expected), temperature=0), return_logits=True
    )
    assert out.token_ids[0] == expected
    step_logits = torch.cat(out.step_logits)  # (steps, V)
    assert (step_logits - tensors[f"gen.{name}.step_logits"]).abs().max().item() < 1e-4


def test_no_cache_greedy_differs_past_seq_length(qwen1_tiny, reference_logits):
    """Re-running the whole sequence re-picks the NTK alpha; the reference's no-cache ids show it and so do ours."""
    tensors, _ = reference_logits
    name = "f_greedy_cross_seq_length"
    ids = tensors[f"gen.{name}.prompt_ids"]
    expected = tensors[f"gen.{name}.nocache_output_ids"]
    with torch.no_grad():
        while ids.shape[1] < expected.shape[1]:
            nxt = qwen1_tiny(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat((ids, nxt), dim=1)
    assert ids.tolist() == expected.tolist()
    assert expected.tolist() != tensors[f"gen.{name}.output_ids"].tolist()
