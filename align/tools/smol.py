"""smolagents drives our checkpoints: `AlignModel(backend)` is a `smolagents.Model` for both of its agents.

- `ToolCallingAgent`: the conversation is rendered with the agent's tools described by Qwen's ReAct instruction
  (what our models are trained on), the model's step is read back (`align/core/react.py`) and returned as a
  smolagents tool call; `Final Answer: X` becomes a call of the agent's `final_answer` tool. A step that cannot be
  read comes back as plain content, which the agent reports to the model as an error.
- `CodeAgent`: the model writes code as text; smolagents' stop sequences end the step.

The backend is `align.tools.agent.LocalBackend` (a checkpoint, our sampler) or `EndpointBackend` (any
OpenAI-compatible `/v1/completions`, e.g. `align serve`).
"""

from __future__ import annotations

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


class AlignModel(Model):
    def __init__(self, backend, model_id: str = "align", **kwargs) -> None:
        super().__init__(flatten_messages_as_text=True, model_id=model_id, **kwargs)
        self.backend = backend

    def generate(self, messages, stop_sequences=None, response_format=None, tools_to_call_from=None, **kwargs):
        clean = get_clean_message_list(messages, role_conversions=tool_role_conversions, flatten_messages_as_text=True)
        conversation = [{"role": str(m["role"].value if hasattr(m["role"], "value") else m["role"]),
                         "content": m["content"] if isinstance(m["content"], str) else str(m["content"])}
                        for m in clean]  # fmt: skip
        specs = [get_tool_json_schema(t) for t in tools_to_call_from] if tools_to_call_from else None
        prompt = render(conversation, self.backend.tokenizer, add_generation_prompt=True, tools=specs)
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
        return ChatMessage(role=MessageRole.ASSISTANT, content=text_before_action(text) or None, tool_calls=[call],
                           raw=text)  # fmt: skip
