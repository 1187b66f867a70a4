"""Reward sources besides the reward model: more reward models, Python functions named in the config and remote
reward servers. The same scorers serve as judges at evaluation (`align/eval/judges.py`).

The PPO reward of a response is `models.reward_weight` x the reward model's score plus, for each source in
`ppo.extra_rewards`, its weight x its score; each source's mean is logged as `reward/<name>`.

- `model`: another reward-model folder (`align rm train`), scored like `models.reward` with its own tokenizer, on
  the training device; its label defaults to the folder's name (give `name:` when two folders share one).
- `function`: `"package.module:function"` or `"path/to/file.py:function"`, called as
  `function(prompts, responses) -> list[float]` with the prompts as message lists (verifiable rewards: exact
  answers, unit tests, format checks), plus `args` as keyword arguments. It runs in the training process: it is
  the user's own code.
- `http`: POST `{"prompts": [[messages], …], "responses": ["…", …]}` to `url` in batches of `batch_size`; the
  server answers `{"rewards": [float, …]}` in the same order. Each call has a timeout and is retried (with
  backoff) on connection errors, timeouts and 5xx; any other bad answer stops the run with a message naming the
  source, the batch and what was wrong.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from align.core.config import Section

Scorer = Callable[[Sequence[list[dict]], Sequence[str]], list[float]]


class RewardSourceError(RuntimeError):
    pass


class ScorerSource(Section):
    kind: Literal["model", "function", "http"]
    target: str  # a reward-model folder, "module:function", "file.py:function" or a URL
    name: str | None = None  # in the metrics as reward/<name>; default: the folder's, function's or host's name
    args: dict[str, Any] = Field(default_factory=dict)  # function: keyword arguments
    batch_size: int = Field(32, ge=1)  # http: responses per request; model: per forward pass
    timeout_s: float = Field(30.0, gt=0)  # http: per request
    retries: int = Field(2, ge=0)  # http: extra attempts after a connection error, timeout or 5xx

    def label(self) -> str:
        if self.name:
            return self.name
        if self.kind == "model":
            return Path(self.target).name
        return self.target.rsplit(":", 1)[-1] if self.kind == "function" else self.target.split("/")[2]


class RewardSource(ScorerSource):
    weight: float = 1.0  # its weight in the PPO reward


def load_function(target: str) -> Scorer:
    """`module:function` (importable) or `file.py:function` (loaded from the file)."""
    where, sep, attr = target.rpartition(":")
    if not sep or not where or not attr:
        raise RewardSourceError(f"reward function {target!r}: expected 'module:function' or 'file.py:function'")
    try:
        if where.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            if spec is None or not Path(where).is_file():
                raise FileNotFoundError(where)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        fn = getattr(module, attr)
    except (ImportError, FileNotFoundError, AttributeError) as e:
        raise RewardSourceError(f"reward function {target!r} cannot be loaded: {e}") from None
    if not callable(fn):
        raise RewardSourceError(f"reward function {target!r} is not callable")
    return fn


def checked(scores: object, n: int, source: str, allow_none: bool = False) -> list[float]:
    """The scores of n responses, or an error naming the source and the problem; with `allow_none` (judges), None
    marks a response the source cannot score."""
    if not isinstance(scores, (list, tuple)) or len(scores) != n:
        got = f"{len(scores)} values" if isinstance(scores, (list, tuple)) else type(scores).__name__
        raise RewardSourceError(f"{source}: expected a list of {n} rewards, got {got}")
    out = []
    for i, s in enumerate(scores):
        if s is None and allow_none:
            out.append(None)
            continue
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise RewardSourceError(f"{source}: reward {i} is {s!r}, not a finite number")
        out.append(float(s))
    return out


def post_json(client, url: str, body: dict, source: "ScorerSource", where: str, headers=None, sleep=time.sleep):
    """POST `body` to `url` and return the answer's JSON; retried with backoff on connection errors, timeouts and
    5xx, any other failure raised as a RewardSourceError naming `where`."""
    import httpx

    for attempt in range(source.retries + 1):
        try:
            response = client.post(url, json=body, timeout=source.timeout_s, headers=headers)
        except (httpx.TransportError, httpx.TimeoutException) as e:
            problem = f"{type(e).__name__}: {e}"
        else:
            if response.status_code < 500:
                if response.status_code >= 400:
                    raise RewardSourceError(f"{where}: HTTP {response.status_code}: {response.text[:200]}")
                try:
                    return response.json()
                except ValueError:
                    raise RewardSourceError(f"{where}: the answer is not JSON: {response.text[:200]!r}") from None
            problem = f"HTTP {response.status_code}"
        if attempt < source.retries:
            sleep(min(0.5 * 2**attempt, 10.0))
    raise RewardSourceError(f"{where}: failed after {source.retries + 1} attempts ({problem})")


def http_scorer(
    source: "ScorerSource", sleep: Callable[[float], None] = time.sleep, allow_none: bool = False
) -> Scorer:
    import httpx

    def score(prompts: Sequence[list[dict]], responses: Sequence[str]) -> list[float]:
        out: list[float] = []
        with httpx.Client() as client:
            for b, start in enumerate(range(0, len(responses), source.batch_size)):
                chunk = slice(start, start + source.batch_size)
                body = {"prompts": list(prompts[chunk]), "responses": list(responses[chunk])}
                where = f"reward server {source.target} (batch {b})"
                data = post_json(client, source.target, body, source, where, sleep=sleep)
                if not isinstance(data, dict) or "rewards" not in data:
                    raise RewardSourceError(f"{where}: the answer has no 'rewards' field: {str(data)[:200]}")
                n = len(body["responses"])
                out += checked(data["rewards"], n, f"reward server {source.target}", allow_none)
        return out

    return score


def model_scorer(source: ScorerSource, device=None, dtype=None) -> Scorer:
    """A reward-model folder as a scorer: raw scores of prompt + response with the model's own tokenizer."""
    import torch

    from base_model import QwenTokenizer
    from ppo.experience import reward_scores
    from rm.model import is_reward_model, load_reward_model

    if not is_reward_model(Path(source.target)):
        raise RewardSourceError(f"reward model {source.target!r}: not a reward-model folder (no reward head)")
    model = load_reward_model(source.target, dtype=dtype or torch.float32, device=device or "cpu").eval()
    model.requires_grad_(False)
    tokenizer = QwenTokenizer.from_file(source.target)

    def score(prompts: Sequence[list[dict]], responses: Sequence[str]) -> list[float]:
        with torch.no_grad():
            scores = reward_scores(model, tokenizer, list(prompts), list(responses), source.batch_size, 4096)
        return scores.tolist()

    return score


