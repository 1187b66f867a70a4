"""ChatML rendering: the token ids that training, generation and the saved chat template all agree on.

Every turn is `<|im_start|>{role}\\n{content}<|im_end|>\\n`, and a conversation without a system message gets the
default system prompt. Two encodings:

- `template` (the default): the text between special tokens is encoded in one piece, so the ids are exactly those
  of the chat template saved with every checkpoint as `apply_chat_template` tokenises it (what transformers, vLLM
  and TRL feed the model). A content that starts with a newline shares a token with the newline after the role.
- `qwen`: the role, the newline and the content are encoded separately, token for token as Qwen's `make_context`
  and `finetune.py` (the reference fixtures check it; `mask_mode: qwen` uses it).

Content is always encoded with special-token text kept as plain text, so a user cannot forge a turn; the chat
template (like every Hugging Face template) parses such text as special tokens, the one deliberate difference.
Tools follow Qwen's ReAct format (`align.core.react`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from align.core.react import TOOL_ROLES, ToolFormatError, assistant_text, react_instruction
from base_model.tokenizer import QwenTokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
ROLES = ("system", "user", "assistant", "tool", "function")
Encoding = Literal["template", "qwen"]


class ChatFormatError(ValueError):
    pass


@dataclass
class RenderedTurn:
    role: str
    start: int  # index of <|im_start|>
    content_start: int  # first token holding content
    content_end: int  # index of <|im_end|>
    end: int  # one past the trailing newline
    observation_spans: list[tuple[int, int]] = field(default_factory=list)  # tool output, [start, end)


@dataclass
class ChatTurn:
    """One ChatML turn as text pieces, before tokenisation; tool output pieces are marked."""

    role: str
    pieces: list[tuple[str, bool]]  # (text, is_observation)

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.pieces)


# In Qwen's ReAct format the model writes "Observation:" (its stop word) and the tool's output follows until the
# next "Thought:"; that output was not written by the model and is never trained on.
_OBSERVATION = re.compile(r"(?<=Observation:)(.*?)(?=\nThought:|\Z)", re.S)


def split_observations(content: str) -> list[tuple[str, bool]]:
    """Assistant content → [(text, is_observation)] segments, in order."""
    segments, pos = [], 0
    for m in _OBSERVATION.finditer(content):
        if m.start() > pos:
            segments.append((content[pos : m.start()], False))
        if m.end() > m.start():
            segments.append((m.group(1), True))
        pos = m.end()
    if pos < len(content):
        segments.append((content[pos:], False))
    return segments


def _check(messages: Sequence[dict]) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatFormatError(f"message {i}: expected a dict with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ChatFormatError(f"message {i}: unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        calls = m["role"] == "assistant" and m.get("tool_calls")
        if not isinstance(m["content"], str) and not (calls and m["content"] is None):
            raise ChatFormatError(f"message {i}: content must be a string, got {type(m['content']).__name__}")
        if m.get("tool_calls") and m["role"] != "assistant":
            raise ChatFormatError(f"message {i}: only an assistant message may have 'tool_calls'")
        if m["role"] == "system" and i != 0:
            raise ChatFormatError(f"message {i}: a system message may only come first")
        if m["role"] in TOOL_ROLES and (i == 0 or messages[i - 1]["role"] not in ("assistant", *TOOL_ROLES)):
            raise ChatFormatError(f"message {i}: a {m['role']} result must follow an assistant turn")


def chat_turns(messages: Sequence[dict], tools: Sequence[object] | None = None, split_react: bool = False):
    """Messages (OpenAI style, tool calls and results included) → ChatML turns as text pieces.

    Tool results join the assistant turn that called them as `\\nObservation: {result}` (the result marked as an
    observation), and an assistant message after a result continues that turn on a new line. With
    `split_react`, ReAct observations written inside assistant content are marked too."""
    _check(messages)
    messages = list(messages)
    offset = int(bool(messages) and messages[0]["role"] == "system")
    system = messages.pop(0)["content"] if offset else DEFAULT_SYSTEM
    try:
        if tools:
            system += "\n\n" + react_instruction(tools)
        turns = [ChatTurn("system", [(system, False)])]
        for i, m in enumerate(messages):
            where = f"message {i + offset}"
            if m["role"] in TOOL_ROLES:
                turns[-1].pieces += [("\nObservation:", False), (" " + m["content"], True)]
                continue
            text = assistant_text(m, where) if m["role"] == "assistant" else m["content"]
            pieces = split_observations(text) if m["role"] == "assistant" and split_react else [(text, False)]
            if m["role"] == "assistant" and i > 0 and messages[i - 1]["role"] in TOOL_ROLES:
                turns[-1].pieces += [("\n", False)] + pieces
            else:
                turns.append(ChatTurn(m["role"], pieces))
    except ToolFormatError as e:
        raise ChatFormatError(str(e)) from e
    return turns


def _merge(pieces: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Adjacent pieces of the same kind as one (empty pieces dropped)."""
    out: list[tuple[str, bool]] = []
    for text, obs in pieces:
        if out and out[-1][1] == obs:
            out[-1] = (out[-1][0] + text, obs)
        elif text:
            out.append((text, obs))
    return out


