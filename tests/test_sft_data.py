"""SFT data: Qwen finetune.py labels, masks, formats, validation."""

import json

import pytest

from align.core.losses import IGNORE_INDEX
from align.core.records import DataError
from sft.data import SkipExample, build_example, load_examples, pack_examples, record_tools, to_messages


def _fixture_messages(conv):
    return [{"role": "system", "content": conv["system"]}] + [
        {"role": m["from"], "content": m["value"]} for m in conv["messages"]
    ]


@pytest.fixture(scope="module")
def cases(chatml_fixture):
    convs = {c["name"]: c for c in chatml_fixture["conversations"]}
    return [(c, convs[c["conversation"]]) for c in chatml_fixture["preprocess"]["cases"]]


def test_qwen_mask_mode_matches_finetune_preprocess(cases, qwen_tokenizer):
    max_len = 128
    for case, conv in cases:
        ex = build_example(_fixture_messages(conv), qwen_tokenizer, max_len, mask_mode="qwen", truncation="slice")
        n = min(case["unpadded_length"], max_len)
        if case["name"] == "special_token_text_in_content":
            # deliberate difference: the reference turns "<|im_start|>" typed in a message into a control token
            assert ex["input_ids"] != case["input_ids"][:n]
            assert ex["input_ids"].count(qwen_tokenizer.im_start_id) == 3  # system, user, assistant only
            assert case["input_ids"][:n].count(qwen_tokenizer.im_start_id) > 3
            continue
        assert ex["input_ids"] == case["input_ids"][:n], case["name"]
        assert ex["labels"] == case["labels"][:n], case["name"]
        if case["truncated"]:
            full = build_example(_fixture_messages(conv), qwen_tokenizer, 10**6, mask_mode="qwen")
            assert full["input_ids"] == case["untruncated_input_ids"]
            assert full["labels"] == case["untruncated_labels"]


def test_default_mode_trains_only_assistant_content_and_im_end(qwen_tokenizer):
    tok = qwen_tokenizer
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
    ex = build_example(messages, tok, 512)
    trained = [i for i, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE_INDEX]
    expected = tok.encode("Hello there") + [tok.im_end_id] + tok.encode("Goodbye") + [tok.im_end_id]
    assert trained == expected
    assert all(l in (IGNORE_INDEX, i) for i, l in zip(ex["input_ids"], ex["labels"]))


def test_none_mode_trains_everything(qwen_tokenizer):
    ex = build_example(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], qwen_tokenizer, 64, mask_mode="none"
    )
    assert ex["labels"] == ex["input_ids"]


def test_react_observations_are_never_trained(qwen_tokenizer):
    content = (
        "Thought: use the tool\nAction: calculator\nAction Input: 12*3\nObservation: 36 (tool output)\n"
        "Thought: done\nFinal Answer: 36"
    )
    ex = build_example(
        [{"role": "user", "content": "12*3?"}, {"role": "assistant", "content": content}], qwen_tokenizer, 512
    )
    trained = qwen_tokenizer.decode([i for i, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE_INDEX])
    assert "36 (tool output)" not in trained
    assert trained.startswith("Thought: use the tool") and "Observation:" in trained and "Final Answer: 36" in trained


def test_tool_calls_and_results_render_as_react_and_results_are_not_trained(qwen_tokenizer):
    record = {
        "conversations": [
            {"from": "human", "value": "weather?"},
            {"from": "function_call", "value": '{"name": "get", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "It is sunny."},
        ],
        "tools": '[{"name": "get", "description": "Weather", "parameters": {"type": "object"}}]',
    }
    ex = build_example(to_messages(record, "x"), qwen_tokenizer, 512, tools=record_tools(record, "x"))
    text = qwen_tokenizer.decode(ex["input_ids"])
    assert "get: Call this tool to interact with the get API." in text and "one of [get]" in text
    assert text.endswith(
        '<|im_start|>assistant\nAction: get\nAction Input: {"city": "Paris"}\nObservation: sunny\nIt is sunny.<|im_end|>\n'
    )
    trained = qwen_tokenizer.decode([i for i, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE_INDEX])
    assert trained == 'Action: get\nAction Input: {"city": "Paris"}\nObservation:\nIt is sunny.<|im_end|>'
    with pytest.raises(DataError, match=r"x: field 'conversations\[1\].value': a function_call must be JSON"):
        to_messages(
            {"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "get()"}]}, "x"
        )
    with pytest.raises(DataError, match="x: field 'conversations\\[1\\]': a tool result must follow an assistant turn"):
        to_messages({"conversations": [{"from": "human", "value": "a"}, {"from": "observation", "value": "b"}]}, "x")


def test_alpaca_records_become_conversations(qwen_tokenizer):
    record = {"instruction": "Translate", "input": "bonjour", "output": "hello", "history": [["hi", "hello!"]]}
    assert to_messages(record, "x") == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": "Translate\nbonjour"},
        {"role": "assistant", "content": "hello"},
    ]
    assert to_messages({"instruction": "Say hi", "input": "", "output": "hi"}, "x")[0]["content"] == "Say hi"
    with pytest.raises(DataError, match="x: field 'history\\[0\\]'"):
        to_messages({"instruction": "a", "output": "b", "history": ["oops"]}, "x")


def test_drop_oldest_truncation_keeps_whole_turns(qwen_tokenizer):
    messages = [{"role": "system", "content": "S"}]
    for i in range(6):
        messages += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i}"}]
    ex = build_example(messages, qwen_tokenizer, 60)
    text = qwen_tokenizer.decode(ex["input_ids"])
    assert len(ex["input_ids"]) <= 60
    assert text.startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nquestion")  # starts at a turn
    assert "answer 5" in text and "answer 0" not in text
    with pytest.raises(SkipExample, match="does not fit"):
        build_example(messages, qwen_tokenizer, 20)


