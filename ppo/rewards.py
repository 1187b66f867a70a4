"""Reward sources besides the reward model: Python functions named in the config and remote reward servers.

The PPO reward of a response is `models.reward_weight` x the reward model's score plus, for each source in
`ppo.extra_rewards`, its weight x its score; each source's mean is logged as `reward/<name>`.

- `function`: `"package.module:function"` or `"path/to/file.py:function"`, called as
  `function(prompts, responses) -> list[float]` with the prompts as message lists (verifiable rewards: exact
  answers, unit tests, format checks). It runs in the training process: it is the user's own code.
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
from typing import Literal

from pydantic import Field

from align.core.config import Section

Scorer = Callable[[Sequence[list[dict]], Sequence[str]], list[float]]


class RewardSourceError(RuntimeError):
    pass


class RewardSource(Section):
    kind: Literal["function", "http"]
    target: str  # "module:function", "file.py:function" or a URL
    weight: float = 1.0
    name: str | None = None  # in the metrics as reward/<name>; default: the function's name or the host
    batch_size: int = Field(32, ge=1)  # http: responses per request
    timeout_s: float = Field(30.0, gt=0)  # http: per request
    retries: int = Field(2, ge=0)  # http: extra attempts after a connection error, timeout or 5xx

    def label(self) -> str:
        if self.name:
            return self.name
        return self.target.rsplit(":", 1)[-1] if self.kind == "function" else self.target.split("/")[2]


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


def checked(scores: object, n: int, source: str) -> list[float]:
    """The scores of n responses, or an error naming the source and the problem."""
    if not isinstance(scores, (list, tuple)) or len(scores) != n:
        got = f"{len(scores)} values" if isinstance(scores, (list, tuple)) else type(scores).__name__
        raise RewardSourceError(f"{source}: expected a list of {n} rewards, got {got}")
    out = []
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise RewardSourceError(f"{source}: reward {i} is {s!r}, not a finite number")
        out.append(float(s))
    return out


def http_scorer(source: RewardSource, sleep: Callable[[float], None] = time.sleep) -> Scorer:
    import httpx

    def post(client: httpx.Client, body: dict, batch: int) -> object:
        where = f"reward server {source.target} (batch {batch})"
        for attempt in range(source.retries + 1):
            try:
                response = client.post(source.target, json=body, timeout=source.timeout_s)
            except (httpx.TransportError, httpx.TimeoutException) as e:
                problem = f"{type(e).__name__}: {e}"
            else:
                if response.status_code < 500:
                    if response.status_code >= 400:
                        raise RewardSourceError(f"{where}: HTTP {response.status_code}: {response.text[:200]}")
                    try:
                        data = response.json()
                    except ValueError:
                        raise RewardSourceError(f"{where}: the answer is not JSON: {response.text[:200]!r}") from None
                    if not isinstance(data, dict) or "rewards" not in data:
                        raise RewardSourceError(f"{where}: the answer has no 'rewards' field: {str(data)[:200]}")
                    return data["rewards"]
                problem = f"HTTP {response.status_code}"
            if attempt < source.retries:
                sleep(min(0.5 * 2**attempt, 10.0))
        raise RewardSourceError(f"{where}: failed after {source.retries + 1} attempts ({problem})")

    def score(prompts: Sequence[list[dict]], responses: Sequence[str]) -> list[float]:
        out: list[float] = []
        with httpx.Client() as client:
            for b, start in enumerate(range(0, len(responses), source.batch_size)):
                chunk = slice(start, start + source.batch_size)
                body = {"prompts": list(prompts[chunk]), "responses": list(responses[chunk])}
                out += checked(post(client, body, b), len(body["responses"]), f"reward server {source.target}")
        return out

    return score


def make_scorer(source: RewardSource) -> Scorer:
    if source.kind == "http":
        if not source.target.startswith(("http://", "https://")):
            raise RewardSourceError(f"reward source {source.target!r}: an http source needs an http(s) URL")
        return http_scorer(source)
    fn = load_function(source.target)

    def score(prompts: Sequence[list[dict]], responses: Sequence[str]) -> list[float]:
        try:
            scores = fn(prompts, responses)
        except Exception as e:  # the user's code: name it, keep the cause
            raise RewardSourceError(f"reward function {source.target} failed: {type(e).__name__}: {e}") from e
        return checked(scores, len(responses), f"reward function {source.target}")

    return score


def make_scorers(sources: Sequence[RewardSource]) -> list[tuple[RewardSource, Scorer]]:
    """Every source's scorer (a bad target stops here, before training); names must be distinct and not `model`
    (the reward model's name in the metrics)."""
    labels = [s.label() for s in sources]
    clashes = sorted({n for n in labels if labels.count(n) > 1 or n == "model"})
    if clashes:
        raise RewardSourceError(f"ppo.extra_rewards: give distinct names (`name:`); clashing: {', '.join(clashes)}")
    return [(source, make_scorer(source)) for source in sources]


def extra_rewards(
    scorers: Sequence[tuple[RewardSource, Scorer]], prompts: Sequence[list[dict]], responses: Sequence[str]
) -> dict[str, list[float]]:
    """Each source's scores of the responses, by label."""
    return {source.label(): scorer(prompts, responses) for source, scorer in scorers}
