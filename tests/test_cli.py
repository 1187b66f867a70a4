"""The `align` command and the README's commands, run as a user would."""

import json
import re
import subprocess
import sys

import pytest
import torch

from align.core.distributed import subprocess_env
from base_model import load_pretrained
from conftest import QWEN_REF, QWEN_VOCAB, ROOT


def run(args, cwd=None, stdin=None):
    env = dict(subprocess_env(), PYTHONPATH=str(ROOT))  # without an in-process run's group variables
    return subprocess.run(
        [sys.executable, "-m", "align.cli", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def readme_block(name):
    """The shell lines of the README's fenced block that follows the marker `<!-- name -->`."""
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {name} -->\s*```(?:bash|sh)\n(.*?)```", text, re.S)
    assert m, f"README has no block marked {name}"
    return [line.strip() for line in m.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_readme_test_command_is_what_ci_runs():
    test_lines = readme_block("tests")
    ci = (ROOT / ".ci" / "run").read_text()
    for line in test_lines:
        assert line in ci, f"README test command {line!r} is not run by .ci/run"
    # `set -e` ignores a failure inside an && chain: CI must exit on it explicitly
    assert test_lines[-1] + " || exit 1" in ci


def test_help_lists_commands():
    out = run(["--help"])
    assert out.returncode == 0
    for cmd in ("init-model", "generate", "chat", "convert"):
        assert cmd in out.stdout


@pytest.mark.slow  # end-to-end through the command line
def test_generate_and_chat_with_qwen_vocab(tmp_path):
    out = run(
        [
            "init-model",
            str(ROOT / "configs/model/tiny.yaml"),
            "--tokenizer",
            str(QWEN_VOCAB),
            "--out",
            str(tmp_path / "m"),
            "num_hidden_layers=1",
        ]
    )
    assert out.returncode == 0, out.stderr
    assert load_pretrained(tmp_path / "m").config.num_hidden_layers == 1
    out = run(
        [
            "generate",
            "--model",
            str(tmp_path / "m"),
            "--prompt",
            "hi",
            "--prompt",
            "你好",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
        ]
    )
    assert out.returncode == 0, out.stderr
    assert "### hi" in out.stdout and "### 你好" in out.stdout
    out = run(["chat", "--model", str(tmp_path / "m"), "--max-new-tokens", "3"], stdin="hello\n/reset\nagain\n/exit\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("assistant>") == 2


def test_chat_streams_its_reply_as_generate_writes_it(tmp_path, monkeypatch):
    """`align chat` prints the reply piece by piece as tokens come (held back only within an unfinished UTF-8
    character), and the pieces make the same text `align generate` gives for the same prompt."""
    import io

    from align.cli import main

    tiny = ["init-model", str(ROOT / "configs/model/tiny.yaml"), "--tokenizer", str(QWEN_VOCAB), "--seed", "5"]
    assert main([*tiny, "--out", str(tmp_path / "m"), "num_hidden_layers=1"]) == 0

    class Recorder(io.StringIO):
        writes: list[str] = []

        def write(self, text):
            Recorder.writes.append(text)
            return super().write(text)

    common = ["--model", str(tmp_path / "m"), "--max-new-tokens", "12", "--temperature", "0"]
    monkeypatch.setattr("sys.stdin", io.StringIO("你好\n/exit\n"))
    monkeypatch.setattr("sys.stdout", Recorder())
    assert main(["chat", *common]) == 0
    pieces = [p for p in Recorder.writes[Recorder.writes.index("assistant> ") + 1 :] if p]
    pieces = pieces[: next(i for i, p in enumerate(pieces) if p.endswith("\n")) + 1]  # up to the line's end
    assert len(pieces) > 2  # written as it came
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert main(["generate", *common, "--prompt", "你好"]) == 0
    assert "".join(pieces) == sys.stdout.getvalue()


def test_convert_qwen1_checkpoint(tmp_path):
    out = run(["convert", str(QWEN_REF / "qwen1_tiny"), str(tmp_path / "q2"), "--max-shard-mb", "0.1"])
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "q2" / "model.safetensors.index.json").exists()
    a, b = load_pretrained(QWEN_REF / "qwen1_tiny"), load_pretrained(tmp_path / "q2")
    ids = torch.randint(0, 512, (1, 50))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_errors_are_reported_without_traceback(tmp_path):
    out = run(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"])
    assert out.returncode == 2 and "checkpoint folder not found" in out.stderr and "Traceback" not in out.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("hidden_sise: 3\n")
    out = run(["init-model", str(bad), "--out", str(tmp_path / "x")])
    assert out.returncode == 2 and "unknown key 'hidden_sise'" in out.stderr
    out = run(["report", str(tmp_path)])  # neither a demo, a sweep nor a run folder
    assert out.returncode == 2 and "not a demo folder" in out.stderr and "Traceback" not in out.stderr


def test_an_unactivated_virtual_environment_puts_its_tools_first_on_path(monkeypatch):
    """`.venv/bin/align` without activation finds the environment's own ninja first, as after activation (with the
    system's first, C++ extension builds alternated between two ninja versions, each rebuilding in full)."""
    import os

    from align.cli import venv_tools_first

    monkeypatch.setattr(sys, "prefix", "/proj/.venv")
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    monkeypatch.setattr(sys, "executable", "/proj/.venv/bin/python")
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin:/proj/.venv/bin")
    venv_tools_first()
    assert os.environ["PATH"] == "/proj/.venv/bin:/usr/local/bin:/usr/bin"
    venv_tools_first()
    assert os.environ["PATH"] == "/proj/.venv/bin:/usr/local/bin:/usr/bin"
    monkeypatch.setattr(sys, "prefix", "/usr")  # not in a virtual environment: PATH as it is
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin")
    venv_tools_first()
    assert os.environ["PATH"] == "/usr/local/bin:/usr/bin"


def test_library_refusals_are_errors_not_tracebacks(tmp_path, capsys):
    """In-process: what the library refuses after the arguments parsed comes back as `error: …`, exit status 2."""
    from align.cli import main

    (tmp_path / "c.jsonl").write_text('{"text": "abc abc abc"}\n')
    cases = [
        (["tokenizer", "extend", "--base", "bytes", "--corpus", str(tmp_path / "c.jsonl"), "--vocab-size", "10",
          "--out", str(tmp_path / "tk")], "vocab size 10 (--vocab-size) must exceed the base vocabulary (256 ranks)"),
        (["data", "pack", "--input", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "p")], "none.jsonl"),
        (["sft", str(tmp_path)], "is a directory"),
    ]  # fmt: skip
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)


@pytest.mark.parametrize(
    "args,message",
    [
        (["data", "pack", "--input", "x.jsonl", "--output", "p", "--seq-len", "0"], "--seq-len: expected a whole number of at least 2, got 0"),
        (["generate", "--model", "m", "--prompt", "x", "--max-new-tokens", "-5"], "--max-new-tokens: expected a whole number of at least 1, got -5"),
        (["generate", "--model", "m", "--prompt", "x", "--top-p", "1.5"], "--top-p: expected a number above 0 and at most 1, got 1.5"),
        (["chat", "--model", "m", "--temperature", "nan"], "--temperature: expected a number at least 0, got nan"),
        (["label", "serve", "--port", "70000"], "--port: expected a whole number from 0 to 65535, got 70000"),
        (["tags", "build", "--input", "x", "--out", "y", "--eps", "zero"], "--eps: expected a number above 0 and at most 2, got 'zero'"),
    ],
)  # fmt: skip
def test_numbers_out_of_range_are_refused_naming_the_option(args, message, capsys):
    """Before any work starts (a row length of 0 made `data pack` loop for ever; a negative token count was a
    traceback from inside generation)."""
    from align.cli import main

    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_sft_preview_marks_trained_tokens():
    out = run(
        [
            "sft",
            "preview",
            "--data",
            str(ROOT / "examples/data/sft_tiny.jsonl"),
            "--tokenizer",
            "bytes",
            "--plain",
            "--limit",
            "1",
        ]
    )
    assert out.returncode == 0, out.stderr
    assert "⟦2+3 = 5.<|im_end|>⟧" in out.stdout and "⟦What" not in out.stdout


def test_tags_commands(tmp_path):
    from align.core.records import write_jsonl_atomic

    rows = [
        {"prompt": f"q{i}", "tags": ["math/arithmetic"] + (["safety/violence"] if i % 7 == 0 else [])}
        for i in range(60)
    ]
    write_jsonl_atomic(tmp_path / "pool.jsonl", rows)
    out = run(
        [
            "tags",
            "sample",
            "--input",
            str(tmp_path / "pool.jsonl"),
            "--output",
            str(tmp_path / "s.jsonl"),
            "--n",
            "10",
            "--method",
            "complexity-first",
        ]
    )
    assert out.returncode == 0, out.stderr
    sampled = [json.loads(l) for l in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(sampled) == 10 and all(r in rows for r in sampled)  # rows unchanged
    out = run(
        [
            "tags",
            "audit",
            str(tmp_path / "s.jsonl"),
            "--against",
            str(tmp_path / "pool.jsonl"),
            "--taxonomy",
            str(ROOT / "configs/taxonomy/demo.yaml"),
            "--out",
            str(tmp_path / "audit"),
        ]
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "audit" / "report.html").exists() and (tmp_path / "audit" / "figures.csv").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("tags:\n  - {id: a, parent: ghost}\n")
    out = run(["tags", "audit", str(tmp_path / "s.jsonl"), "--taxonomy", str(bad), "--out", str(tmp_path / "x")])
    assert out.returncode == 2 and "bad.yaml: entry tags[0] ('a'): unknown parent 'ghost'" in out.stderr


def test_bench_command_writes_rows(tmp_path):
    out = run(["bench", "peak", "--json", str(tmp_path / "b.json")])
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "b.json").read_text())
    assert {r["metric"] for r in rows} == {"matmul_fp32", "matmul_bf16"}
    assert all(set(r) == {"suite", "metric", "ours", "peer", "ratio", "unit"} and r["ours"] > 0 for r in rows)
    out = run(["bench", "nonsense"])
    assert out.returncode != 0 and "unknown suite" in out.stderr
    out = run(["bench", "--device", "tpu:0", "peak"])
    assert out.returncode == 2 and "--device 'tpu:0': not a device" in out.stderr
    if not torch.cuda.is_available():  # refused at once, not after building a model
        out = run(["bench", "--device", "cuda", "sft"])
        assert out.returncode == 2 and "--device cuda: this machine has no CUDA device" in out.stderr


def readme_commands():
    """Every `align …` command in the README's shell blocks, continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("align "):
                out.append(line)
    return out


def test_every_readme_command_parses_and_names_shipped_configs():
    """Each command the README shows is one `align` accepts (a renamed command or option fails here), and each
    config it names under configs/ exists. (Running them is the stage tests' job, with the tiny configs.)"""
    import shlex

    from align.cli import build_parser

    commands = readme_commands()
    assert len(commands) >= 20
    for line in commands:
        argv = shlex.split(line)[1:]
        args, extra = build_parser().parse_known_args(argv)
        assert all("=" in e for e in extra), (line, extra)
        for word in argv:
            if word.startswith("configs/"):
                assert (ROOT / word).exists(), (line, word)


def test_data_inspect_reports_layouts_lengths_and_what_readers_leave_out(tmp_path, capsys):
    """On real rows: HH text with its early-parting rows, a ShareGPT tool-call conversation (its `tools` field is
    listed, not dropped unseen), OpenAI messages."""
    from align.cli import main

    public = ROOT / "tests" / "fixtures" / "public_rows"
    hh = tmp_path / "hh.jsonl"
    hh.write_text(
        (public / "hh_rlhf_harmless_test_sample.jsonl").read_text()
        + (public / "hh_rlhf_harmless_test_divergent.jsonl").read_text()
        + "{not json\n"
    )
    files = [str(hh), str(public / "sharegpt_glaive_toolcall.jsonl"), str(public / "openai_messages_cookbook.jsonl")]
    assert (
        main(["data", "inspect", *files, "--tokenizer", "bytes", "--samples", "1", "--json", str(tmp_path / "r.json")])
        == 0
    )
    out = capsys.readouterr().out
    assert f"{hh}: 9 records" in out and "preference pairs: 4" in out
    assert f"5  multi-turn replies; first: {hh}:5:" in out and "1  not a JSON object" in out
    assert "fields no reader uses" not in out  # glaive's `tools` are read now
    assert "⟦" in out  # the trained tokens of a conversation sample are marked
    hh_report, glaive, openai = json.loads((tmp_path / "r.json").read_text())
    assert hh_report["layouts"] == {"preference: Anthropic HH text": 9}
    assert glaive["roles"] == {"user": 2, "assistant": 4, "tool": 2}
    assert glaive["layouts"] == {"conversation: ShareGPT with tools": 1}
    assert (
        openai["layouts"] == {"conversation: OpenAI messages": 4} and openai["tokens"]["max"] >= openai["tokens"]["p50"]
    )
    odd = tmp_path / "odd.jsonl"  # a fully tied ranking gives no pair; a conversation without a reply trains nothing
    odd.write_text(
        json.dumps({"prompt": "q", "responses": ["a", "b"], "ranking": [1, 1]})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}]})
        + "\n"
    )
    assert main(["data", "inspect", str(odd), "--tokenizer", "bytes"]) == 0
    out = capsys.readouterr().out
    assert (
        f"1  no pair (all tied); first: {odd}:1:" in out and f"1  untrainable; first: {odd}:2: no assistant turn" in out
    )


