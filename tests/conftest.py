import gc
import io
import json
import os
import shlex
import threading
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
QWEN_REF = FIXTURES / "qwen_reference"
QWEN_VOCAB = FIXTURES / "qwen.tiktoken"


# Every `torchrun` a test starts (the tests' own and the README's) rendezvouses on a free port of its own
# (`--standalone`), so two-process runs of test sessions side by side never meet on the default port 29500.
os.environ.setdefault("PET_STANDALONE", "1")


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", help="also run tests marked gpu (needs CUDA)")


def pytest_configure(config):
    # --gpu lifts the default "not gpu" of addopts; a -m given on the command line (e.g. -m gpu) is kept
    if config.getoption("--gpu") and config.option.markexpr.strip() == "not gpu":
        config.option.markexpr = ""


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from base_model import QwenTokenizer

    return QwenTokenizer.from_file(QWEN_VOCAB)


@pytest.fixture(scope="session")
def reference_logits():
    return load_file(str(QWEN_REF / "logits.safetensors")), json.loads((QWEN_REF / "logits.json").read_text())


@pytest.fixture(scope="session")
def chatml_fixture():
    return json.loads((QWEN_REF / "chatml.json").read_text())


def tiny_config(**overrides):
    from base_model import QwenConfig

    base = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        seq_length=64,
        max_position_embeddings=512,
        initializer_range=0.2,
    )
    base.update(overrides)
    return QwenConfig(**base)


def randomize_biases(model, seed=0):
    """Biases and norm weights start at constants; perturb them so tests exercise them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "norm" in name:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.1)
    return model


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str


def align_here(*args, cwd: Path = ROOT) -> CliRun:
    """`align ARGS` run in this process through the command's entry point (`align.cli.main`), its output captured:
    a subprocess would spend seconds of each call on the interpreter's start and the imports. Runs killed on
    purpose, and multi-process runs, still get processes of their own."""
    from align.cli import main

    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse's errors
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(here)
        gc.collect()  # a run's engines and models go now, not at some later test's allocation
    return CliRun(code or 0, out.getvalue(), err.getvalue())


def align_ok(*args, cwd: Path = ROOT) -> CliRun:
    """`align_here`, which must succeed."""
    run = align_here(*args, cwd=cwd)
    assert run.returncode == 0, f"align {shlex.join(map(str, args))}\n{run.stdout[-1500:]}\n{run.stderr[-3000:]}"
    return run


def kill_after_first_checkpoint(args, run_dir, env, timeout=600):
    """Start `python -m align.cli ARGS`, SIGKILL it as soon as a checkpoint is published, return its step."""
    import json as _json
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "align.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    latest = Path(run_dir) / "checkpoints" / "latest.json"
    deadline = time.time() + timeout
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return int(_json.loads(latest.read_text())["checkpoint"].split("-")[1])


class ChatServer(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible chat server for tests: subclasses answer `reply(body) -> dict`."""

    def reply(self, body: dict) -> dict:
        raise NotImplementedError

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        data = json.dumps(self.reply(body)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def serve(handler: type):
    """Start `handler` on a free local port; yields its /v1 base URL (for fixtures)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


class FakeJudge(ChatServer):
    """An OpenAI-compatible judge that prefers the answer with more "!"; `bias` makes it answer A on ties and
    on every call whose prompt contains "always-a"; `broken` returns prose with no verdict."""

    calls: list = []
    mode = "fair"

    def reply(self, body: dict) -> dict:
        FakeJudge.calls.append((self.path, body, self.headers.get("Authorization")))
        text = body["messages"][-1]["content"]
        a = text.split("[Answer A]\n", 1)[1].split("\n\n[Answer B]", 1)[0]
        b = text.split("[Answer B]\n", 1)[1].split("\n\nExplain", 1)[0]
        if FakeJudge.mode == "broken":
            verdict = None
        elif FakeJudge.mode == "position-biased":
            verdict = "[[A]]"
        else:
            verdict = "[[A]]" if a.count("!") > b.count("!") else "[[B]]" if b.count("!") > a.count("!") else "[[C]]"
        content = f"Reasoning... [[B]] maybe.\n{verdict}" if verdict else "I cannot decide."
        answer = {"choices": [{"message": {"role": "assistant", "content": content}}]}
        if FakeJudge.mode == "not-chat":
            answer = {"result": verdict}
        return answer


@pytest.fixture
def judge_endpoint():
    FakeJudge.calls, FakeJudge.mode = [], "fair"
    yield from serve(FakeJudge)


def init_tiny_model(folder) -> str:
    """`align init-model` on the tiny config with a byte vocabulary into `folder` (a fresh, untrained checkpoint)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "align.cli", "init-model", str(ROOT / "configs/model/tiny.yaml"),
                          "--tokenizer", "bytes", "--fit-vocab", "--out", str(folder)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return str(folder)
