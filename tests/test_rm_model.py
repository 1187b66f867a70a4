"""Reward model: pooling, independence from padding and batch composition, save/load, the loss."""

import math

import pytest
import torch

from align.core.records import DataError
from base_model import QwenForCausalLM
from conftest import randomize_biases, tiny_config
from rm.data import collate_sequences
from rm.losses import bradley_terry_loss_sum
from rm.model import RewardModel, load_reward_model

END = 299


def _model(pooling="end_token", **flags):
    torch.manual_seed(0)
    lm = randomize_biases(QwenForCausalLM(tiny_config(**flags)))
    return RewardModel(lm, pooling, END).eval()


def _seqs():
    g = torch.Generator().manual_seed(1)
    out = []
    for n in (5, 12, 9, 3):
        ids = torch.randint(0, 290, (n,), generator=g).tolist() + [END]
        out.append((ids, [0] * (n // 2) + [1] * (n - n // 2) + [0]))
    return out


def _left_pad(seqs, pad):
    width = max(len(s) for s, _ in seqs)
    ids = torch.tensor([[pad] * (width - len(s)) + s for s, _ in seqs])
    att = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s, _ in seqs])
    resp = torch.tensor([[0] * (width - len(s)) + m for s, m in seqs])
    return ids, att, resp


@pytest.mark.parametrize("pooling", ["end_token", "last", "mean"])
@pytest.mark.parametrize("flags", [{}, {"use_dynamic_ntk": True, "use_logn_attn": True, "seq_length": 8}])
def test_rewards_do_not_depend_on_padding_or_batch(pooling, flags):
    model, seqs = _model(pooling, **flags), _seqs()
    with torch.no_grad():
        alone = [
            model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long), torch.tensor([m])).rewards.item()
            for s, m in seqs
        ]
        right = collate_sequences(seqs, pad_id=0)
        r_right = model(right["input_ids"], right["attention_mask"], right["response_mask"]).rewards.tolist()
        r_left = model(*_left_pad(seqs, 0)).rewards.tolist()
        sub = collate_sequences(seqs[1:3], pad_id=7)  # another batch, another pad id
        r_sub = model(sub["input_ids"], sub["attention_mask"], sub["response_mask"]).rewards.tolist()
    assert max(abs(a - b) for a, b in zip(alone, r_right)) < 1e-5
    assert max(abs(a - b) for a, b in zip(alone, r_left)) < 1e-5
    assert max(abs(a - b) for a, b in zip(alone[1:3], r_sub)) < 1e-5


def test_end_token_pooling_checks_the_end_token():
    model = _model()
    with pytest.raises(ValueError, match="does not end with the reward end token"):
        model(torch.tensor([[1, 2, 3]]))


def test_save_and_load_round_trip(tmp_path):
    model = _model()
    model.mean, model.std = 1.5, 2.0
    model.save(tmp_path / "rm", tokenizer=None)
    loaded = load_reward_model(tmp_path / "rm")
    ids = torch.tensor([_seqs()[0][0]])
    with torch.no_grad():
        assert torch.allclose(model(ids).rewards, loaded(ids).rewards, atol=1e-6)
    assert loaded.normalise(torch.tensor([3.5])).item() == pytest.approx(1.0)
    assert (tmp_path / "rm" / "config.json").exists()  # the backbone is an ordinary Hugging Face folder


def test_reward_model_saved_from_inside_a_value_model_state_loads_back(tmp_path):
    """The value model's gathered state (keys under `rm.`) is written with the same layout as a reward model's."""
    from ppo.models import ValueModel
    from rm.model import save_reward_state

    model = _model()
    value = ValueModel(model)
    save_reward_state(
        value.state_dict(), value.config, model.reward_config(), tmp_path / "v", None, prefix=ValueModel.RM_PREFIX
    )
    loaded = load_reward_model(tmp_path / "v")
    ids = torch.tensor([_seqs()[0][0]])
    with torch.no_grad():
        assert torch.allclose(model(ids).rewards, loaded(ids).rewards, atol=1e-6)
        assert torch.allclose(value(ids), ValueModel(loaded)(ids), atol=1e-6)


