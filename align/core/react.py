"""Qwen's ReAct format for tools: tool descriptions for the system turn, OpenAI-style tool calls as ReAct text.

The instruction is the one in Qwen's ReAct prompt (`examples/react_prompt.md`). A conversation with tools puts it
in the system turn, after the system message. An assistant message's `tool_calls` become `Action:` /
`Action Input:` lines after its content; each tool result that follows becomes `\\nObservation: {result}` in the
same assistant turn, and an assistant message after a tool result continues that turn on a new line. The chat
template saved with every checkpoint (`base_model.hf_tokenizer.CHAT_TEMPLATE`) produces the same text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from base_model.hf_tokenizer import REACT_INSTRUCTION, TOOL_DESC  # one text for render and the chat template

TOOL_ROLES = ("tool", "function")


class ToolFormatError(ValueError):
    pass


def tool_function(tool: object, where: str = "tool") -> dict:
    """An OpenAI tool (`{"type": "function", "function": {...}}`) or a bare function description → the function."""
    function = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise ToolFormatError(f"{where}: expected a function description with a 'name', got {tool!r:.80}")
    if not isinstance(function.get("description", ""), str):
        raise ToolFormatError(f"{where}: 'description' must be a string")
    return function


def react_instruction(tools: Sequence[object]) -> str:
    """The ReAct instruction listing `tools` (each with name, description and JSON-schema parameters)."""
    functions = [tool_function(t, f"tools[{i}]") for i, t in enumerate(tools)]
    descs = [
        TOOL_DESC.format(
            name=f["name"],
            description=f.get("description", ""),
            parameters=json.dumps(f.get("parameters", {}), ensure_ascii=False),
        )
        for f in functions
    ]
    return REACT_INSTRUCTION.format(tool_descs="\n\n".join(descs), tool_names=", ".join(f["name"] for f in functions))


def call_text(call: object, where: str = "tool_call") -> str:
    """One tool call (`{"function": {"name", "arguments"}}` or `{"name", "arguments"}`) as ReAct lines.

    Arguments given as a string are kept verbatim (OpenAI sends JSON text); any other value is written as JSON."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ToolFormatError(f"{where}: expected a call with a 'name', got {call!r:.80}")
    arguments = function.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return f"Action: {function['name']}\nAction Input: {arguments}"


def assistant_text(message: dict, where: str = "message") -> str:
    """An assistant message's content followed by its tool calls, one `Action:` block per call."""
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise ToolFormatError(f"{where}: 'tool_calls' must be a list")
    parts = [message["content"]] if message["content"] else []
    parts += [call_text(c, f"{where}.tool_calls[{i}]") for i, c in enumerate(calls)]
    return "\n".join(parts)
