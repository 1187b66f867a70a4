"""`align serve`: the `openai` client's chat, streaming and completion calls against our server on a tiny
checkpoint; tool calls mapped to and from Qwen's ReAct text; bad requests answered with 400, never 500."""

import socket
import threading
import time

import httpx
import pytest
import torch

from align.serve import Completion, LocalModel, create_app
from base_model import QwenForCausalLM, QwenTokenizer
from conftest import tiny_config

openai = pytest.importorskip("openai")


def start(llm: LocalModel) -> str:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(llm), host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def tiny():
    tok = QwenTokenizer.from_bytes()
    torch.manual_seed(0)
    model = QwenForCausalLM(tiny_config(vocab_size=(len(tok) + 127) // 128 * 128, max_position_embeddings=512))
    llm = LocalModel(model.eval(), tok, name="tiny")
    return llm, openai.OpenAI(base_url=start(llm), api_key="unused")


def test_chat_and_its_stream_agree(tiny):
    llm, client = tiny
    messages = [{"role": "user", "content": "What is 2+3?"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
    choice = chat.choices[0]
    assert chat.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and chat.usage.completion_tokens <= 24
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                                 stream=True))  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == choice.message.content and chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert len(chunks) > 3  # token by token, not one piece
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_content_as_a_list_of_text_parts_is_the_joined_text(tiny):
    """OpenAI's clients may send a message's content as parts; text parts read as their text joined."""
    llm, client = tiny
    plain = [{"role": "user", "content": "What is 2+3?"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+3?"}]}]
    answers = [
        client.chat.completions.create(model="tiny", messages=m, max_tokens=12, temperature=0).choices[0].message
        for m in (plain, parts)
    ]
    assert answers[0].content == answers[1].content


def test_completions_with_a_stop_string_and_streaming(tiny):
    llm, client = tiny
    free = client.completions.create(model="tiny", prompt="<|im_start|>user\nHi<|im_end|>\n", max_tokens=30,
                                     temperature=0).choices[0].text  # fmt: skip
    assert len(free) >= 6
    stop = free[3:6]
    cut = client.completions.create(model="tiny", prompt="<|im_start|>user\nHi<|im_end|>\n", max_tokens=30,
                                    temperature=0, stop=[stop])  # fmt: skip
    assert cut.choices[0].text == free[: free.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="<|im_start|>user\nHi<|im_end|>\n", max_tokens=30,
                                         temperature=0, stop=[stop], stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text  # the held-back tail never leaks


class Scripted(LocalModel):
    """Answers each request with the next scripted step (the server's ReAct mapping, not the model, is tested)."""

    def __init__(self, steps):
        super().__init__(None, QwenTokenizer.from_bytes(), "scripted")
        self.steps, self.prompts, self.stops = list(steps), [], []

    def complete(self, prompt_ids, max_tokens, temperature, top_p, stop=(), seed=None, on_token=None):
        self.prompts.append(self.tokenizer.decode(prompt_ids))
        self.stops.append(stop)
        return Completion(self.steps.pop(0), "stop", len(prompt_ids), 5)


CALC = {"type": "function", "function": {"name": "calculator", "description": "Evaluates arithmetic.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}  # fmt: skip


def test_tool_calls_go_out_as_tool_calls_and_come_back_as_observations():
    llm = Scripted(['Thought: I should compute it.\nAction: calculator\nAction Input: {"expression": "12*7"}\n',
                    "Thought: I now know the final answer\nFinal Answer: 84"])  # fmt: skip
    client = openai.OpenAI(base_url=start(llm), api_key="unused")
    messages = [{"role": "user", "content": "What is 12*7?"}]
    first = client.chat.completions.create(model="scripted", messages=messages, tools=[CALC])
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "calculator"
    assert (
        call.function.arguments == '{"expression": "12*7"}'
        and first.choices[0].message.content == "Thought: I should compute it."
    )
    assert "calculator: Call this tool" in llm.prompts[0] and "Observation:" in llm.stops[0]
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "84"}]  # fmt: skip
    second = client.chat.completions.create(model="scripted", messages=messages, tools=[CALC])
    assert second.choices[0].message.content == "84" and second.choices[0].finish_reason == "stop"
    # the step comes back as the model wrote it, then the result, as Qwen writes it
    assert (
        'Thought: I should compute it.\nAction: calculator\nAction Input: {"expression": "12*7"}\nObservation: 84'
        in llm.prompts[1]
    )


def test_bad_requests_get_400_with_a_message(tiny):
    llm, client = tiny
    base = str(client.base_url).rstrip("/")
    cases = [
        ("/chat/completions", {"model": "tiny"}, "messages"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": 9}, "temperature"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"x": 1}]}, "tools"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 3}, "'n'"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}, "max_tokens"),
        ("/chat/completions", {"messages": "hello"}, "messages"),
        ("/completions", {"prompt": ""}, "prompt"),
        ("/completions", {"prompt": "x", "stop": [1]}, "stop"),
        (
            "/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0]: only text parts are supported, got 'image_url'",
        ),
        ("/chat/completions", {"messages": [{"role": "user", "content": ["x"]}]}, "got 'str'"),
    ]
    for path, body, word in cases:
        r = httpx.post(base + path, json=body, timeout=30)
        assert r.status_code == 400 and word in r.json()["error"]["message"], (path, body, r.status_code, r.text)
    r = httpx.post(base + "/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400