def test_bradley_terry_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5])
    expected = -math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(0.5)))
    assert bradley_terry_loss_sum(chosen, rejected).item() == pytest.approx(expected, abs=1e-6)
    margin = torch.tensor([1.0, 0.0])
    expected_m = -math.log(0.5) - math.log(1 / (1 + math.exp(0.5)))
    assert bradley_terry_loss_sum(chosen, rejected, margin).item() == pytest.approx(expected_m, abs=1e-6)


def test_eval_counts_the_records_it_leaves_out(tmp_path):
    """`align rm eval` on HH data with rows that part early (real rows): scored on the rest, the others counted."""
    from base_model import QwenTokenizer
    from conftest import ROOT
    from rm.eval import evaluate_file

    tokenizer = QwenTokenizer.from_bytes()
    torch.manual_seed(0)
    lm = QwenForCausalLM(tiny_config(vocab_size=-(-len(tokenizer) // 64) * 64, seq_length=512))
    RewardModel(lm, "end_token", tokenizer.eod_id).save(tmp_path / "rm", tokenizer=tokenizer)
    public = ROOT / "tests" / "fixtures" / "public_rows"
    data = tmp_path / "hh.jsonl"
    data.write_text(
        (public / "hh_rlhf_harmless_test_sample.jsonl").read_text()
        + (public / "hh_rlhf_harmless_test_divergent.jsonl").read_text()
    )
    metrics = evaluate_file(str(tmp_path / "rm"), str(data), max_len=256, report=tmp_path / "r.html")
    assert metrics["overall"]["n"] == 4 and metrics["left_out"] == {"multi-turn replies": 5}
    assert metrics["left_out_examples"][0].startswith(f"{data}:5:")
    with pytest.raises(DataError, match="hh.jsonl:5"):
        evaluate_file(str(tmp_path / "rm"), str(data), max_len=256, on_error="raise")


def test_scoring_a_file_batches_by_length_and_keeps_its_order(tmp_path, monkeypatch, capsys):
    """`align rm score`: items batched with others of their length (less padding) score as they do one at a time,
    in the file's order, normalised when asked; a folder without a reward head is named, not a traceback."""
    import json

    from align.cli import main
    from base_model import QwenTokenizer, save_pretrained
    from rm.eval import score_texts

    tokenizer = QwenTokenizer.from_bytes()
    torch.manual_seed(0)
    lm = randomize_biases(QwenForCausalLM(tiny_config(vocab_size=-(-len(tokenizer) // 64) * 64, seq_length=512)))
    model = RewardModel(lm, "end_token", tokenizer.eod_id).eval()
    model.mean, model.std = 0.5, 2.0
    model.save(tmp_path / "rm", tokenizer=tokenizer)
    items = [([{"role": "user", "content": "q" * (1 + 7 * i % 23)}], "a" * (2 + 11 * i % 31)) for i in range(13)]
    alone = torch.cat([score_texts(model, tokenizer, [item], 256) for item in items])
    for by_length in (False, True):
        batched = score_texts(model, tokenizer, items, 256, batch_size=4, by_length=by_length)
        assert torch.allclose(batched, alone, atol=1e-5), by_length
    rows = [{"prompt": p[0]["content"], "response": r, "id": i} for i, (p, r) in enumerate(items)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["rm", "score", "--data", str(tmp_path / "in.jsonl"), "--max-len", "256", "--batch-size", "4"]
    assert main([*args, "--model", str(tmp_path / "rm"), "--out", str(tmp_path / "out.jsonl"), "--normalise"]) == 0
    scored = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in scored] == list(range(13))
    assert torch.allclose(torch.tensor([r["reward"] for r in scored]), (alone - 0.5) / 2.0, atol=1e-5)
    save_pretrained(lm, tmp_path / "lm", tokenizer)  # a policy, not a reward model
    assert main([*args, "--model", str(tmp_path / "lm"), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "not a reward model folder" in capsys.readouterr().err
