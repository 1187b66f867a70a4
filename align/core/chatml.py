"""ChatML rendering, token for token as Qwen's `make_context`.

Every turn is `<|im_start|>{role}\\n{content}<|im_end|>\\n`; the role, the newline and the content are encoded
separately (so token boundaries never cross them), and content is encoded with special-token text kept as plain
text. A conversation without a system message gets the default system prompt.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from base_model.tokenizer import QwenTokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
ROLES = ("system", "user", "assistant", "tool", "function")


class ChatFormatError(ValueError):
    pass


@dataclass
class RenderedTurn:
    role: str
    start: int  # index of <|im_start|>
    content_start: int  # first content token
    content_end: int  # index of <|im_end|>
    end: int  # one past the trailing newline
    observation_spans: list[tuple[int, int]] = field(default_factory=list)  # ReAct tool output, [start, end)


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
        if not isinstance(m["content"], str):
            raise ChatFormatError(f"message {i}: content must be a string, got {type(m['content']).__name__}")
        if m["role"] == "system" and i != 0:
            raise ChatFormatError(f"message {i}: a system message may only come first")


def render_turns(
    messages: Sequence[dict],
    tokenizer: QwenTokenizer,
    add_generation_prompt: bool = False,
    max_window_size: int | None = None,
    split_react: bool = False,
) -> tuple[list[int], list[RenderedTurn]]:
    """Token ids and where each turn sits in them (for label masks).

    With `split_react`, assistant content is encoded in pieces split around ReAct observations, whose token
    ranges are reported in `observation_spans`."""
    _check(messages)
    messages = list(messages)
    if not messages or messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}] + messages
    nl = tokenizer.encode("\n")

    def turn(role: str, content: str) -> tuple[list[int], int, list[tuple[int, int]]]:
        head = [tokenizer.im_start_id] + tokenizer.encode(role) + nl
        body: list[int] = []
        spans: list[tuple[int, int]] = []
        # assistant content is encoded in segments so tool output can be masked exactly; elsewhere in one piece
        segments = split_observations(content) if role == "assistant" and split_react else [(content, False)]
        for text, is_observation in segments:
            piece = tokenizer.encode(text)
            if is_observation:
                spans.append((len(head) + len(body), len(head) + len(body) + len(piece)))
            body += piece
        return head + body + [tokenizer.im_end_id] + nl, len(head), spans

    encoded = [(m["role"],) + turn(m["role"], m["content"]) for m in messages]
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
        ids += [tokenizer.im_start_id] + tokenizer.encode("assistant") + nl
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
) -> list[int]:
    """ChatML token ids of `messages` (OpenAI-style `{"role", "content"}` dicts)."""
    return render_turns(messages, tokenizer, add_generation_prompt, max_window_size)[0]


def render_text(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The same conversation as text (for display and for engines that take strings)."""
    _check(messages)
    messages = list(messages)
    if not messages or messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}] + messages
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
