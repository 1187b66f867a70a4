"""The ReAct tool loop: `align agent` and `Agent(...).run(question)`.

Each step renders the conversation as training does (ChatML, the tools described in the system turn by Qwen's ReAct
instruction, this turn's earlier steps and observations in the assistant turn), asks the model to continue it with
generation stopped at `Observation:`, and reads the step (`align/core/react.py`): a tool call runs the tool (with
its timeout) and its result, or the problem with the call (unknown tool, invalid JSON, a tool error, a timeout),
becomes the next observation; a final answer ends the run; `max_steps` bounds it.

The model is a local checkpoint (our sampler) or any OpenAI-compatible `/v1/completions` endpoint (`align serve`,
vLLM's server): both continue the same ChatML text. Every run is a transcript in OpenAI's message form (assistant
`tool_calls`, `tool` results, the final answer) with the tools, one JSON line each: SFT data as it is, with the
observations masked by the SFT reader.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from align.core.chatml import render
from align.core.react import parse_react, text_before_action
from align.core.records import read_appended_rows
from align.tools.builtin import Tool, ToolError

STOP = "Observation:"


class ContextFull(RuntimeError):
    """The conversation has reached the model's context: the run ends (`stopped_by: context_full`)."""


class LocalBackend:
    """Our sampler on a checkpoint (`align.serve.LocalModel`)."""

    def __init__(self, llm, temperature: float = 0.0, max_tokens: int = 256) -> None:
        self.llm, self.temperature, self.max_tokens = llm, temperature, max_tokens
        self.tokenizer = llm.tokenizer

    def continue_text(
        self, prompt_ids: list[int], stop: tuple[str, ...] = (STOP,), max_tokens: int | None = None
    ) -> str:
        room = self.llm.model.config.max_position_embeddings - len(prompt_ids)
        if room < 1:
            raise ContextFull(f"{len(prompt_ids)} tokens fill the model's context")
        tokens = min(max_tokens or self.max_tokens, room)
        return self.llm.complete(prompt_ids, tokens, self.temperature, 1.0, stop=tuple(stop)).text


class EndpointBackend:
    """An OpenAI-compatible `/v1/completions`: the ChatML text goes as the prompt (its special tokens as text)."""

    def __init__(self, url: str, tokenizer, model: str = "default", temperature: float = 0.0, max_tokens: int = 256,
                 timeout_s: float = 120.0) -> None:  # fmt: skip
        self.url, self.tokenizer, self.model = url.rstrip("/") + "/completions", tokenizer, model
        self.temperature, self.max_tokens, self.timeout_s = temperature, max_tokens, timeout_s

    def continue_text(
        self, prompt_ids: list[int], stop: tuple[str, ...] = (STOP,), max_tokens: int | None = None
    ) -> str:
        import httpx

        body = {"model": self.model, "prompt": self.tokenizer.decode(prompt_ids), "max_tokens": max_tokens or self.max_tokens,
                "temperature": self.temperature, "stop": [*stop, "<|im_end|>", "<|endoftext|>"]}  # fmt: skip
        r = httpx.post(self.url, json=body, timeout=self.timeout_s)
        if r.status_code != 200:
            raise RuntimeError(f"{self.url}: HTTP {r.status_code}: {r.text[:300]}")
        text = r.json()["choices"][0]["text"]
        for s in stop:  # a server that returns the stop string (or text past it) is cut here
            text = text.split(s)[0]
        return text


@dataclass
class AgentRun:
    question: str
    answer: str | None
    stopped_by: str  # final_answer | max_steps | no_answer | context_full
    steps: int
    tool_calls: list[dict] = field(default_factory=list)  # {"name", "arguments", "observation", "error"}
    messages: list[dict] = field(default_factory=list)  # the conversation in OpenAI's form (an SFT example)


_INPUT = re.compile(r"^[ \t]*action input[ \t]*[:：][ \t]*(.*)\Z", re.I | re.M | re.S)


