"""`align eval tools`: tool use in the Qwen report's terms.

Each item is a question, the tools on offer, and the call it needs (or none):
`{"question" | "messages", "tools": [OpenAI functions], "expected": {"name", "arguments"} | null}`. The model's
first step (ReAct, stopped at `Observation:`, greedy) is read with `align/core/react.py`, and:

- **tool selection accuracy**: of the items that need a tool, the share where the model called that tool;
- **Action Input ROUGE-L**: of the items that need a tool, the mean ROUGE-L F-measure between the model's Action
  Input and the expected arguments (both as compact JSON; 0 when it called no tool);
- **false positive rate**: of the items that need no tool, the share where the model called one anyway.

Writes `results.jsonl` (resumable), `summary.json` (each figure with a 95% Wilson interval where it is a rate) and
`report.html`.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from align.core.react import parse_react
from align.core.records import DataError, as_messages, iter_records
from align.eval.harness import html_page, load_results, wilson
from base_model.atomic import write_json_atomic, write_text_atomic


def read_tool_items(path: str) -> list[dict]:
    items = []
    for where, row in iter_records(path):
        if "messages" in row:
            messages = as_messages(row["messages"], where, "messages")
        elif isinstance(row.get("question"), str):
            messages = [{"role": "user", "content": row["question"]}]
        else:
            raise DataError(f"{where}: expected 'question' or 'messages'")
        tools = row.get("tools")
        if not isinstance(tools, list) or not tools:
            raise DataError(f"{where}: 'tools' must be a non-empty list of functions")
        expected = row.get("expected")
        if expected is not None and (not isinstance(expected, dict) or not isinstance(expected.get("name"), str)):
            raise DataError(f"{where}: 'expected' must be null or {{'name', 'arguments'}}")
        items.append({"id": str(row.get("id", len(items))), "messages": messages, "tools": tools,
                      "expected": expected})  # fmt: skip
    if not items:
        raise DataError(f"{path}: no items")
    return items


def compact(value) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def score_step(item: dict, text: str, scorer) -> dict:
    step = parse_react(text, item["tools"])
    called = step.action  # a call the model wrote, even one to an unknown tool or with bad arguments
    expected = item["expected"]
    row = {"called": called, "arguments": step.arguments, "error": step.error}
    if expected is None:
        row["false_positive"] = called is not None
    else:
        row["selected"] = called == expected["name"]
        got = compact(step.arguments) if step.arguments is not None and called else ""
        row["input_rouge_l"] = (
            scorer.score(compact(expected.get("arguments", {})), got)["rougeL"].fmeasure if got else 0.0
        )
    return row


def evaluate_tools(items: list[dict], out: str | Path, answer, batch_size: int = 16, log=print) -> dict:
    """`answer(list of (messages, tools)) -> step texts` is the model (see `align.cli.evaluate`)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = load_results(results)
    todo = [it for it in items if it["id"] not in done]
    log(f"[eval] tools: {len(items)} items, {len(todo)} to answer")
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        texts = answer([(it["messages"], it["tools"]) for it in chunk])
        with results.open("a", encoding="utf-8") as f:
            for it, text in zip(chunk, texts):
                row = {"id": it["id"], "question": it["messages"][-1]["content"], "expected": it["expected"],
                       "response": text, **score_step(it, text, scorer)}  # fmt: skip
                done[it["id"]] = row
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    rows = [done[it["id"]] for it in items]
    need = [r for r in rows if r["expected"] is not None]
    none = [r for r in rows if r["expected"] is None]
    selected = sum(r["selected"] for r in need)
    false_pos = sum(r["false_positive"] for r in none)
    summary = {
        "items": len(rows),
        "need_a_tool": len(need),
        "need_no_tool": len(none),
        "tool_selection_accuracy": selected / len(need) if need else None,
        "tool_selection_ci95": wilson(selected, len(need)) if need else None,
        "action_input_rouge_l": sum(r["input_rouge_l"] for r in need) / len(need) if need else None,
        "false_positive_rate": false_pos / len(none) if none else None,
        "false_positive_ci95": wilson(false_pos, len(none)) if none else None,
        "unparsed_steps": sum(1 for r in rows if r["error"]),
    }
    write_json_atomic(out / "summary.json", summary)
    write_text_atomic(out / "report.html", report(summary, rows))
    log(f"[eval] tools: {json.dumps(summary)}")
    return summary


def report(summary: dict, rows: list[dict]) -> str:
    body = "".join(
        f"<tr><td>{html.escape(r['id'])}</td><td>{html.escape(r['question'][:200])}</td>"
        f"<td>{html.escape(json.dumps(r['expected'], ensure_ascii=False))}</td><td>{html.escape(str(r['called']))}</td>"
        f"<td><pre>{html.escape(r['response'][:600])}</pre></td></tr>"
        for r in rows
    )
    return html_page("Tool use", summary, ["id", "question", "expected", "called", "step"], body)


def step_answerer(engine_answerer):
    """Steps from a checkpoint: each item rendered with its tools as training renders them, one greedy step
    stopped at `Observation:` (the harness's engine, with stop strings)."""
    from align.core.chatml import render

    tok = engine_answerer.tokenizer
    engine = engine_answerer.engine
    if hasattr(engine, "detokenize"):
        engine.detokenize = tok.decode

    def answer(batch):
        from base_model.generate import SamplingParams

        prompts = [render(m, tok, add_generation_prompt=True, tools=t) for m, t in batch]
        params = SamplingParams(max_new_tokens=engine_answerer.max_new_tokens, temperature=0.0,
                                stop_token_ids=(tok.im_end_id, tok.eod_id), stop_strings=("Observation:",),
                                vocab_limit=len(tok))  # fmt: skip
        out = engine.generate(prompts, params)
        texts = [tok.decode(r.token_ids) for r in out]
        return [t.split("Observation:")[0].replace("<|im_end|>", "").replace("<|endoftext|>", "") for t in texts]

    return answer


def endpoint_step_answerer(url: str, tokenizer, model: str = "default", max_tokens: int = 256):
    """Steps from an OpenAI-compatible `/v1/completions` (the same ChatML text as a checkpoint gets)."""
    import httpx

    from align.core.chatml import render

    def answer(batch):
        texts = []
        for messages, tools in batch:
            prompt = tokenizer.decode(render(messages, tokenizer, add_generation_prompt=True, tools=tools))
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                    "stop": ["Observation:", "<|im_end|>", "<|endoftext|>"]}  # fmt: skip
            r = httpx.post(url.rstrip("/") + "/completions", json=body, timeout=120)
            if r.status_code != 200:
                raise DataError(f"{url}: HTTP {r.status_code}: {r.text[:200]}")
            texts.append(r.json()["choices"][0]["text"].split("Observation:")[0])
        return texts

    return answer
