"""SFT data: conversations in, `input_ids` and `labels` out.

Conversations come as OpenAI `messages` (`{"role", "content"}`) or ShareGPT `conversations` (`{"from", "value"}`,
with an optional top-level `system`). They are rendered through `align.core.chatml`; labels are -100 wherever the
loss must not look.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from align.core.chatml import ChatFormatError, render_turns
from align.core.losses import IGNORE_INDEX
from align.core.react import ToolFormatError, react_instruction
from align.core.records import DataError, iter_records
from base_model import QwenTokenizer

MaskMode = Literal["assistant", "qwen", "none"]
Truncation = Literal["drop_oldest", "slice", "skip"]

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "function": "tool",
    "tool": "tool",
}
OPENAI_ROLES = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
}


class SkipExample(Exception):
    """An example that cannot be trained on; counted and reported, never dropped silently."""


def to_messages(record: dict, where: str) -> list[dict]:
    """A record in OpenAI, ShareGPT or Alpaca layout → ChatML messages. Errors name the location and the field.

    OpenAI `tool_calls` are kept; a ShareGPT `function_call` turn (JSON text `{"name", "arguments"}`) becomes an
    assistant message with that call, and an `observation` turn a tool result. Alpaca's `input` follows its
    `instruction` on a new line (as LLaMA-Factory joins them), after any `history` rounds."""
    if "messages" in record:
        key, role_key, text_key, roles = "messages", "role", "content", OPENAI_ROLES
    elif "conversations" in record:
        key, role_key, text_key, roles = "conversations", "from", "value", SHAREGPT_ROLES
    elif "instruction" in record and "output" in record:
        return _alpaca_messages(record, where)
    else:
        raise DataError(
            f"{where}: no 'messages', 'conversations' or 'instruction'/'output' field "
            f"(has: {', '.join(record) or 'nothing'})"
        )
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field '{key}' must be a non-empty list")
    messages = []
    if isinstance(record.get("system"), str):
        messages.append({"role": "system", "content": record["system"]})
    for i, turn in enumerate(turns):
        field_name = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: field '{field_name}' must be an object")
        role = turn.get(role_key)
        if role not in roles:
            raise DataError(
                f"{where}: field '{field_name}.{role_key}': unknown role {role!r} "
                f"(expected one of {', '.join(sorted(roles))})"
            )
        content = turn.get(text_key)
        calls = turn.get("tool_calls") if roles[role] == "assistant" else None
        if role == "function_call":
            content, calls = "", [_sharegpt_call(content, f"{where}: field '{field_name}.{text_key}'")]
        if not isinstance(content, str) and not (calls and content is None):
            raise DataError(f"{where}: field '{field_name}.{text_key}' must be a string")
        if roles[role] == "system" and messages:
            raise DataError(f"{where}: field '{field_name}': a system message may only come first")
        if roles[role] == "tool" and (not messages or messages[-1]["role"] not in ("assistant", "tool")):
            raise DataError(f"{where}: field '{field_name}': a tool result must follow an assistant turn")
        message = {"role": roles[role], "content": content or ""}
        if calls:
            if not isinstance(calls, list):
                raise DataError(f"{where}: field '{field_name}.tool_calls' must be a list")
            message["tool_calls"] = calls
        messages.append(message)
    return messages


def _sharegpt_call(value: object, where: str) -> dict:
    try:
        call = json.loads(value) if isinstance(value, str) else None
    except json.JSONDecodeError as e:
        raise DataError(f'{where}: a function_call must be JSON {{"name", "arguments"}} ({e})') from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise DataError(f'{where}: a function_call must be JSON {{"name", "arguments"}}, got {value!r:.80}')
    return {"type": "function", "function": {"name": call["name"], "arguments": call.get("arguments", {})}}


def _alpaca_messages(record: dict, where: str) -> list[dict]:
    for name in ("instruction", "input", "output", "system"):
        if not isinstance(record.get(name, ""), str):
            raise DataError(f"{where}: field '{name}' must be a string")
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    history = record.get("history") or []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"{where}: field 'history[{i}]' must be a [query, response] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    query = record["instruction"] + ("\n" + record["input"] if record.get("input") else "")
    return messages + [{"role": "user", "content": query}, {"role": "assistant", "content": record["output"]}]


def record_tools(record: dict, where: str) -> list[dict] | None:
    """The tool definitions of a record (`tools`, a list or JSON text of one, or OpenAI's older `functions`)."""
    tools = record.get("tools", record.get("functions"))
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: field 'tools' is not valid JSON ({e})") from None
    if not isinstance(tools, list):
        raise DataError(f"{where}: field 'tools' must be a list of function descriptions")
    try:
        react_instruction(tools)
    except ToolFormatError as e:
        raise DataError(f"{where}: field {e}") from None
    return tools


def check_trainable(messages: list[dict], where: str) -> None:
    assistants = [m for m in messages if m["role"] == "assistant"]
    if not assistants:
        raise SkipExample(f"{where}: no assistant turn")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise SkipExample(f"{where}: message {i} is an empty assistant turn")


def _labels(ids: list[int], turns, mask_mode: MaskMode) -> list[int]:
    if mask_mode == "none":
        return list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    for t in turns:
        if mask_mode == "qwen":
            # Qwen's finetune.py keeps <|im_start|>, and <|im_end|> + newline, of every turn
            labels[t.start] = ids[t.start]
            labels[t.content_end : t.end] = ids[t.content_end : t.end]
            if t.role == "assistant":
                labels[t.content_start : t.content_end] = ids[t.content_start : t.content_end]
        elif t.role == "assistant":
            labels[t.content_start : t.content_end + 1] = ids[t.content_start : t.content_end + 1]  # + <|im_end|>
        for a, b in t.observation_spans:
            labels[a:b] = [IGNORE_INDEX] * (b - a)
    return labels


def _drop_oldest_round(messages: list[dict]) -> list[dict] | None:
    """Drop the first user turn and everything up to the next user turn; None if only one round is left."""
    head = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(head) :]
    users = [i for i, m in enumerate(rest) if m["role"] == "user"]
    if len(users) < 2:
        return None
    return head + rest[users[1] :]


