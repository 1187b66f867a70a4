"""Judges (`eval.judges`): scores of a policy's answers from outside what the training optimised, taken at every
evaluation, so any run has a gold curve beside its proxy reward.

- `model`: a held-out reward-model folder; the score is its raw reward.
- `function`: `"module:function"` or `"file.py:function"`, called as `function(prompts, responses, **args)` and
  returning one float per response, or None for a response it cannot score (left out of the mean).
- `http`: a reward server, as in `ppo.extra_rewards` (`{"prompts", "responses"}` in, `{"rewards"}` out).
- `llm`: an OpenAI-compatible chat endpoint (`target` is its base URL, e.g. `http://host:8000/v1`) compares each
  answer with the SFT policy's answer to the same prompt (`references`), twice with the positions swapped. The
  score is 1 for a win, 0.5 for a tie and 0 for a loss, averaged over the two orders, so 0.5 means "as good as
  SFT". Verdicts it cannot parse are left out and counted (`<name>/invalid`); `<name>/consistency` is the share
  of answers judged the same way in both orders (a judge with position bias scores low).

`judge_metrics` turns the scores into metrics; `hacking_warning` tells when the proxy has risen while the gold fell
over the last evaluations.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
from pydantic import Field

from align.core.config import Section
from align.eval.harness import BenchmarkConfig
from ppo.rewards import RewardSourceError, ScorerSource, make_scorer, post_json


class JudgeConfig(ScorerSource):
    kind: Literal["model", "function", "http", "llm"]
    model: str = "judge"  # llm: the model name sent to the endpoint
    max_tokens: int = Field(512, ge=1)  # llm: room for a short explanation before the verdict
    api_key_env: str | None = None  # llm: the environment variable holding the endpoint's API key
    concurrency: int = Field(8, ge=1)  # llm: requests in flight


class EvalSection(Section):
    judges: list[JudgeConfig] = []
    benchmarks: list[BenchmarkConfig] = []  # maths benchmarks at every evaluation (align/eval/harness.py)
    gold: str | None = None  # the judge plotted as gold against the proxy reward; default: the first judge
    hacking_window: int = Field(3, ge=2)  # evaluations: the proxy rising while the gold falls over them → warning

    def gold_name(self) -> str | None:
        return self.gold or (self.judges[0].label() if self.judges else None)


JUDGE_SYSTEM = "You are a careful, impartial judge of assistant answers."
JUDGE_PROMPT = """Compare two answers to the conversation below. Judge which answer better serves the user: \
correct, helpful, honest and harmless; length alone is no merit. The order of the answers says nothing about \
their quality.

[Conversation]
{conversation}

[Answer A]
{a}

[Answer B]
{b}

Explain briefly, then end with your verdict on its own line: [[A]] if A is better, [[B]] if B is better, \
[[C]] for a tie."""
VERDICT = re.compile(r"\[\[([ABC])\]\]")


def conversation_text(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m.get('content') or ''}" for m in messages)


def parse_verdict(text: str) -> str | None:
    """The last [[A]], [[B]] or [[C]] in the judge's answer, or None."""
    found = VERDICT.findall(text or "")
    return found[-1] if found else None


class LLMJudge:
    """Pairwise judging through an OpenAI-compatible `/chat/completions`, position-swapped."""

    def __init__(self, source: JudgeConfig) -> None:
        if not source.target.startswith(("http://", "https://")):
            raise RewardSourceError(f"eval.judges {source.label()}: an llm judge needs the endpoint's http(s) URL")
        self.source = source
        self.url = source.target.rstrip("/") + "/chat/completions"
        key = os.environ.get(source.api_key_env, "") if source.api_key_env else ""
        if source.api_key_env and not key:
            raise RewardSourceError(f"eval.judges {source.label()}: ${source.api_key_env} is not set")
        self.headers = {"Authorization": f"Bearer {key}"} if key else None
        self.last = {"invalid": 0, "consistent": 0, "judged": 0}

    def verdict(self, client, messages: list[dict], a: str, b: str) -> str | None:
        body = {
            "model": self.source.model,
            "messages": [
                {"role": "system", "content": JUDGE_SYSTEM},
                {"role": "user", "content": JUDGE_PROMPT.format(conversation=conversation_text(messages), a=a, b=b)},
            ],
            "temperature": 0.0,
            "max_tokens": self.source.max_tokens,
        }
        where = f"judge {self.source.label()} at {self.url}"
        data = post_json(client, self.url, body, self.source, where, headers=self.headers)
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise RewardSourceError(f"{where}: not a chat completion: {str(data)[:200]}") from None
        return parse_verdict(content)

    def __call__(
        self, prompts: Sequence[list[dict]], responses: Sequence[str], references: Sequence[str]
    ) -> list[float | None]:
        import httpx

        if len(references) != len(responses):
            raise RewardSourceError(f"judge {self.source.label()}: {len(references)} references for {len(responses)}")
        jobs = [(i, swap) for i in range(len(responses)) for swap in (False, True)]
        with httpx.Client() as client, ThreadPoolExecutor(self.source.concurrency) as pool:

            def run(job: tuple[int, bool]) -> str | None:
                i, swap = job
                a, b = (references[i], responses[i]) if swap else (responses[i], references[i])
                return self.verdict(client, prompts[i], a, b)

            verdicts = list(pool.map(run, jobs))
        scores: list[float | None] = []
        invalid = consistent = 0
        for i in range(len(responses)):
            first, second = verdicts[2 * i], verdicts[2 * i + 1]
            as_policy = [{"A": 1.0, "C": 0.5, "B": 0.0}.get(first), {"B": 1.0, "C": 0.5, "A": 0.0}.get(second)]
            valid = [s for s in as_policy if s is not None]
            invalid += 2 - len(valid)
            consistent += int(len(valid) == 2 and valid[0] == valid[1])
            scores.append(float(np.mean(valid)) if valid else None)
        self.last = {"invalid": invalid, "consistent": consistent, "judged": len(responses)}
        return scores


