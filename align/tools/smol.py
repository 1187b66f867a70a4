"""smolagents drives our checkpoints: `AlignModel(backend)` is a `smolagents.Model` for both of its agents.

- `ToolCallingAgent`: the conversation is rendered with the agent's tools described by Qwen's ReAct instruction
  (what our models are trained on; the agent's `final_answer` tool is left out of the description, ReAct's own
  `Final Answer:` being the way to finish), the model's step is read back (`align/core/react.py`) and returned as a
  smolagents tool call; `Final Answer: X` becomes a call of the agent's `final_answer` tool. A step that cannot be
  read comes back as plain content, which the agent reports to the model as an error.
- `CodeAgent`: the model writes code as text; smolagents' stop sequences end the step.

The backend is `align.tools.agent.LocalBackend` (a checkpoint, our sampler) or `EndpointBackend` (any
OpenAI-compatible `/v1/completions`, e.g. `align serve`).
"""

from __future__ import annotations

import ast
import re
import uuid

from smolagents.models import (
    ChatMessage,
    ChatMessageToolCall,
    ChatMessageToolCallFunction,
    MessageRole,
    Model,
    get_clean_message_list,
    get_tool_json_schema,
    tool_role_conversions,
)

from align.core.chatml import render
from align.core.react import parse_react, text_before_action

_CALLING = re.compile(r"\ACalling tools:\n(.*)\Z", re.S)
_TASK = "New task:\n"  # how smolagents introduces the user's question


class AlignModel(Model):
    def __init__(self, backend, model_id: str = "align", **kwargs) -> None:
        super().__init__(flatten_messages_as_text=True, model_id=model_id, **kwargs)
        self.backend = backend
        self.written: dict[str, str] = {}  # call id -> the ReAct text that made the call

    def conversation(self, messages) -> list[dict]:
        """A ToolCallingAgent's messages as training renders a tool loop: the task is the user's question (without
        smolagents' "New task:" heading), a call this model made comes back as the text it wrote (Thought, Action,
        Action Input) and its result as the observation that continues the same assistant turn; smolagents would
        send them as "Calling tools: [...]" and a user turn."""
        out: list[dict] = []
        for m in messages:
            role = m["role"] if isinstance(m, dict) else m.role
            role = str(role.value if hasattr(role, "value") else role)
            content = m["content"] if isinstance(m, dict) else m.content
            text = content if isinstance(content, str) else "".join(
                c.get("text", "") for c in content or [] if isinstance(c, dict))  # fmt: skip
            calls = _CALLING.match(text) if role == "tool-call" else None
            if calls:
                try:
                    listed = ast.literal_eval(calls.group(1))
                except (ValueError, SyntaxError):
                    listed = []
                written = [self.written.get(c.get("id")) for c in listed if isinstance(c, dict)]
                if written and all(written):
                    text = "\n".join(written)
                    if out and out[-1]["role"] == "assistant" and text.startswith(out[-1]["content"] or "\0"):
                        out.pop()  # smolagents sends the step's thought on its own first: it is part of the text
                    out.append({"role": "assistant", "content": text})
                    continue
                out.append({"role": "assistant", "content": None, "tool_calls": [
                    {"id": c.get("id"), "type": "function", "function": c.get("function", {})} for c in listed]})  # fmt: skip
            elif role == "tool-response":
                out.append({"role": "tool", "content": text.removeprefix("Observation:").strip()})
            elif role == "user" and text.startswith(_TASK):  # the question as the model was trained to read it
                out.append({"role": "user", "content": text.removeprefix(_TASK)})
            else:  # a tool call it cannot read is kept as the assistant's text
                out.append({"role": "assistant" if role == "tool-call" else role, "content": text})
        return out

    def generate(self, messages, stop_sequences=None, response_format=None, tools_to_call_from=None, **kwargs):
        specs = [get_tool_json_schema(t) for t in tools_to_call_from] if tools_to_call_from else None
        if specs:
            conversation = self.conversation(messages)
        else:  # CodeAgent: its code and observations as smolagents flattens them (no ReAct to rebuild)
            clean = get_clean_message_list(messages, role_conversions=tool_role_conversions,
                                           flatten_messages_as_text=True)  # fmt: skip
            conversation = [{"role": str(m["role"].value if hasattr(m["role"], "value") else m["role"]),
                             "content": m["content"] if isinstance(m["content"], str) else str(m["content"])}
                            for m in clean]  # fmt: skip
        # ReAct ends with `Final Answer:` (read back as the final_answer tool's call below): describing final_answer
        # as a tool as well would offer the model two ways to finish, neither the one it was trained on
        described = [s for s in specs or [] if s["function"]["name"] != "final_answer"] or None
        tok = self.backend.tokenizer
        if conversation and conversation[-1]["role"] == "tool":  # the model goes on in the turn that made the call
            prompt = render([*conversation, {"role": "assistant", "content": ""}], tok, tools=described or specs)
            while prompt and prompt[-1] in (tok.im_end_id, *tok.encode("\n")):
                prompt = prompt[:-1]
            prompt += tok.encode("\n")
        else:
            prompt = render(conversation, tok, add_generation_prompt=True, tools=described or specs)
        stops = tuple(stop_sequences or ()) + (("Observation:",) if specs else ())
        text = self.backend.continue_text(prompt, stop=tuple(dict.fromkeys(stops)))
        if not specs:
            return ChatMessage(role=MessageRole.ASSISTANT, content=text, raw=text)
        step = parse_react(text, specs)
        if step.action and not step.error:
            name, arguments = step.action, step.arguments or {}
        elif (
            step.final_answer is not None
            and not step.error
            and any(s["function"]["name"] == "final_answer" for s in specs)
        ):
            name, arguments = "final_answer", {"answer": step.final_answer}
        else:
            return ChatMessage(role=MessageRole.ASSISTANT, content=text, raw=text)
        call = ChatMessageToolCall(id=f"call_{uuid.uuid4().hex[:12]}", type="function",
                                   function=ChatMessageToolCallFunction(name=name, arguments=arguments))  # fmt: skip
        self.written[call.id] = text.rstrip("\n")
        return ChatMessage(role=MessageRole.ASSISTANT, content=text_before_action(text) or None, tool_calls=[call],
                           raw=text)  # fmt: skip