def make_scorer(source: ScorerSource, device=None, dtype=None, allow_none: bool = False) -> Scorer:
    """The source's scorer; a reward model is loaded onto `device` in `dtype` (default: the CPU, fp32). With
    `allow_none`, functions and servers may answer None for a response they cannot score (judges)."""
    if source.kind == "model":
        return model_scorer(source, device, dtype)
    if source.kind == "http":
        if not source.target.startswith(("http://", "https://")):
            raise RewardSourceError(f"reward source {source.target!r}: an http source needs an http(s) URL")
        return http_scorer(source, allow_none=allow_none)
    fn = load_function(source.target)

    def score(prompts: Sequence[list[dict]], responses: Sequence[str]) -> list[float]:
        try:
            scores = fn(prompts, responses, **source.args)
        except Exception as e:  # the user's code: name it, keep the cause
            raise RewardSourceError(f"reward function {source.target} failed: {type(e).__name__}: {e}") from e
        return checked(scores, len(responses), f"reward function {source.target}", allow_none)

    return score


def make_scorers(
    sources: Sequence[RewardSource], device=None, dtype=None, where: str = "ppo.extra_rewards", reserved=("model",)
) -> list[tuple[RewardSource, Scorer]]:
    """Every source's scorer (a bad target stops here, before training); names must be distinct and not reserved
    (`model` is the reward model's name in the metrics)."""
    labels = [s.label() for s in sources]
    clashes = sorted({n for n in labels if labels.count(n) > 1 or n in reserved})
    if clashes:
        raise RewardSourceError(f"{where}: give distinct names (`name:`); clashing: {', '.join(clashes)}")
    return [(source, make_scorer(source, device, dtype)) for source in sources]


def extra_rewards(
    scorers: Sequence[tuple[RewardSource, Scorer]], prompts: Sequence[list[dict]], responses: Sequence[str]
) -> dict[str, list[float]]:
    """Each source's scores of the responses, by label."""
    return {source.label(): scorer(prompts, responses) for source, scorer in scorers}
