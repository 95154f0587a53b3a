"""Built-in text rewards: bleu (against sacrebleu), math_verify, format, length."""

from __future__ import annotations

import random

import pytest
import sacrebleu

from posttrain.errors import UserError
from reward_models import RewardSet, load_reward
from reward_models.length import overlong_term
from reward_models.text import completion_text, extract_code

WORDS = ("the a cat dog sat on mat log runs quickly slowly under over red blue green house tree river "
         "stone light dark 1 2 3 , . ! ? it's don't").split()


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 18)))


def bleu_pairs(n: int, seed: int = 0):
    """Deterministic (hypothesis, references) pairs: a string or 1-3 references, some near-copies."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        refs = [sentence(rng) for _ in range(rng.randint(1, 3))]
        if i % 3 == 0:  # a perturbed copy of a reference: high, non-trivial BLEU
            words = refs[0].split()
            if words:
                words[rng.randrange(len(words))] = rng.choice(WORDS)
            hyp = " ".join(words)
        else:
            hyp = sentence(rng) if i % 7 else ""
        pairs.append((hyp, refs[0] if i % 2 else refs))
    return pairs


def test_bleu_equals_sacrebleu_sentence_bleu():
    pairs = bleu_pairs(300)
    reward = load_reward("bleu")
    got = reward(["p"] * len(pairs), [h for h, _ in pairs], references=[r for _, r in pairs])
    for (hyp, refs), value in zip(pairs, got, strict=True):
        expected = sacrebleu.sentence_bleu(hyp, [refs] if isinstance(refs, str) else refs).score / 100
        assert value == pytest.approx(expected, abs=1e-9)
    assert len({round(v, 6) for v in got}) > 50  # a spread of values, not a constant
    assert max(got) > 0.3


def test_bleu_options_and_missing_references():
    reward = load_reward("bleu", lowercase=True)
    assert reward(["p"], ["The Cat"], references=[["the cat"]])[0] == pytest.approx(
        sacrebleu.sentence_bleu("The Cat", ["the cat"], lowercase=True).score / 100, abs=1e-9)
    out = reward(["p"], ["x"], references=[[]])
    assert out == [None] and out.info[0]["skipped"]


def test_bleu_reads_conversational_completion():
    reward = load_reward("bleu")
    completion = [{"role": "assistant", "content": "the cat sat on the mat"}]
    assert reward(["p"], [completion], references=["the cat sat on the mat"]) == [pytest.approx(1.0)]


@pytest.fixture(scope="module")
def math_reward():
    reward = load_reward("math_verify", workers=2)
    yield reward
    reward.close()


EQUIVALENT = [
    ("3/4", r"The answer is $\frac{3}{4}$."),
    ("3/4", r"So we get \boxed{0.75}"),
    (r"\frac{3}{4}", "0.75"),
    ("0.75", r"so \boxed{\frac34}"),
    ("42", "The answer is 42."),
    (42, r"\boxed{42}"),
    (r"\frac{\sqrt{2}}{2}", r"\boxed{\frac{1}{\sqrt{2}}}"),
    ("x^2+2x+1", r"\boxed{(x+1)^2}"),
    (r"\boxed{5}", r"we get 2+3 = 5 so \boxed{5}"),
    ("(1,2)", r"\boxed{(1,2)}"),
    ("1/3", r"\boxed{1/3}"),
    ("12", "<think>3*4</think><answer>12</answer>"),
]
NEAR_MISSES = [
    ("3/4", r"\boxed{0.76}"),
    ("42", "I think 41"),
    ("x^2+2x+1", r"\boxed{(x+2)^2}"),
    ("5", r"steps 1 then 2 and finally \boxed{6}"),
    ("1/3", "0.333"),
    (r"\pi", r"\boxed{3.14159}"),
    ("(1,2)", r"\boxed{(2,1)}"),
    ("12", "<think>12 is tempting</think><answer>13</answer>"),
    ("7", "no number here"),
]


def test_math_verify_accepts_equivalent_forms(math_reward):
    golds = [g for g, _ in EQUIVALENT]
    out = math_reward(["q"] * len(golds), [c for _, c in EQUIVALENT], answer=golds)
    assert list(out) == [1.0] * len(EQUIVALENT), [(e, i) for e, s, i in zip(EQUIVALENT, out, out.info, strict=True) if s != 1]


def test_math_verify_rejects_near_misses(math_reward):
    golds = [g for g, _ in NEAR_MISSES]
    out = math_reward(["q"] * len(golds), [c for _, c in NEAR_MISSES], answer=golds)
    assert list(out) == [0.0] * len(NEAR_MISSES), [(e, i) for e, s, i in zip(NEAR_MISSES, out, out.info, strict=True) if s]


def test_math_verify_unparseable_gold_abstains(math_reward):
    out = math_reward(["q", "q"], ["1", "2"], answer=[r"\frac{", None])
    assert list(out) == [None, None]
    assert "could not be parsed" in out.info[0]["skipped"]


def test_math_verify_boxed_only():
    reward = load_reward("math_verify", boxed_only=True, workers=1)
    try:
        assert list(reward(["q", "q"], ["The answer is 4", r"\boxed{4}"], answer=["4", "4"])) == [0.0, 1.0]
    finally:
        reward.close()


def test_math_verify_in_reward_set_threads(math_reward):
    # RewardSet calls rewards off the main thread: math-verify's signal timeout must not break it.
    with RewardSet([{"name": "math_verify", "args": {"workers": 1}}]) as rs:
        assert rs.score(["q"], [r"\boxed{2}"], answer=["2"]).totals == [1.0]


def test_format_think_answer_tags():
    reward = load_reward("format")
    completions = ["<think>a</think><answer>b</answer>", " <think>\nx\n</think>\n<answer>y</answer>\n",
                   "<answer>b</answer><think>a</think>", "<think>a</think>", "text <think>a</think><answer>b</answer>",
                   "<think><think>a</think><answer>b</answer>"]
    assert reward(["p"] * 6, completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_format_custom_pattern_and_errors():
    reward = load_reward("format", pattern=r"Answer: \d+", mode="search")
    assert reward(["p", "p"], ["so. Answer: 12", "Answer: x"]) == [1.0, 0.0]
    with pytest.raises(UserError, match="invalid pattern"):
        load_reward("format", pattern="(")
    with pytest.raises(UserError, match="either 'pattern' or 'tags'"):
        load_reward("format", pattern="a", tags=["b"])


def test_overlong_penalty_is_dapo():
    # max 100, soft zone 20: 0 up to 80, linear to -1 at 100, -1 beyond.
    assert [overlong_term(n, 100, 20) for n in (10, 80, 90, 100, 101)] == [0.0, 0.0, -0.5, -1.0, -1.0]


def test_length_reward_units_and_terms():
    reward = load_reward("length", target=4, max_length=6, soft_zone=2, unit="words")
    completions = ["a b c d", "a b", "a b c d e", "a b c d e f g"]
    # target term max(0, 1-|L-4|/4); overlong: 0 for L<=4, (4-L)/2 for 4<L<=6, -1 for L>6
    assert reward(["p"] * 4, completions) == pytest.approx([1.0, 0.5, 0.75 - 0.5, 0.25 - 1.0])
    tokens = load_reward("length", max_length=4, soft_zone=2)
    assert tokens(["p", "p"], ["x", "y"], completion_ids=[[1, 2, 3], [1, 2, 3, 4, 5]]) == [-0.5, -1.0]
    with pytest.raises(UserError, match="give 'target'"):
        load_reward("length")


def test_length_tokens_without_ids_is_a_row_error():
    with RewardSet([{"name": "length", "args": {"target": 3}}], on_error="zero") as rs:
        result = rs.score(["p"], ["abc"], completion_ids=[None])
    assert result.issues and "completion_ids" in result.issues[0].message


def test_extract_code_and_completion_text():
    text = "Idea.\n```python\nx = 1\n```\nThen\n```py\ndef f():\n    return 2\n```\n```bash\nls\n```"
    assert extract_code(text) == "def f():\n    return 2\n"
    assert extract_code(text, "first") == "x = 1\n"
    assert extract_code(text, "all") == "x = 1\n\n\ndef f():\n    return 2\n"
    assert extract_code("def g(): pass") == "def g(): pass"
    assert extract_code("```python\ndef cut(") == "def cut("  # unclosed final fence
    assert completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "a"