def test_data_convert_writes_comparison_records_and_reports_what_it_left_out(tmp_path, capsys):
    from align.cli import main
    from rm.data import load_pairs

    public = ROOT / "tests" / "fixtures" / "public_rows"
    files = [public / n for n in ("nectar_row0.jsonl", "ultrafeedback_readme_record.jsonl", "shp_row0.jsonl")]
    out = tmp_path / "cmp.jsonl"
    assert main(["data", "convert", *map(str, files), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 records (1 nectar) -> 1 comparison records" in printed
    assert "left out 1 (no comparison)" in printed and "fewer than two rated completions" in printed
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len(r["responses"]) for r in records] == [7, 2] and records[0]["ranking"] == [1, 2, 3, 4, 5, 6, 7]
    assert records[0]["meta"]["models"][0] == "gpt-3.5-turbo"
    pairs, _ = load_pairs(str(out))  # the reward model reads them as they are
    assert len(pairs) == 22
    assert main(["data", "convert", str(files[1]), "--out", str(out), "--on-error", "raise"]) != 0
    assert "fewer than two rated completions" in capsys.readouterr().err


def test_profile_table_names_where_the_time_went():
    from align.bench import profile_table

    a = torch.randn(256, 256)
    table = profile_table(lambda: a @ a, "a matmul", rows=5)
    assert table.startswith("[profile] a matmul") and "aten::mm" in table