def build_example(
    messages: Sequence[dict],
    tokenizer: QwenTokenizer,
    max_len: int,
    mask_mode: MaskMode = "assistant",
    truncation: Truncation = "drop_oldest",
    tools: Sequence[dict] | None = None,
) -> dict[str, list[int]]:
    """ChatML `input_ids` and aligned `labels` (no padding), with the chat template's tokenisation (Qwen's
    separate encoding under mask_mode `qwen`); `tools` are described in the system turn as Qwen's ReAct prompt.

    mask_mode: `assistant` trains on assistant content and its closing `<|im_end|>`; `qwen` reproduces the labels
    of Qwen's finetune.py; `none` trains on everything. Tool results and ReAct observations inside assistant turns
    are never trained on. truncation: `drop_oldest` removes whole rounds from the front (keeping the system prompt) until
    the conversation fits; `slice` cuts the tail at max_len (what finetune.py does); `skip` refuses it. An example
    that cannot fit raises SkipExample.
    """
    messages = list(messages)
    if mask_mode == "qwen" and messages and messages[0]["role"] == "system":
        # finetune.py drops a first non-user message after the system prompt
        if len(messages) > 1 and messages[1]["role"] != "user":
            messages = messages[:1] + messages[2:]
    elif mask_mode == "qwen" and messages and messages[0]["role"] != "user":
        messages = messages[1:]
    while True:
        encoding = "qwen" if mask_mode == "qwen" else "template"
        ids, turns = render_turns(messages, tokenizer, split_react=True, tools=tools, encoding=encoding)
        if len(ids) <= max_len:
            break
        if truncation == "slice":
            labels = _labels(ids, turns, mask_mode)
            return {"input_ids": ids[:max_len], "labels": labels[:max_len]}
        shorter = _drop_oldest_round(messages) if truncation == "drop_oldest" else None
        if shorter is None:
            raise SkipExample(f"conversation of {len(ids)} tokens does not fit max_len={max_len}")
        messages = shorter
    return {"input_ids": ids, "labels": _labels(ids, turns, mask_mode)}


