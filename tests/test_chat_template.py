"""One tokenisation for training and serving: `render` equals the saved chat template through transformers'
`apply_chat_template`, on generated conversations and on the SFT data, tools included."""

import json
import random

import pytest
import transformers

from align.core.chatml import render, render_text, render_turns
from align.core.losses import IGNORE_INDEX
from sft.data import build_example, record_tools, to_messages

# contents that stress token boundaries: leading/trailing whitespace and newlines, empty, CJK, code, emoji,
# combining characters (NFC), ReAct keywords
FRAGMENTS = [
    "", " ", "\n", "\n\n", " \n", "\t", "\r\n", "  ", "Hello", "hello world", "你好，世界", "日本語のテキスト",
    "def f(x):\n    return x * 2\n", "```python\nprint('hi')\n```", "🙂👍", "e\u0301", "Ω≈ç√", "123456789",
    "Thought: think\nAction: calc", "Observation: 4", "Final Answer: 4", "a\n\n\nb", "  indented", "trailing  ",
    '{"json": [1, 2]}', "tab\tseparated", "<b>html</b>", "'quotes' and \"double\"", "\\backslash\\",
]  # fmt: skip
TOOLS = [
    {"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic",
     "parameters": {"type": "object", "properties": {"expr": {"type": "string", "description": "表达式"}}}}},
    {"name": "search", "description": "Search the web", "parameters": {"type": "object", "properties": {}}},
    {"type": "function", "function": {"name": "no_params", "description": ""}},
    {"name": "bare"},
]  # fmt: skip


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 4)))


def _call(rng: random.Random) -> dict:
    name = rng.choice(["calculator", "search", "no_params", "bare"])
    args = rng.choice([json.dumps({"expr": _text(rng)}, ensure_ascii=False), {"expr": _text(rng)}, {}, "1+1"])
    return {"type": "function", "function": {"name": name, "arguments": args}} if rng.random() < 0.7 else {
        "name": name, "arguments": args}  # fmt: skip


def _conversation(rng: random.Random) -> tuple[list[dict], list[dict] | None]:
    messages = [{"role": "system", "content": _text(rng)}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": _text(rng)})
        if rng.random() < 0.3:
            calls = [_call(rng) for _ in range(rng.randint(1, 2))]
            content = rng.choice([None, "", _text(rng)])
            messages.append({"role": "assistant", "content": content, "tool_calls": calls})
            for _ in range(rng.randint(1, 2)):
                messages.append({"role": rng.choice(["tool", "function"]), "content": _text(rng)})
            if rng.random() < 0.8:
                messages.append({"role": "assistant", "content": _text(rng)})
        elif rng.random() < 0.9:
            messages.append({"role": "assistant", "content": _text(rng)})
    tools = rng.sample(TOOLS, rng.randint(1, len(TOOLS))) if rng.random() < 0.4 else None
    return messages, tools


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory, qwen_tokenizer):
    """The tokenizer of a saved checkpoint, as transformers (and vLLM, TRL) load it."""
    from base_model import save_pretrained
    from base_model.model import QwenForCausalLM
    from conftest import tiny_config

    folder = tmp_path_factory.mktemp("ckpt")
    save_pretrained(QwenForCausalLM(tiny_config()), folder, qwen_tokenizer)
    return transformers.AutoTokenizer.from_pretrained(folder)


def test_render_equals_apply_chat_template_on_generated_conversations(hf_tokenizer, qwen_tokenizer):
    rng = random.Random(0)
    n_tools = n_calls = 0
    for k in range(1000):
        messages, tools = _conversation(rng)
        n_tools += tools is not None
        n_calls += any(m.get("tool_calls") for m in messages)
        gen = k % 2 == 0
        template = hf_tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=True, add_generation_prompt=gen, return_dict=False
        )
        assert render(messages, qwen_tokenizer, add_generation_prompt=gen, tools=tools) == template, (k, messages)
        text = hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)
        assert render_text(messages, gen, tools) == text, (k, messages)
    assert n_tools > 300 and n_calls > 200  # the generator reached the tool paths


def test_qwen_encoding_differs_where_a_content_begins_with_a_newline(qwen_tokenizer):
    messages = [{"role": "user", "content": "\nHello"}, {"role": "assistant", "content": "Hi"}]
    template, qwen = (render(messages, qwen_tokenizer, encoding=e) for e in ("template", "qwen"))
    nl, nlnl = qwen_tokenizer.encode("\n"), qwen_tokenizer.encode("\n\n")
    assert len(nlnl) == 1 and nlnl[0] in template and nlnl[0] not in qwen and qwen.count(nl[0]) > template.count(nl[0])
    plain = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]
    assert render(plain, qwen_tokenizer) == render(plain, qwen_tokenizer, encoding="qwen")


def test_masks_in_the_template_encoding_cover_content_and_never_tool_output(qwen_tokenizer):
    rng = random.Random(1)
    tok = qwen_tokenizer
    for _ in range(200):
        messages, tools = _conversation(rng)
        ids, turns = render_turns(messages, tok, split_react=True, tools=tools)
        for t in turns:
            assert ids[t.start] == tok.im_start_id and ids[t.content_end] == tok.im_end_id
            head = tok.decode(ids[t.start : t.content_start])
            assert head.startswith(f"<|im_start|>{t.role}") and len(head) <= len(f"<|im_start|>{t.role}\n")
            for a, b in t.observation_spans:
                assert t.content_start <= a < b <= t.content_end
    record = {
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "Thought: add", "tool_calls": [_call(random.Random(3))]},
            {"role": "tool", "content": "\nSECRET-TOOL-OUTPUT 4"},
            {"role": "assistant", "content": "Thought: done\nFinal Answer: 4"},
        ]
    }
    ex = build_example(to_messages(record, "x"), tok, 1024, tools=TOOLS)
    trained = tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX])
    assert "SECRET" not in trained and "TOOL-OUTPUT" not in trained
    assert trained.startswith("Thought: add\nAction:") and trained.endswith("Final Answer: 4<|im_end|>")


def test_saved_checkpoint_template_equals_render_on_the_sft_data(tmp_path, qwen_tokenizer, hf_tokenizer):
    """The SFT examples shipped with the project and the real public rows (tools included) tokenise the same
    through a saved folder's `apply_chat_template` as through `render`, which SFT trains on."""
    from pathlib import Path

    from align.core.records import iter_records

    root = Path(__file__).resolve().parent.parent
    files = [root / "examples/data/sft_tiny.jsonl"] + sorted((root / "tests/fixtures/public_rows").glob("*.jsonl"))
    checked = 0
    for path in files:
        for where, record in iter_records(path):
            if not ("messages" in record or "conversations" in record or {"instruction", "output"} <= set(record)):
                continue  # a preference record
            messages, tools = to_messages(record, where), record_tools(record, where)
            template = hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=False)
            assert build_example(messages, qwen_tokenizer, 10**6, tools=tools)["input_ids"] == template, where
            checked += 1
    assert checked >= 10
