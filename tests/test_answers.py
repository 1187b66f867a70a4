"""Final answers of maths problems (GSM8K, MATH), their equivalence, the unbiased pass@k, and `exact_answer` as a
verifiable reward function (real GSM8K rows)."""

import json
import math
import random
from itertools import combinations

import pytest

from align.eval.answers import exact_answer, gsm8k_answer, last_boxed, math_equal, pass_at_k
from conftest import FIXTURES
from ppo.rewards import RewardSource, make_scorer

GSM8K = FIXTURES / "public_rows" / "gsm8k_train_rows.jsonl"


def test_gsm8k_references_and_model_answers():
    rows = [json.loads(l) for l in GSM8K.read_text().splitlines()]
    assert [gsm8k_answer(r["answer"]) for r in rows] == ["72", "10"]
    for text, expected in [
        ("She sold 48 + 24 = 72 clips.", "72"),
        ("The answer is $1,250.", "1250"),
        ("so the total is \\boxed{72}. (Checked with 3 methods.)", "72"),
        ("#### -3", "-3"),
        ("It costs 0.2 dollars per minute, so 10.", "10"),
        ("no number here", None),
    ]:
        assert gsm8k_answer(text) == expected, text


def test_boxed_answers_keep_nested_braces():
    assert last_boxed("first \\boxed{1}, then \\boxed{\\frac{3}{4}}.") == "\\frac{3}{4}"
    assert last_boxed("\\fbox{x^{2}+1}") == "x^{2}+1" and last_boxed("\\boxed{unclosed") is None


@pytest.mark.parametrize(
    "a, b, same",
    [
        ("\\frac{3}{4}", "0.75", True),
        ("\\dfrac{3}{4}", "3/4", True),
        ("\\frac34", "\\frac{3}{4}", True),
        ("\\sqrt{8}", "2\\sqrt{2}", True),
        ("x = 5", "5", True),
        ("90^\\circ", "90", True),
        ("50\\%", "50", True),
        ("12\\text{ inches}", "12", True),
        ("\\left(1, 2\\right)", "(1,2)", True),
        ("2\\pi", "\\pi \\cdot 2", True),
        ("1,000", "1000", True),
        ("\\frac{1}{3}", "0.33", False),
        ("\\sqrt{2}", "2", False),
        ("(1,2)", "(2,1)", False),
        (None, "1", False),
    ],
)
def test_math_equivalence(a, b, same):
    assert math_equal(a, b) is same


def test_pass_at_k_is_the_unbiased_estimator():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 12)
        c, k = rng.randint(0, n), rng.randint(1, n)
        outcomes = [True] * c + [False] * (n - c)
        subsets = list(combinations(range(n), k))  # the definition: a random k-subset has a pass
        expected = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    with pytest.raises(ValueError, match="at least 5 samples"):
        pass_at_k(3, 1, 5)


def test_exact_answer_is_a_verifiable_reward_function():
    source = RewardSource(kind="function", target="align.eval.answers:exact_answer", args={"answers": str(GSM8K)})
    score = make_scorer(source)
    prompts = [
        [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
          "clips in May. How many clips did Natalia sell altogether in April and May?"}],
        [{"role": "user", "content": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of "
          "babysitting. How much did she earn?"}],
    ]  # fmt: skip
    assert score(prompts, ["48 + 24 = 72. The answer is 72.", "She earned $12."]) == [1.0, 0.0]
    assert score(prompts, ["#### 72", "0.2 x 50 = 10, so \\boxed{10}"]) == [1.0, 1.0]
    with pytest.raises(Exception, match="no answer for the prompt"):
        exact_answer([[{"role": "user", "content": "What is 2+2?"}]], ["4"], str(GSM8K))


def test_model_text_never_reaches_python_evaluation():
    """The sympy parser evaluates Python: anything but numbers, operators, sqrt, pi and one-letter variables is
    compared as text only, and huge powers are refused before they are computed."""
    import time

    t0 = time.perf_counter()
    for attack in ["().__class__.__base__.__subclasses__()", "__import__(os)", "exec(x)", "9**9**9**9",
                   "2**(99999999)", "(" * 200 + "1" + ")" * 200]:  # fmt: skip
        assert math_equal(attack, "1") is False
    assert time.perf_counter() - t0 < 5
