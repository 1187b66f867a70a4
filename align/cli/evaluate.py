"""`align eval BENCH`: argument parsing only; the handler calls `align.eval.harness.evaluate`."""

from __future__ import annotations

import argparse
from pathlib import Path

from align.cli.numbers import amount, count


def cmd_eval(args: argparse.Namespace) -> None:
    from align.eval.harness import evaluate

    if args.bench == "tools":
        return cmd_eval_tools(args)
    if args.bench == "code":
        return cmd_eval_code(args)
    evaluate(
        args.bench,
        str(args.data) if args.data else None,
        args.out,
        model=str(args.model) if args.model else None,
        endpoint=args.endpoint,
        endpoint_model=args.endpoint_model,
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        limit=args.limit,
        reference_answers=args.reference_answers,
        timeout_s=args.timeout,
        engine=args.engine,
        tensor_parallel_size=args.tensor_parallel_size,
    )


def cmd_eval_tools(args: argparse.Namespace) -> None:
    from align.core.records import DataError
    from align.eval.harness import EngineAnswerer
    from align.eval.tool_use import endpoint_step_answerer, evaluate_tools, read_tool_items, step_answerer

    if args.data is None:
        raise DataError("align eval tools needs --data: rows of question, tools and expected call")
    if (args.model is None) == (args.endpoint is None):
        raise DataError("give exactly one of --model DIR and --endpoint URL")
    items = read_tool_items(str(args.data))[: args.limit]
    if args.model is not None:
        answer = step_answerer(EngineAnswerer.native(str(args.model), args.max_new_tokens, 1))
    else:
        from base_model import QwenTokenizer

        if args.tokenizer is None:
            raise DataError("--endpoint needs --tokenizer to write the prompt")
        answer = endpoint_step_answerer(args.endpoint, QwenTokenizer.load(args.tokenizer), args.endpoint_model,
                                        args.max_new_tokens)  # fmt: skip
    evaluate_tools(items, args.out, answer, args.batch_size)


def cmd_eval_code(args: argparse.Namespace) -> None:
    from align.cli.tools import backend_from_args
    from align.core.records import DataError
    from align.tools.code_eval import evaluate_code, read_code_tasks

    if args.data is None:
        raise DataError("align eval code needs --data: rows of question, files, answer and expected files")
    backend = backend_from_args(args, args.max_new_tokens)
    evaluate_code(read_code_tasks(str(args.data))[: args.limit], args.out, backend, timeout_s=args.timeout * 3)


def register(sub) -> None:
    from align.eval.harness import BENCHMARKS

    p = sub.add_parser(
        "eval", help="benchmarks (gsm8k | math | humaneval | mbpp) and tool use (tools) on a checkpoint or an endpoint"
    )
    p.add_argument("bench", choices=(*BENCHMARKS, "tools", "code"))
    p.add_argument(
        "--data", type=Path, default=None, help="the benchmark's rows, JSONL in its layout (HumanEval: the package's)"
    )
    p.add_argument("--out", type=Path, required=True, help="results.jsonl, summary.json, report.html (resumable)")
    p.add_argument("--model", type=Path, default=None, help="a checkpoint folder (our native engine)")
    p.add_argument(
        "--engine",
        choices=("native", "vllm"),
        default="native",
        help="--model: our batched sampler, or vLLM in this process (needs CUDA and the [gpu] extra)",
    )
    p.add_argument("--tensor-parallel-size", type=count(1), default=1, help="--engine vllm: GPUs per model")
    p.add_argument("--endpoint", default=None, help="an OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    p.add_argument("--endpoint-model", default="default", help="the model name sent to the endpoint")
    p.add_argument("--tokenizer", default=None, help="tools with --endpoint: the model's tokenizer")
    p.add_argument("--samples", type=count(1), default=1, help="answers per item (more than 1: sampled, pass@k)")
    p.add_argument("--max-new-tokens", type=count(1), default=512)
    p.add_argument("--batch-size", type=count(1), default=16)
    p.add_argument("--limit", type=count(1), default=None, help="the first N items only")
    p.add_argument("--timeout", type=amount(above=0), default=10.0, help="CPU seconds per program (code benchmarks)")
    p.add_argument(
        "--reference-answers",
        action="store_true",
        help="score the benchmark's own solutions (a check of the harness: all should be right)",
    )
    p.set_defaults(func=cmd_eval)
