"""`align serve --model DIR`: an OpenAI-compatible server on our native engine, so the labelling app's candidate
generation, the LLM tagger, judges, `align eval --endpoint` and agents (ours, smolagents, the `openai` client) can
all use a local checkpoint. With vLLM, point the same clients at vLLM's own server.

- `POST /v1/chat/completions`: `messages` (OpenAI roles, `tool_calls` and `tool` results included, content as a
  string or a list of text parts), `tools`,
  `max_tokens`, `temperature`, `top_p`, `seed`, `stop`, `stream`. With `tools` the conversation is rendered with
  Qwen's ReAct instruction (as in training), generation stops at `Observation:`, and the step is read back
  (`align/core/react.py`): a call comes back as `tool_calls` (finish_reason `tool_calls`), a final answer as
  content. A step that names an unknown tool or gives invalid JSON comes back as content, with the problem, for
  the client to feed back.
- `POST /v1/completions`: a text `prompt` (special-token text such as `<|im_start|>` is read as those tokens),
  `stop`, `stream`: Qwen's text-completion ReAct loop (`react_prompt`) runs through it.
- `GET /v1/models`.
- Streaming sends server-sent events as OpenAI does (`chat.completion.chunk` deltas, then `data: [DONE]`); text that
  could be the start of a stop string is held back until it is known not to be one.

One request generates at a time (the model is shared). Bad input gets a 400 with OpenAI's error shape.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fastapi import Request  # at module level: FastAPI reads the endpoints' (string) annotations from here

from base_model.generate import SamplingParams, generate

REACT_STOP = "Observation:"


class BadRequest(ValueError):
    pass


@dataclass
class Completion:
    text: str  # cut before the stop string that ended it, if one did
    finish_reason: str  # stop | length
    prompt_tokens: int
    completion_tokens: int


class LocalModel:
    """A checkpoint and its tokenizer behind one lock: `complete(prompt_ids, …)` with stop strings and streaming."""

    def __init__(self, model, tokenizer, name: str = "local") -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.lock = threading.Lock()

    @classmethod
    def load(cls, model_dir: str, name: str | None = None) -> LocalModel:
        import torch

        from base_model import QwenTokenizer, load_pretrained

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = load_pretrained(model_dir, dtype=dtype, device=device).eval()
        return cls(model, QwenTokenizer.from_file(model_dir), name or str(model_dir).rstrip("/").split("/")[-1])

    def complete(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop: tuple[str, ...] = (),
        seed: int | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> Completion:
        tok = self.tokenizer
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop_token_ids=(tok.im_end_id, tok.eod_id),
            stop_strings=stop,
            seed=seed,
            vocab_limit=len(tok),
        )
        limit = self.model.config.max_position_embeddings
        if len(prompt_ids) + max_tokens > limit:
            raise BadRequest(f"the prompt ({len(prompt_ids)} tokens) and max_tokens ({max_tokens}) exceed the model's "
                             f"{limit} positions")  # fmt: skip
        with self.lock:
            out = generate(self.model, [prompt_ids], params, pad_id=tok.pad_id, detokenize=tok.decode,
                           on_token=(lambda _row, t: on_token(t)) if on_token else None)  # fmt: skip
        ids, reason, hit = out.token_ids[0], out.finish_reasons[0], out.stop_strings[0]
        if reason == "stop" and hit is None:
            ids = ids[:-1]  # the stop token (<|im_end|>, <|endoftext|>) is not text
        text = tok.decode(ids)
        if hit is not None:
            text = text[: text.index(hit)]
        return Completion(text, reason, len(prompt_ids), len(out.token_ids[0]))


def _number(body: dict, key: str, default, lo, hi, kind=float):
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadRequest(f"'{key}' must be a number in [{lo}, {hi}], got {value!r}")
    return kind(value)


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) and s for s in stop):
        return tuple(stop)
    raise BadRequest("'stop' must be a string or a list of non-empty strings")


def _sampling(body: dict) -> dict:
    if body.get("n", 1) != 1:
        raise BadRequest("'n' other than 1 is not supported; send several requests")
    return {
        "max_tokens": _number(body, "max_tokens", 256, 1, 32768, int),
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0) or 1.0,
        "seed": _number(body, "seed", None, 0, 2**63 - 1, int),
    }


def _joined_text(message, i: int):
    """A message whose content is a list of parts (`[{"type": "text", "text": …}]`, as OpenAI's clients may send)
    with its text parts joined; parts of any other type are refused."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message
    texts = []
    for j, part in enumerate(message["content"]):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise BadRequest(f"messages[{i}].content[{j}]: only text parts are supported, got {kind!r}")
        texts.append(part["text"])
    return {**message, "content": "".join(texts)}


class Streamer:
    """Tokens in, text deltas out: decodes what has come so far and releases all but a tail that could still turn
    into a stop string (or an unfinished UTF-8 character)."""

    def __init__(self, tokenizer, stops: tuple[str, ...]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        safe = len(text) - self.hold
        for stop in self.stops:  # a token may bring a whole stop string and more
            at = text.find(stop)
            if at != -1:
                safe = min(safe, at)
        while safe > self.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        if safe <= self.sent:
            return ""
        delta, self.sent = text[self.sent : safe], safe
        return delta

    def finish(self, final_text: str) -> str:
        return final_text[self.sent :] if len(final_text) > self.sent else ""


def create_app(llm: LocalModel):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    from align.core.chatml import render
    from align.core.react import ToolFormatError, parse_react, text_before_action, tool_function

    app = FastAPI(title="align serve", docs_url=None, redoc_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("the body is not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def stream(
        make: Callable[[Callable[[int], None]], Completion], stops: tuple[str, ...], chunk: Callable
    ) -> Iterator:
        """Run the generation in a thread; yield SSE lines as its tokens arrive."""
        tokens: queue.Queue = queue.Queue()
        result: dict = {}

        def work() -> None:
            try:
                result["done"] = make(tokens.put)
            except Exception as e:  # reported in the stream
                result["error"] = e
            tokens.put(None)

        threading.Thread(target=work, daemon=True).start()
        streamer = Streamer(llm.tokenizer, stops)
        yield f"data: {json.dumps(chunk({'role': 'assistant', 'content': ''}, None))}\n\n"
        while (token := tokens.get()) is not None:
            delta = streamer.push(token)
            if delta:
                yield f"data: {json.dumps(chunk({'content': delta}, None))}\n\n"
        if "error" in result:
            yield f"data: {json.dumps({'error': {'message': str(result['error'])}})}\n\n"
        else:
            done: Completion = result["done"]
            rest = streamer.finish(done.text)
            if rest:
                yield f"data: {json.dumps(chunk({'content': rest}, None))}\n\n"
            yield f"data: {json.dumps(chunk({}, done.finish_reason))}\n\n"
        yield "data: [DONE]\n\n"

    @app.exception_handler(BadRequest)
    async def bad_request(_request, exc: BadRequest):
        return error(400, str(exc))

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": llm.name, "object": "model", "owned_by": "align"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await body_of(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list")
        messages = [_joined_text(m, i) for i, m in enumerate(messages)]
        tools = body.get("tools") or None
        try:
            for i, t in enumerate(tools or []):
                tool_function(t, f"tools[{i}]")
            prompt = render(messages, llm.tokenizer, add_generation_prompt=True, tools=tools)
        except (ToolFormatError, ValueError, KeyError, TypeError) as e:
            raise BadRequest(f"messages/tools: {e}") from None
        sampling = _sampling(body)
        stops = _stops(body) + ((REACT_STOP,) if tools else ())
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(delta: dict, finish: str | None) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": llm.name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip

        if body.get("stream") and not tools:
            make = lambda on_token: llm.complete(prompt, stop=stops, on_token=on_token, **sampling)  # noqa: E731
            return StreamingResponse(stream(make, stops, chunk), media_type="text/event-stream")
        done = llm.complete(prompt, stop=stops, **sampling)
        message: dict = {"role": "assistant", "content": done.text}
        finish = done.finish_reason
        if tools:
            step = parse_react(done.text, tools)
            if step.action and not step.error:
                message = {"role": "assistant", "content": text_before_action(done.text) or None,
                           "tool_calls": [step.tool_call(f"call_{uuid.uuid4().hex[:12]}")]}  # fmt: skip
                finish = "tool_calls"
            elif step.error:
                message["content"] = done.text
            else:
                message["content"] = step.final_answer if step.final_answer is not None else done.text
        if body.get("stream"):  # tools: the step is read whole, then sent as one delta

            def once() -> Iterator[str]:
                yield f"data: {json.dumps(chunk({'role': 'assistant', **{k: v for k, v in message.items() if k != 'role'}}, None))}\n\n"
                yield f"data: {json.dumps(chunk({}, finish))}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(once(), media_type="text/event-stream")
        usage = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                 "total_tokens": done.prompt_tokens + done.completion_tokens}  # fmt: skip
        return {"id": cid, "object": "chat.completion", "created": created, "model": llm.name,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage}  # fmt: skip

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("'prompt' must be a non-empty string")
        ids = llm.tokenizer.encode(prompt, allowed_special="all")
        sampling = _sampling(body)
        stops = _stops(body)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(delta: dict, finish: str | None) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": llm.name,
                    "choices": [{"index": 0, "text": delta.get("content", ""), "finish_reason": finish}]}  # fmt: skip

        if body.get("stream"):
            make = lambda on_token: llm.complete(ids, stop=stops, on_token=on_token, **sampling)  # noqa: E731
            return StreamingResponse(stream(make, stops, chunk), media_type="text/event-stream")
        done = llm.complete(ids, stop=stops, **sampling)
        usage = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                 "total_tokens": done.prompt_tokens + done.completion_tokens}  # fmt: skip
        return {"id": cid, "object": "text_completion", "created": created, "model": llm.name,
                "choices": [{"index": 0, "text": done.text, "finish_reason": done.finish_reason}], "usage": usage}  # fmt: skip

    return app


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, name: str | None = None) -> None:
    import uvicorn

    llm = LocalModel.load(model_dir, name)
    print(f"[serve] {llm.name} at http://{host}:{port}/v1 (chat/completions, completions, models)")
    uvicorn.run(create_app(llm), host=host, port=port, log_level="warning")