def arguments_as_written(text: str, arguments: dict) -> str:
    """The call's arguments as the model wrote them (so the transcript renders its exact text), when they are that
    JSON object; otherwise the object as JSON."""
    m = _INPUT.search(text)
    if m:
        raw = m.group(1).strip()
        try:
            if json.loads(raw) == arguments:
                return raw
        except json.JSONDecodeError:
            pass
    return json.dumps(arguments, ensure_ascii=False)


def text_completer(backend):
    """`complete(prompt_text, stops, max_tokens) -> text`, or None when the prompt fills the model's context (for
    Self-Instruct's raw prompts)."""

    def complete(prompt: str, stops, max_tokens: int) -> str | None:
        try:
            return backend.continue_text(backend.tokenizer.encode(prompt), tuple(stops), max_tokens)
        except ContextFull:
            return None

    return complete


def run_tool(tool: Tool, arguments: dict) -> tuple[str, bool]:
    """(observation, ok): the tool's result, or its error, or a timeout, as text."""
    result: dict = {}

    def target() -> None:
        try:
            result["out"] = tool.run(arguments)
        except ToolError as e:
            result["error"] = f"Error: {e}"
        except Exception as e:  # a tool's own failure is the model's observation, not the loop's end
            result["error"] = f"Error: {type(e).__name__}: {e}"

    thread = threading.Thread(target=target, daemon=True, name=f"tool {tool.name}")
    thread.start()
    thread.join(tool.timeout_s)
    if thread.is_alive():
        return f"Error: the tool {tool.name} did not answer within {tool.timeout_s:.0f} s", False
    if "error" in result:
        return result["error"], False
    return str(result["out"]), True


class Agent:
    def __init__(self, backend, tools: Sequence[Tool], max_steps: int = 8, system: str | None = None) -> None:
        self.backend, self.tools, self.max_steps, self.system = backend, list(tools), max_steps, system
        self.by_name = {t.name: t for t in self.tools}
        self.specs = [t.spec() for t in self.tools]

    def run(self, question: str) -> AgentRun:
        tok = self.backend.tokenizer
        head = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": question}
        ]
        prompt = render(head, tok, add_generation_prompt=True, tools=self.specs)
        scratch = ""  # this assistant turn so far: steps and observations, as training renders them
        messages = list(head)
        calls: list[dict] = []
        for step in range(1, self.max_steps + 1):
            try:
                text = self.backend.continue_text(prompt + tok.encode(scratch))
            except ContextFull:
                return AgentRun(question, None, "context_full", step - 1, calls, messages)
            parsed = parse_react(text, self.specs)
            if parsed.action is None and parsed.error is None:
                answer = parsed.final_answer
                messages.append({"role": "assistant", "content": text.strip()})  # the whole step: Final Answer too
                stopped = "final_answer" if "final answer" in text.lower() else "no_answer"
                return AgentRun(question, answer, stopped, step, calls, messages)
            if parsed.error is not None:
                observation, ok = parsed.error, False
                arguments = parsed.arguments or {}
            else:
                arguments = parsed.arguments or {}
                observation, ok = run_tool(self.by_name[parsed.action], arguments)
            if parsed.error is not None:  # kept as written (no call to describe), so the transcript renders it back
                messages.append({"role": "assistant", "content": text.rstrip("\n")})
                messages.append({"role": "tool", "content": observation})
            else:
                call = {"id": f"call_{step}", "type": "function",
                        "function": {"name": parsed.action, "arguments": arguments_as_written(text, arguments)}}  # fmt: skip
                messages.append(
                    {"role": "assistant", "content": text_before_action(text) or None, "tool_calls": [call]}
                )
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": observation})
            calls.append({"name": parsed.action, "arguments": arguments, "observation": observation, "ok": ok,
                          "error": parsed.error})  # fmt: skip
            scratch += text.rstrip("\n") + f"\n{STOP} {observation}\n"
        return AgentRun(question, None, "max_steps", self.max_steps, calls, messages)

    def close(self) -> None:
        for t in self.tools:
            t.close()


