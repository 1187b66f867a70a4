"""`align serve | agent`: argument parsing only; the handlers call `align.serve` and `align.tools.agent`."""

from __future__ import annotations

import argparse
from pathlib import Path

from align.cli.numbers import amount, count


def cmd_serve(args: argparse.Namespace) -> None:
    from align.serve import serve

    serve(str(args.model), args.host, args.port, args.name)


def backend_from_args(args: argparse.Namespace, max_tokens: int = 256):
    """A text backend for the agent loop (`align.tools.agent`) from `--model DIR` or `--endpoint URL --tokenizer`."""
    from align.core.records import DataError
    from align.tools.agent import EndpointBackend, LocalBackend

    if (args.model is None) == (args.endpoint is None):
        raise DataError("give exactly one of --model DIR and --endpoint URL")
    temperature = getattr(args, "temperature", 0.0)
    if args.model is not None:
        from align.serve import LocalModel

        return LocalBackend(LocalModel.load(str(args.model)), temperature, max_tokens)
    from base_model import QwenTokenizer

    if args.tokenizer is None:
        raise DataError("--endpoint needs --tokenizer (a checkpoint folder or ranks file) to write the prompt")
    return EndpointBackend(args.endpoint, QwenTokenizer.load(args.tokenizer), args.endpoint_model, temperature,
                           max_tokens)  # fmt: skip


def cmd_agent(args: argparse.Namespace) -> None:
    import json
    import tempfile

    from align.core.records import DataError, iter_records
    from align.tools.agent import Agent, run_questions, score_runs
    from align.tools.builtin import builtin_tools
    from base_model.atomic import write_json_atomic

    backend = backend_from_args(args, args.max_tokens)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="align-agent-"))
    tools = builtin_tools([t for t in args.tools.split(",") if t], workdir, args.tool_timeout)
    agent = Agent(backend, tools, args.max_steps, args.system)
    if args.question is not None:
        questions = [{"question": args.question}]
    else:
        questions = []
        for where, row in iter_records(args.questions):
            q = row.get("question") or row.get("prompt")
            if not isinstance(q, str):
                raise DataError(f"{where}: expected a 'question' (or 'prompt') string")
            questions.append({"question": q, "answer": row.get("answer"), **({"expected": row["expected"]}
                                                                             if "expected" in row else {})})  # fmt: skip
    try:
        runs = run_questions(agent, questions, args.transcript)
    finally:
        agent.close()
    if any(q.get("answer") is not None for q in questions):
        scores = score_runs(questions, runs)
        lo, hi = scores["accuracy_ci95"]
        print(f"[agent] accuracy {scores['accuracy']:.3f} (95% CI {lo:.3f}–{hi:.3f}) on {scores['with_answer']} "
              f"questions with an answer; {scores['tool_calls']} tool calls, {scores['failed_calls']} failed; "
              f"stopped by {scores['stopped_by']}")  # fmt: skip
        if args.summary:
            write_json_atomic(args.summary, {k: v for k, v in scores.items() if k != "correct"}, indent=1)
    if args.question is not None:
        run = runs[0]
        for c in run.tool_calls:
            print(
                f"Action: {c['name']} {json.dumps(c['arguments'], ensure_ascii=False)}\nObservation: {c['observation']}"
            )
        print(f"Final Answer: {run.answer}" if run.answer is not None else f"(no answer: {run.stopped_by})")
    print(f"[agent] files in {workdir}" + (f"; transcript: {args.transcript}" if args.transcript else ""))


def register(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible server (chat with tools, completions, streaming)")
    p.add_argument("--model", type=Path, required=True, help="a checkpoint folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=count(0, 65535), default=8000)
    p.add_argument("--name", default=None, help="the model name it answers to (default: the folder's name)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("agent", help="the ReAct tool loop: calculator, python (sandboxed), files")
    p.add_argument("--model", type=Path, default=None, help="a checkpoint folder (our sampler)")
    p.add_argument("--endpoint", default=None, help="an OpenAI-compatible base URL (its /completions is used)")
    p.add_argument("--endpoint-model", default="default")
    p.add_argument("--tokenizer", default=None, help="--endpoint: the model's tokenizer (checkpoint or ranks file)")
    p.add_argument("--tools", default="calculator,python,files", help="comma-separated: calculator, python, files")
    p.add_argument("--question", default=None, help="one question, answered on the terminal")
    p.add_argument(
        "--questions",
        type=Path,
        default=None,
        help="JSONL of {question, answer?, expected?}: run them all (scored where answers are given)",
    )
    p.add_argument("--summary", type=Path, default=None, help="--questions: write the scores here as JSON")
    p.add_argument("--transcript", type=Path, default=None, help="append each run as an SFT-ready JSON line")
    p.add_argument("--workdir", type=Path, default=None, help="the files and python tools' directory")
    p.add_argument("--max-steps", type=count(1), default=8)
    p.add_argument("--tool-timeout", type=amount(above=0), default=30.0, help="seconds per python cell")
    p.add_argument("--max-tokens", type=count(1), default=256, help="per step")
    p.add_argument("--temperature", type=amount(minimum=0), default=0.0)
    p.add_argument("--system", default=None, help="a system message")
    p.set_defaults(func=cmd_agent)
