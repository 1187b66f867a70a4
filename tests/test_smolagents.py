"""smolagents drives our models: a ToolCallingAgent calls a tool and finishes with its final_answer tool, the steps
read from Qwen's ReAct text; a CodeAgent gets the model's code as text; a tiny checkpoint runs both without error."""

import pytest

smolagents = pytest.importorskip("smolagents")

from smolagents import CodeAgent, ToolCallingAgent, tool  # noqa: E402

from align.tools.smol import AlignModel  # noqa: E402
from base_model import QwenTokenizer  # noqa: E402


@tool
def multiply(a: int, b: int) -> int:
    """Multiplies two integers.

    Args:
        a: the first factor
        b: the second factor
    """
    return a * b


class Scripted:
    def __init__(self, steps):
        self.tokenizer = QwenTokenizer.from_bytes()
        self.steps, self.asked, self.stops = list(steps), [], []

    def continue_text(self, prompt_ids, stop=("Observation:",)):
        self.asked.append(self.tokenizer.decode(prompt_ids))
        self.stops.append(stop)
        return self.steps.pop(0)


def test_a_tool_calling_agent_calls_a_tool_then_answers():
    backend = Scripted(['Thought: multiply them.\nAction: multiply\nAction Input: {"a": 12, "b": 7}\n',
                        "Thought: I now know the final answer\nFinal Answer: 84"])  # fmt: skip
    agent = ToolCallingAgent(tools=[multiply], model=AlignModel(backend), max_steps=4, verbosity_level=0)
    assert str(agent.run("What is 12 times 7?")) == "84"
    first = backend.asked[0]
    assert "multiply: Call this tool to interact with the multiply API" in first and "final_answer" in first
    assert "Observation:" in backend.stops[0]
    assert "final_answer: Call this tool" not in first  # ReAct's own Final Answer is how it finishes
    # the call and its result come back as training renders them: the model's text, then the observation, in
    # the same assistant turn
    assert 'Action Input: {"a": 12, "b": 7}\nObservation: 84\n' in backend.asked[1]
    assert "Calling tools" not in backend.asked[1] and backend.asked[1].count("Thought: multiply them.") == 1
    assert backend.asked[1].count("<|im_start|>assistant") == 1
    steps = [s for s in agent.memory.steps if getattr(s, "tool_calls", None)]
    assert [s.tool_calls[0].name for s in steps] == ["multiply", "final_answer"]


def test_a_code_agent_gets_code_as_text():
    code = "Thought: compute.\n<code>\nresult = multiply(6, 7)\nfinal_answer(result)\n</code>"
    backend = Scripted([code])
    agent = CodeAgent(tools=[multiply], model=AlignModel(backend), max_steps=2, verbosity_level=0)
    assert agent.run("What is 6 times 7?") == 42


def test_a_tiny_checkpoint_drives_a_tool_calling_agent(tmp_path):
    import torch

    from align.serve import LocalModel
    from align.tools.agent import LocalBackend
    from base_model import QwenForCausalLM
    from conftest import tiny_config

    tok = QwenTokenizer.from_bytes()
    torch.manual_seed(0)
    model = QwenForCausalLM(tiny_config(vocab_size=(len(tok) + 127) // 128 * 128, max_position_embeddings=8192)).eval()
    backend = LocalBackend(LocalModel(model, tok), max_tokens=12)
    agent = ToolCallingAgent(tools=[multiply], model=AlignModel(backend), max_steps=1, verbosity_level=0)
    agent.run("What is 12 times 7?")  # an untrained model: no useful answer, but every step runs
    assert len(agent.memory.steps) >= 2