@dataclass
class LoadReport:
    examples: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_problems: list[str] = field(default_factory=list)

    def note(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        if len(self.first_problems) < 10:
            self.first_problems.append(message)

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.examples} examples"
        reasons = ", ".join(f"{n} {r}" for r, n in self.skipped.most_common())
        return f"{self.examples} examples; skipped {sum(self.skipped.values())} ({reasons})"


def load_examples(
    path: str,
    tokenizer: QwenTokenizer,
    max_len: int,
    mask_mode: MaskMode = "assistant",
    truncation: Truncation = "drop_oldest",
    on_error: Literal["raise", "skip"] = "raise",
) -> tuple[list[dict[str, list[int]]], LoadReport]:
    """Read and tokenise a conversation file. Malformed records raise (or, with on_error=skip, are counted);
    conversations without a trainable turn or too long to fit are always counted and reported, never dropped
    silently."""
    report = LoadReport()
    examples = []
    on_bad_line = (lambda msg: report.note("malformed", msg)) if on_error == "skip" else None
    for where, record in iter_records(path, on_bad_line):
        try:
            messages, tools = to_messages(record, where), record_tools(record, where)
            check_trainable(messages, where)
            try:
                examples.append(build_example(messages, tokenizer, max_len, mask_mode, truncation, tools))
            except ChatFormatError as e:
                raise DataError(f"{where}: {e}") from None
        except DataError as e:
            if on_error == "raise":
                raise
            report.note("malformed", str(e))
        except SkipExample as e:
            reason = "too long" if "does not fit" in str(e) else "untrainable"
            report.note(reason, f"{where}: {e}" if not str(e).startswith(str(where)) else str(e))
    report.examples = len(examples)
    if not examples:
        raise DataError(f"{path}: no usable examples ({report.summary()}; first: {report.first_problems[:3]})")
    return examples, report


# ------------------------------------------------------------------------------------------------- batching


def pack_examples(examples: Sequence[dict], max_len: int) -> list[dict[str, list[int]]]:
    """Greedily pack examples into rows of at most max_len tokens with restarting position ids.

    The first token of each packed document gets label -100: it would otherwise be predicted from the end of
    the previous document, which an unpacked run never does.
    """
    rows: list[dict[str, list[int]]] = []
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        n = len(ex["input_ids"])
        if row["input_ids"] and len(row["input_ids"]) + n > max_len:
            rows.append(row)
            row = {"input_ids": [], "labels": [], "position_ids": []}
        row["input_ids"] += ex["input_ids"]
        row["labels"] += [IGNORE_INDEX] + ex["labels"][1:]
        row["position_ids"] += list(range(n))
    if row["input_ids"]:
        rows.append(row)
    return rows


def collate(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows into tensors. Padding gets label -100; packed rows pad with a separate dummy document.

    No attention mask is needed: attention is causal, so right padding never reaches a real token."""
    width = max(len(r["input_ids"]) for r in rows)
    batch = {"input_ids": [], "labels": []}
    packed = "position_ids" in rows[0]
    if packed:
        batch["position_ids"] = []
    for r in rows:
        pad = width - len(r["input_ids"])
        batch["input_ids"].append(r["input_ids"] + [pad_id] * pad)
        batch["labels"].append(r["labels"] + [IGNORE_INDEX] * pad)
        if packed:
            batch["position_ids"].append(r["position_ids"] + list(range(pad)))
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