def _encode_qwen(turn: ChatTurn, tokenizer: QwenTokenizer) -> tuple[list[int], int, list[tuple[int, int]]]:
    """Role, newline and each piece encoded separately, as make_context: (ids, content offset, observation spans)."""
    head = [tokenizer.im_start_id] + tokenizer.encode(turn.role) + tokenizer.encode("\n")
    body: list[int] = []
    spans: list[tuple[int, int]] = []
    for text, is_observation in _merge(turn.pieces):
        piece = tokenizer.encode(text)
        if is_observation:
            spans.append((len(head) + len(body), len(head) + len(body) + len(piece)))
        body += piece
    return head + body, len(head), spans


def _encode_template(turn: ChatTurn, tokenizer: QwenTokenizer) -> tuple[list[int], int, list[tuple[int, int]]]:
    """`role\\ncontent` encoded in one piece, as the chat template; content and observation token ranges found
    from byte offsets (a token that holds any content is content; any tool output, an observation)."""
    nfc = lambda s: unicodedata.normalize("NFC", s)  # noqa: E731 (what encode does to the whole text)
    header = turn.role + "\n"
    text = nfc(header + turn.text)
    ids = tokenizer.encode(text)
    ends, pos = [], 0
    for i in ids:
        pos += len(tokenizer.token_bytes(i))
        ends.append(pos)
    header_bytes = len(header.encode())
    content_start = next((k for k, e in enumerate(ends) if e > header_bytes), len(ids))
    spans, before = [], header
    for piece, is_observation in turn.pieces:
        if is_observation and piece:
            a, b = len(nfc(before).encode()), len(nfc(before + piece).encode())
            first = next(k for k, e in enumerate(ends) if e > a)
            last = next(k for k, e in enumerate(ends) if e >= b)
            spans.append((1 + first, 2 + last))
        before += piece
    return [tokenizer.im_start_id] + ids, 1 + content_start, spans


def render_turns(
    messages: Sequence[dict],
    tokenizer: QwenTokenizer,
    add_generation_prompt: bool = False,
    max_window_size: int | None = None,
    split_react: bool = False,
    tools: Sequence[object] | None = None,
    encoding: Encoding = "template",
) -> tuple[list[int], list[RenderedTurn]]:
    """Token ids and where each turn sits in them (for label masks).

    With `split_react`, ReAct observations inside assistant content are reported in `observation_spans` (tool
    results given as messages always are)."""
    encode = _encode_template if encoding == "template" else _encode_qwen
    nl = tokenizer.encode("\n")
    encoded = []
    for turn in chat_turns(messages, tools, split_react):
        tokens, head_len, spans = encode(turn, tokenizer)
        encoded.append((turn.role, tokens + [tokenizer.im_end_id] + nl, head_len, spans))
    system, rest = encoded[0], encoded[1:]
    if max_window_size is not None:
        rest = _window(system, rest, max_window_size, add_generation_prompt)

    ids: list[int] = []
    turns: list[RenderedTurn] = []
    for role, tokens, head_len, spans in [system] + rest:
        start = len(ids)
        ids += tokens
        turns.append(
            RenderedTurn(
                role,
                start,
                start + head_len,
                len(ids) - 1 - len(nl),
                len(ids),
                [(start + a, start + b) for a, b in spans],
            )
        )
    if add_generation_prompt:
        head = tokenizer.encode("assistant\n") if encoding == "template" else tokenizer.encode("assistant") + nl
        ids += [tokenizer.im_start_id] + head
    return ids, turns


def _window(system, rest, max_window_size: int, add_generation_prompt: bool):
    """Drop whole rounds (a user turn and what follows it) from the front, as make_context does.

    make_context keeps the newest history round whose addition leaves the context (without the final query)
    below `max_window_size`, counting the system turn without its trailing newline.
    """
    starts = [i for i, (role, *_) in enumerate(rest) if role == "user"]
    if not starts:
        return rest
    last = starts[-1] if add_generation_prompt else len(rest)
    rounds = [rest[a:b] for a, b in zip(starts, starts[1:] + [len(rest)]) if a < last]
    tail = rest[last:]
    if rest[: starts[0]]:  # turns before the first user turn belong to the oldest round
        rounds[0] = rest[: starts[0]] + rounds[0]
    size = len(system[1]) - 1
    kept: list = []
    for r in reversed(rounds):
        n = sum(len(t[1]) for t in r)
        if size + n >= max_window_size:
            break
        kept = r + kept
        size += n
    return kept + tail


def render(
    messages: Sequence[dict],
    tokenizer: QwenTokenizer,
    add_generation_prompt: bool = False,
    max_window_size: int | None = None,
    tools: Sequence[object] | None = None,
    encoding: Encoding = "template",
) -> list[int]:
    """ChatML token ids of `messages` (OpenAI-style `{"role", "content"}` dicts, tool calls and results included);
    with the default encoding, exactly the ids of the saved chat template."""
    return render_turns(messages, tokenizer, add_generation_prompt, max_window_size, tools=tools, encoding=encoding)[0]


def render_text(
    messages: Sequence[dict], add_generation_prompt: bool = False, tools: Sequence[object] | None = None
) -> str:
    """The same conversation as text, as the chat template writes it (for display and engines that take strings)."""
    text = "".join(f"<|im_start|>{t.role}\n{t.text}<|im_end|>\n" for t in chat_turns(messages, tools))
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
