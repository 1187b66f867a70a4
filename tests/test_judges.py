"""Judges (`eval.judges`): a held-out reward model, Python functions, and an LLM judge through an OpenAI-compatible
endpoint (a real HTTP server here) that compares each answer with the SFT policy's, position-swapped; the metrics
and the reward-hacking warning."""

import json

import pytest
import torch

from align.eval.judges import (
    EvalSection,
    JudgeConfig,
    Judges,
    hacking_warning,
    judge_metrics,
    parse_verdict,
)
from base_model import QwenForCausalLM, QwenTokenizer
from conftest import FakeJudge as Judge
from conftest import tiny_config
from ppo.experience import reward_scores
from ppo.rewards import RewardSourceError
from rm.model import RewardModel, load_reward_model

PROMPTS = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]
POLICY = ["great answer!!", "fine", "great answer!!", "meh"]
SFT = ["fine", "fine", "ok", "great answer!!"]


def llm(endpoint, **kw):
    return EvalSection(judges=[JudgeConfig(kind="llm", target=endpoint, name="pairwise", **kw)])


def test_llm_judge_compares_with_sft_in_both_orders(judge_endpoint, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "secret")
    judges = Judges(llm(judge_endpoint, model="qwen-judge", api_key_env="JUDGE_KEY"))
    scores, counts = judges.score(PROMPTS, POLICY, SFT)
    assert scores["pairwise"] == [1.0, 0.5, 1.0, 0.0]  # win, tie, win, loss
    assert len(Judge.calls) == 8 and {c[0] for c in Judge.calls} == {"/v1/chat/completions"}
    assert {c[2] for c in Judge.calls} == {"Bearer secret"} and Judge.calls[0][1]["model"] == "qwen-judge"
    texts = [c[1]["messages"][-1]["content"] for c in Judge.calls]
    for answer, ref in zip(POLICY, SFT):  # each pair was asked with the policy's answer first and second
        assert any(f"[Answer A]\n{answer}\n\n[Answer B]\n{ref}\n" in t for t in texts)
        assert any(f"[Answer A]\n{ref}\n\n[Answer B]\n{answer}\n" in t for t in texts)
    metrics = judge_metrics(counts)
    assert metrics == {"judge/pairwise": 0.625, "judge/pairwise/invalid": 0.0, "judge/pairwise/consistency": 1.0}


def test_position_bias_and_unparsed_verdicts_are_measured(judge_endpoint):
    judges = Judges(llm(judge_endpoint))
    Judge.mode = "position-biased"  # always A: the policy wins one order and loses the other
    scores, counts = judges.score(PROMPTS, POLICY, SFT)
    assert scores["pairwise"] == [0.5] * 4 and judge_metrics(counts)["judge/pairwise/consistency"] == 0.0
    Judge.mode = "broken"
    scores, counts = judges.score(PROMPTS, POLICY, SFT)
    assert scores["pairwise"] == [None] * 4
    assert judge_metrics(counts) == {"judge/pairwise/invalid": 1.0, "judge/pairwise/consistency": 0.0}
    assert parse_verdict("first [[A]] then, on reflection, [[C]]") == "C" and parse_verdict("A") is None


def test_llm_judge_errors_name_the_judge(judge_endpoint, monkeypatch):
    Judge.mode = "not-chat"
    with pytest.raises(RewardSourceError, match="judge pairwise at .*not a chat completion"):
        Judges(llm(judge_endpoint)).score(PROMPTS, POLICY, SFT)
    with pytest.raises(RewardSourceError, match="needs the SFT policy's answers"):
        Judges(llm(judge_endpoint)).score(PROMPTS, POLICY)
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(RewardSourceError, match=r"\$NO_SUCH_KEY is not set"):
        Judges(llm(judge_endpoint, api_key_env="NO_SUCH_KEY"))
    with pytest.raises(RewardSourceError, match="failed after 1 attempts"):
        Judges(llm("http://127.0.0.1:9/v1", retries=0, timeout_s=2)).score(PROMPTS, POLICY, SFT)
    with pytest.raises(RewardSourceError, match="eval.gold: 'gold' is not one of the judges"):
        Judges(EvalSection(judges=llm(judge_endpoint).judges, gold="gold"))
    twice = [JudgeConfig(kind="llm", target=judge_endpoint)] * 2
    with pytest.raises(RewardSourceError, match="distinct names"):
        Judges(EvalSection(judges=twice))


