"""Reward sources besides the reward model: functions named in the config and remote reward servers."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ppo.rewards import (
    RewardSource,
    RewardSourceError,
    extra_rewards,
    http_scorer,
    load_function,
    make_scorer,
    make_scorers,
)

PROMPTS = [[{"role": "user", "content": f"q{i}"}] for i in range(5)]
RESPONSES = ["a", "bb", "ccc", "dddd", "eeeee"]


@pytest.fixture
def server():
    """A reward server whose behaviour each test sets: `plan` is a list of (status, body) answers, then length."""
    state = {"plan": [], "requests": []}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the http.server name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"].append(body)
            status, answer = state["plan"].pop(0) if state["plan"] else (200, None)
            if answer is None:  # the default: reward = response length
                answer = json.dumps({"rewards": [len(r) for r in body["responses"]]})
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(answer.encode())

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/score", state
    httpd.shutdown()


def test_http_source_batches_and_keeps_the_order(server):
    url, state = server
    scorer = make_scorer(RewardSource(kind="http", target=url, batch_size=2))
    assert scorer(PROMPTS, RESPONSES) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [len(r["responses"]) for r in state["requests"]] == [2, 2, 1]
    assert state["requests"][0]["prompts"] == PROMPTS[:2]


def test_http_source_retries_server_errors_then_gives_a_clear_error(server):
    url, state = server
    waits = []
    source = RewardSource(kind="http", target=url, batch_size=8, retries=2)
    state["plan"] = [(503, "busy"), (502, "bad gateway")]
    assert http_scorer(source, sleep=waits.append)(PROMPTS, RESPONSES) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert waits == [0.5, 1.0] and len(state["requests"]) == 3
    state["plan"] = [(503, "busy")] * 3
    with pytest.raises(RewardSourceError, match=r"\(batch 0\): failed after 3 attempts \(HTTP 503\)"):
        http_scorer(source, sleep=waits.append)(PROMPTS, RESPONSES)


@pytest.mark.parametrize(
    "status, body, message",
    [
        (200, "not json", "the answer is not JSON"),
        (200, '{"scores": [1]}', "the answer has no 'rewards' field"),
        (200, '{"rewards": [1, 2]}', "expected a list of 5 rewards, got 2 values"),
        (200, '{"rewards": [1, 2, "x", 4, 5]}', "reward 2 is 'x', not a finite number"),
        (422, '{"detail": "bad"}', "HTTP 422"),
    ],
)
def test_http_source_bad_answers_stop_with_the_source_named(server, status, body, message):
    url, state = server
    state["plan"] = [(status, body)]
    with pytest.raises(RewardSourceError, match=message) as e:
        make_scorer(RewardSource(kind="http", target=url, batch_size=8, retries=0))(PROMPTS, RESPONSES)
    assert url in str(e.value)


def test_http_source_times_out_and_an_unreachable_server_is_named():
    source = RewardSource(kind="http", target="http://127.0.0.1:9/score", retries=1, timeout_s=0.5)
    with pytest.raises(RewardSourceError, match=r"127.0.0.1:9/score \(batch 0\): failed after 2 attempts \(Connect"):
        http_scorer(source, sleep=lambda s: None)(PROMPTS, RESPONSES)
    with pytest.raises(RewardSourceError, match="needs an http"):
        make_scorer(RewardSource(kind="http", target="ftp://x"))


def test_function_sources_by_module_or_file(tmp_path):
    path = tmp_path / "verify.py"
    path.write_text("def exact(prompts, responses):\n    return [float(r == 'ccc') for r in responses]\n")
    by_file = RewardSource(kind="function", target=f"{path}:exact", weight=2.0)
    by_module = RewardSource(kind="function", target="math:fsum", name="sum")  # wrong arity: named in the error
    scores = extra_rewards([(by_file, make_scorer(by_file))], PROMPTS, RESPONSES)
    assert scores == {"exact": [0.0, 0.0, 1.0, 0.0, 0.0]}
    with pytest.raises(RewardSourceError, match="reward function math:fsum failed: TypeError"):
        make_scorer(by_module)(PROMPTS, RESPONSES)
    with pytest.raises(RewardSourceError, match="clashing: exact"):
        make_scorers([by_file, RewardSource(kind="function", target=f"{path}:exact")])
    with pytest.raises(RewardSourceError, match="clashing: model"):
        make_scorers([RewardSource(kind="function", target=f"{path}:exact", name="model")])
    assert load_function("json:dumps") is json.dumps
    for bad, message in (("nope", "expected 'module:function'"), (f"{tmp_path}/missing.py:f", "cannot be loaded"),
                         ("json:nothing_here", "cannot be loaded")):  # fmt: skip
        with pytest.raises(RewardSourceError, match=message):
            load_function(bad)
    wrong = tmp_path / "wrong.py"
    wrong.write_text("def f(prompts, responses):\n    return [1.0]\n")
    with pytest.raises(RewardSourceError, match="expected a list of 5 rewards, got 1 values"):
        make_scorer(RewardSource(kind="function", target=f"{wrong}:f"))(PROMPTS, RESPONSES)