class Judges:
    """Every judge of `eval.judges`, ready to score (bad targets fail here, before training)."""

    def __init__(self, cfg: EvalSection, device=None, dtype=None) -> None:
        labels = [j.label() for j in cfg.judges]
        clashes = sorted({n for n in labels if labels.count(n) > 1})
        if clashes:
            raise RewardSourceError(f"eval.judges: give distinct names (`name:`); clashing: {', '.join(clashes)}")
        if cfg.gold and cfg.gold not in labels:
            raise RewardSourceError(f"eval.gold: {cfg.gold!r} is not one of the judges ({', '.join(labels) or 'none'})")
        self.cfg = cfg
        self.judges = [
            (j, LLMJudge(j) if j.kind == "llm" else make_scorer(j, device, dtype, allow_none=True)) for j in cfg.judges
        ]

    def __bool__(self) -> bool:
        return bool(self.judges)

    @property
    def needs_references(self) -> bool:
        return any(j.kind == "llm" for j, _ in self.judges)

    def score(
        self, prompts: Sequence[list[dict]], responses: Sequence[str], references: Sequence[str] | None = None
    ) -> tuple[dict[str, list[float | None]], dict[str, float]]:
        """Each judge's scores by name, and counts to sum over ranks (`<name>/n`, `/sum`, `/invalid`,
        `/consistent`, `/judged`; see `judge_metrics`)."""
        scores, counts = {}, {}
        for j, scorer in self.judges:
            name = j.label()
            if j.kind == "llm":
                if references is None:
                    raise RewardSourceError(f"judge {name}: needs the SFT policy's answers (references)")
                scores[name] = scorer(prompts, responses, references)
                counts.update({f"{name}/{k}": float(v) for k, v in scorer.last.items()})
            else:
                scores[name] = scorer(prompts, responses)
            valid = [s for s in scores[name] if s is not None]
            counts[f"{name}/n"], counts[f"{name}/sum"] = float(len(valid)), float(sum(valid))
        return scores, counts


def judge_metrics(counts: dict[str, float]) -> dict[str, float]:
    """Summed counts (over ranks) → `judge/<name>` (mean score), `judge/<name>/invalid` (share of unparsed
    verdicts) and `judge/<name>/consistency` (share judged alike in both orders), for llm judges."""
    out = {}
    for key in counts:
        if key.endswith("/n"):
            name = key[:-2]
            if counts[key]:
                out[f"judge/{name}"] = counts[f"{name}/sum"] / counts[key]
            if f"{name}/judged" in counts and counts[f"{name}/judged"]:
                out[f"judge/{name}/invalid"] = counts[f"{name}/invalid"] / (2 * counts[f"{name}/judged"])
                out[f"judge/{name}/consistency"] = counts[f"{name}/consistent"] / counts[f"{name}/judged"]
    return out


def hacking_warning(steps: list[int], proxy: list[float], gold: list[float], window: int) -> str | None:
    """A warning when, over the last `window` evaluations, the proxy reward has risen and the gold score fallen
    (least-squares slopes of opposite signs and net changes in those directions), else None."""
    if len(steps) < window:
        return None
    s, p, g = (np.asarray(v[-window:], dtype=float) for v in (steps, proxy, gold))
    slope = lambda y: float(np.polyfit(s, y, 1)[0])
    if slope(p) > 0 and slope(g) < 0 and p[-1] > p[0] and g[-1] < g[0]:
        return (
            f"reward hacking? over the last {window} evaluations (steps {int(s[0])}–{int(s[-1])}) the proxy reward "
            f"rose {p[0]:.4g} → {p[-1]:.4g} while the gold judge fell {g[0]:.4g} → {g[-1]:.4g}"
        )
    return None