def test_function_judges_may_leave_answers_unscored(tmp_path):
    (tmp_path / "gold.py").write_text(
        "def exclaims(prompts, responses, bonus=0.0):\n"
        "    return [None if r == 'meh' else r.count('!') + bonus for r in responses]\n"
    )
    cfg = EvalSection(
        judges=[JudgeConfig(kind="function", target=f"{tmp_path / 'gold.py'}:exclaims", args={"bonus": 1.0})]
    )
    scores, counts = Judges(cfg).score(PROMPTS, POLICY)
    assert scores == {"exclaims": [3.0, 1.0, 3.0, None]}
    assert judge_metrics(counts) == {"judge/exclaims": pytest.approx(7 / 3)}
    assert cfg.gold_name() == "exclaims"


def test_a_held_out_reward_model_judges_with_its_own_tokenizer(tmp_path):
    tokenizer = QwenTokenizer.from_bytes()
    torch.manual_seed(0)
    lm = QwenForCausalLM(tiny_config(vocab_size=-(-len(tokenizer) // 64) * 64, seq_length=512))
    RewardModel(lm, "end_token", tokenizer.eod_id).save(tmp_path / "held-out-rm", tokenizer=tokenizer)
    cfg = EvalSection(judges=[JudgeConfig(kind="model", target=str(tmp_path / "held-out-rm"), batch_size=3)])
    scores, _ = Judges(cfg).score(PROMPTS, POLICY)
    expected = reward_scores(load_reward_model(tmp_path / "held-out-rm"), tokenizer, PROMPTS, POLICY, 8, 4096)
    assert scores["held-out-rm"] == pytest.approx(expected.tolist(), abs=1e-5)
    with pytest.raises(RewardSourceError, match="not a reward-model folder"):
        Judges(EvalSection(judges=[JudgeConfig(kind="model", target=str(tmp_path))]))


def test_hacking_warning_needs_the_proxy_up_and_the_gold_down_over_the_window():
    steps = [0, 10, 20, 30]
    assert hacking_warning(steps, [0.1, 0.2, 0.4, 0.6], [0.5, 0.5, 0.4, 0.3], 3).startswith("reward hacking?")
    assert hacking_warning(steps, [0.1, 0.2, 0.4, 0.6], [0.5, 0.5, 0.6, 0.7], 3) is None  # both rise: fine
    assert hacking_warning(steps, [0.6, 0.4, 0.3, 0.2], [0.5, 0.5, 0.4, 0.3], 3) is None  # both fall
    assert hacking_warning(steps[:2], [0.1, 0.9], [0.9, 0.1], 3) is None  # too few evaluations


def test_any_run_gets_a_report_with_proxy_against_gold_and_the_hacking_warning(tmp_path):
    from align.report import write_report

    (tmp_path / "config.yaml").write_text("eval:\n  judges: [{kind: function, target: 'x.py:f', name: gold}]\n")
    proxy, gold = [0.0, 0.5, 1.0, 2.0], [0.4, 0.5, 0.45, 0.3]
    rows = [{"step": s * 10, "eval/reward_mean": p, "eval/judge/gold": g, "eval/kl": s} for s, (p, g) in
            enumerate(zip(proxy, gold))]  # fmt: skip
    rows[-1]["eval/hacking_warning"] = 1.0
    rows.insert(1, {"step": 5, "train/loss": 1.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = write_report(tmp_path).read_text()
    assert "Reward hacking?" in page and "steps 10–30" in page and "Flagged during training at steps 30" in page
    assert (tmp_path / "figures" / "proxy_vs_gold.png").exists() and (
        tmp_path / "figures" / "kl_frontiers.png"
    ).exists()
    rows[-1].update({"eval/judge/gold": 0.6, "eval/hacking_warning": 0.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "No reward hacking flagged" in write_report(tmp_path).read_text()