def test_sharegpt_and_openai_layouts_agree(qwen_tokenizer):
    a = to_messages({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "f")
    b = to_messages({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}, "f")
    assert a == b


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})


def test_bad_data_errors_name_file_line_and_field(tmp_path, qwen_tokenizer):
    path = _write(tmp_path, [GOOD, "{not json"])
    with pytest.raises(DataError, match=r"data.jsonl:2: not valid JSON"):
        load_examples(str(path), qwen_tokenizer, 128)
    bad_role = json.dumps({"messages": [{"role": "bot", "content": "q"}]})
    path = _write(tmp_path, [GOOD, bad_role])
    with pytest.raises(DataError, match=r"data.jsonl:2: field 'messages\[0\].role': unknown role 'bot'"):
        load_examples(str(path), qwen_tokenizer, 128)
    path = _write(tmp_path, [json.dumps({"text": "x"})])
    with pytest.raises(
        DataError, match=r"data.jsonl:1: no 'messages', 'conversations' or 'instruction'/'output' field"
    ):
        load_examples(str(path), qwen_tokenizer, 128)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl: file is empty"):
        load_examples(str(tmp_path / "empty.jsonl"), qwen_tokenizer, 128)


def test_skips_are_counted_and_reported(tmp_path, qwen_tokenizer):
    empty_assistant = json.dumps(
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}
    )
    too_long = json.dumps(
        {"messages": [{"role": "user", "content": "word " * 500}, {"role": "assistant", "content": "a"}]}
    )
    path = _write(tmp_path, [GOOD, empty_assistant, too_long, "not json", GOOD])
    examples, report = load_examples(str(path), qwen_tokenizer, 128, on_error="skip")
    assert len(examples) == 2
    assert report.skipped == {"untrainable": 1, "too long": 1, "malformed": 1}
    assert any("data.jsonl:2" in p and "empty assistant" in p for p in report.first_problems)
    assert any("data.jsonl:4" in p for p in report.first_problems)
    assert "skipped 3" in report.summary()


def test_parquet_and_datasets_folder(tmp_path, qwen_tokenizer):
    import pandas as pd
    from datasets import Dataset

    rows = [json.loads(GOOD)] * 3
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    a, _ = load_examples(str(tmp_path / "d.parquet"), qwen_tokenizer, 128)
    b, _ = load_examples(str(tmp_path / "ds"), qwen_tokenizer, 128)
    assert a == b and len(a) == 3


def test_packing_restarts_positions_and_masks_document_starts():
    examples = [
        {"input_ids": [1, 2, 3], "labels": [1, 2, 3]},
        {"input_ids": [4, 5], "labels": [4, 5]},
        {"input_ids": [6, 7, 8, 9], "labels": [-100, 7, 8, 9]},
    ]
    rows = pack_examples(examples, 6)
    assert rows[0] == {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "position_ids": [0, 1, 2, 0, 1]}
    assert rows[1]["position_ids"] == [0, 1, 2, 3]


def test_real_alpaca_glaive_and_openai_tool_rows(qwen_tokenizer):
    from pathlib import Path

    public = Path(__file__).parent / "fixtures" / "public_rows"
    examples, report = load_examples(str(public / "alpaca_llamafactory_demo.jsonl"), qwen_tokenizer, 1024)
    assert report.examples == 3 and not report.skipped
    text = qwen_tokenizer.decode(examples[1]["input_ids"])
    assert "<|im_start|>user\nGiven the parameters of a triangle, find out its perimeter.\nSide 1 = 4\n" in text
    trained = qwen_tokenizer.decode([i for i, lab in zip(examples[2]["input_ids"], examples[2]["labels"]) if lab >= 0])
    assert trained == "The thought of her displaying such courage brought a smile to my face.<|im_end|>"
    (glaive,), _ = load_examples(str(public / "sharegpt_glaive_toolcall.jsonl"), qwen_tokenizer, 4096)
    text = qwen_tokenizer.decode(glaive["input_ids"])
    assert "calculate_area: Call this tool to interact with the calculate_area API." in text
    assert "one of [calculate_area, calculate_discount]" in text
    assert (
        'Action: calculate_area\nAction Input: {"shape": "rectangle", "dimensions": [5, 3]}\nObservation: {"area": 15}'
        in text
    )
    trained = qwen_tokenizer.decode([i for i, lab in zip(glaive["input_ids"], glaive["labels"]) if lab >= 0])
    assert '{"area": 15}' not in trained and '{"area": 50.24}' not in trained and "Action: calculate_area" in trained
    drone, _ = load_examples(str(public / "openai_tools_drone_training.jsonl"), qwen_tokenizer, 4096)
    text = qwen_tokenizer.decode(drone[0]["input_ids"])
    assert "call the reject_request function.\nIf the request is ambiguous or unclear, reject the request.\n\n" in text
    assert "should be one of [takeoff_drone, land_drone," in text
    trained = qwen_tokenizer.decode([i for i, lab in zip(drone[0]["input_ids"], drone[0]["labels"]) if lab >= 0])
    assert trained == 'Action: takeoff_drone\nAction Input: {"altitude": 100}<|im_end|>'