def transcript_row(run: AgentRun, tools: Sequence[Tool]) -> dict:
    """One JSON line: the messages and tools (SFT-ready), with the run's outcome beside them."""
    return {"messages": run.messages, "tools": [t.spec() for t in tools], "question": run.question,
            "answer": run.answer, "stopped_by": run.stopped_by, "steps": run.steps, "tool_calls": run.tool_calls}  # fmt: skip


def run_questions(agent: Agent, questions: list[dict], transcript: Path | None, log=print) -> list[AgentRun]:
    """Each `{"question", "answer"?}`; runs already in the transcript (same question) are not run again."""
    done: dict[str, dict] = {}
    if transcript is not None and transcript.exists():
        for row in read_appended_rows(transcript, repair=True):
            done[row["question"]] = row
    runs = []
    for q in questions:
        if q["question"] in done:
            row = done[q["question"]]
            runs.append(AgentRun(row["question"], row["answer"], row["stopped_by"], row["steps"], row["tool_calls"],
                                 row["messages"]))  # fmt: skip
            continue
        run = agent.run(q["question"])
        runs.append(run)
        if transcript is not None:
            transcript.parent.mkdir(parents=True, exist_ok=True)
            with transcript.open("a", encoding="utf-8") as f:
                f.write(json.dumps(transcript_row(run, agent.tools), ensure_ascii=False) + "\n")
        log(f"[agent] {q['question'][:60]!r}: {run.stopped_by} after {run.steps} step(s): {str(run.answer)[:80]!r}")
    return runs


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def answer_matches(expected: str, answer: str | None) -> bool:
    """A number is matched by the final answer's last number (`347+586 = 933` for 933); any other answer by
    appearing in the final answer, case aside."""
    if answer is None:
        return False
    expected = str(expected).strip()
    if _NUMBER.fullmatch(expected):
        numbers = _NUMBER.findall(answer.replace(",", ""))
        return bool(numbers) and float(numbers[-1]) == float(expected)
    return expected.lower() in answer.lower()


def score_runs(questions: list[dict], runs: list[AgentRun]) -> dict:
    """How the runs did, for the questions that give an `answer` (accuracy, with a 95% Wilson interval) and an
    `expected` call (`{"name"}`, or null for a question that needs no tool): whether the first call was the
    expected tool, and how often a tool was called when none was needed."""
    from align.eval.harness import wilson

    scored = [(q, r) for q, r in zip(questions, runs) if q.get("answer") is not None]
    right = [answer_matches(q["answer"], r.answer) for q, r in scored]
    need = [(q, r) for q, r in zip(questions, runs) if q.get("expected")]
    none = [(q, r) for q, r in zip(questions, runs) if "expected" in q and q["expected"] is None]
    selected = sum(bool(r.tool_calls) and r.tool_calls[0]["name"] == q["expected"]["name"] for q, r in need)
    false_pos = sum(bool(r.tool_calls) for _, r in none)
    stopped: dict[str, int] = {}
    for r in runs:
        stopped[r.stopped_by] = stopped.get(r.stopped_by, 0) + 1
    by_need = {}
    for label, group in (("need_tool", need), ("no_tool", none)):
        hits = [answer_matches(q["answer"], r.answer) for q, r in group if q.get("answer") is not None]
        if hits:
            by_need[f"accuracy_{label}"] = sum(hits) / len(hits)
            by_need[f"accuracy_{label}_ci95"] = wilson(sum(hits), len(hits))
    return {
        "questions": len(runs),
        "with_answer": len(scored),
        "accuracy": sum(right) / len(scored) if scored else None,
        "accuracy_ci95": wilson(sum(right), len(scored)) if scored else None,
        **by_need,  # split by whether a tool is needed (when the questions say)
        "correct": right,
        "tool_selection": selected / len(need) if need else None,
        "tool_selection_ci95": wilson(selected, len(need)) if need else None,
        "false_positive_rate": false_pos / len(none) if none else None,
        "tool_calls": sum(len(r.tool_calls) for r in runs),
        "failed_calls": sum(not c.get("ok", True) for r in runs for c in r.tool_calls),
        "stopped_by": stopped,
    }
