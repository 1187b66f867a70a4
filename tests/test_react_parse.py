"""Reading a model's ReAct step: real-style answers, well-formed and malformed, into a tool call, a final answer or
an error fed back as the observation; and the call in OpenAI's form, back into the same ReAct text."""

import json

import pytest

from align.core.react import call_text, parse_react, react_prompt
from conftest import FIXTURES

TOOLS = [
    {"type": "function", "function": {"name": "calculator", "description": "Evaluates arithmetic.",
     "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}},
    {"name": "search", "description": "Web search.", "parameters": {"type": "object", "properties": {}}},
]  # fmt: skip


@pytest.mark.parametrize(
    "text",
    [
        'Thought: I should compute it.\nAction: calculator\nAction Input: {"expression": "12*7"}',
        ' I should compute it.\nAction: calculator\nAction Input: {"expression": "12*7"}',  # prompt ended "Thought:"
        'Thought: I should compute it.\naction:  `calculator`\nACTION INPUT:\n{"expression": "12*7"}',
        'Thought: I should compute it.\nAction: "calculator".\nAction Input: ```json\n{"expression": "12*7"}\n```',
        'Thought：I should compute it.\nAction：calculator\nAction Input：{"expression": "12*7"}',  # full-width colons
        'Thought: I should compute it.\nAction: calculator\nAction Input: {"expression": "12*7"}\n'
        "Observation: 84\nThought: I now know the final answer.\nFinal Answer: 84",  # ran past its stop
    ],
)
def test_tool_calls_are_read_through_the_usual_deviations(text):
    step = parse_react(text, TOOLS)
    assert (step.action, step.arguments, step.error, step.final_answer) == (
        "calculator", {"expression": "12*7"}, None, None)  # fmt: skip
    assert step.thought == "I should compute it."
    call = step.message()["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"expression": "12*7"}
    assert call_text(call) == 'Action: calculator\nAction Input: {"expression": "12*7"}'  # back to ReAct text


def test_final_answers():
    step = parse_react("Thought: I now know the final answer.\nFinal Answer: 84", TOOLS)
    assert step.final_answer == "84" and step.action is None and step.message()["content"] == "84"
    assert parse_react("It is 84.", TOOLS).final_answer == "It is 84."  # no labels at all
    assert parse_react("Thought: the answer is 84.", TOOLS).final_answer == "the answer is 84."
    assert parse_react("Final Answer: 84\nAction: search\nAction Input: {}", TOOLS).final_answer == "84"


@pytest.mark.parametrize(
    "text, error",
    [
        ('Action: calculatr\nAction Input: {"expression": "1"}', "unknown tool 'calculatr'; the tools are: calculator"),
        ("Action: calculator\nAction Input: {expression: 1+1}", "is not valid JSON"),
        ("Action: calculator\nAction Input: {'expression': '1+1'}", "is not valid JSON"),
        ('Action: calculator\nAction Input: ["1+1"]', "must be a JSON object, got list"),
        ("Action: calculator\nAction Input: {}", "lacks the required argument(s): expression"),
        ("Action: calculator", "lacks the required argument(s): expression"),
    ],
)
def test_what_would_run_is_checked_strictly(text, error):
    step = parse_react(text, TOOLS)
    assert step.error and error in step.error and step.arguments is None
    assert "tool_calls" not in step.message()


def test_a_tool_without_required_arguments_takes_an_empty_input():
    step = parse_react("Thought: look it up\nAction: search\nAction Input:", TOOLS)
    assert step.action == "search" and step.arguments == {} and step.error is None


REACT_REF = FIXTURES / "qwen_react"


def test_the_react_prompt_is_qwens_reference_text():
    """Qwen's own example (examples/react_prompt.md, recorded with its source in tests/fixtures/qwen_react): the
    prompt for its query and tools, and the prompt after its model's step and the tool's result."""
    example = json.loads((REACT_REF / "react_prompt_example.json").read_text())
    reference = (REACT_REF / "react_prompt_reference.txt").read_text()
    prompt = react_prompt(example["query"], example["tools"])
    assert prompt == reference
    step = 'Thought: 我应该使用通义万相API来生成一张五彩斑斓的黑的图片。\nAction: image_gen\nAction Input: {"query": "五彩斑斓的黑"}'
    parsed = parse_react(step, [{"name": "image_gen", "parameters": {"type": "object"}}])
    assert (parsed.action, parsed.arguments) == ("image_gen", {"query": "五彩斑斓的黑"})
    second = (REACT_REF / "react_prompt_second_step_reference.txt").read_text()
    observation = second[len(prompt + "\n" + step + "\nObservation: ") :]
    assert prompt + "\n" + step + "\nObservation: " + observation == second and observation.startswith('{"status_code"')


def test_openai_functions_become_qwen_plugins():
    tool = {"type": "function", "function": {"name": "calculator", "description": "Evaluates arithmetic.",
            "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}}  # fmt: skip
    prompt = react_prompt("What is 2+3?", [tool])
    assert prompt.startswith("Answer the following questions as best you can. You have access to the following tools:")
    assert "calculator: Call this tool to interact with the calculator API. What is the calculator API useful for? " \
        "Evaluates arithmetic. Parameters: {\"type\": \"object\"" in prompt  # fmt: skip
    assert prompt.endswith("Question: What is 2+3?") and "should be one of [calculator]" in prompt
