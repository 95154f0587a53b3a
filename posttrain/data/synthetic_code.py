"""``code``: tiny Python function tasks checked by unit tests (the ``unit_test`` reward).

Each task asks for one small function, e.g. "Write a Python function `add_7(x)` that
returns x plus 7.", whose body is a single ``return`` of a short expression. A row has

  - ``prompt``: the request as a user turn (RL);
  - ``tests``: three ``assert`` snippets, so the ``unit_test`` reward scores the share that
    pass (partial credit: 0, 1/3, 2/3 or 1);
  - ``entry_point``: the function's name;
  - ``messages``: the request and the canonical solution (a fenced ```python block, as a chat
    model answers), for SFT before RL and for checking that the reward gives it 1.0.

The tasks come from about 25 families (arithmetic on an int, list slicing and filtering,
string counting and casing); most take a parameter (the 7 above), which is in the
function's name too, so the model can copy it. The expected values in the tests are
computed by running the canonical solution, so a test and its solution never disagree.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_WORDS = ("house", "water", "school", "light", "number", "people", "sound", "world", "answer", "letter",
          "mother", "animal", "picture", "earth", "country", "little", "sentence", "study", "question", "reverse")
_SUFFIXES = ("s", "ed", "er", "ing", "ly")
_LETTERS = tuple(sorted(set("".join(_WORDS))))
_FIRST_LETTERS = tuple(sorted({word[0] for word in _WORDS}))


def _int(rng: random.Random, k: Any) -> int:
    return rng.randint(-25, 25)


def _small_int(rng: random.Random, k: Any) -> int:
    return rng.randint(-5, 5)


def _multiple_or_not(rng: random.Random, k: Any) -> int:
    return k * rng.randint(0, 5) if rng.random() < 0.5 else rng.randint(0, 60)


def _int_list(rng: random.Random, k: Any) -> list[int]:
    return [rng.randint(0, 25) for _ in range(rng.randint(5, 7))]


def _word(rng: random.Random, k: Any) -> str:
    return rng.choice(_WORDS)


def _sentence(rng: random.Random, k: Any) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 6)))


@dataclass(frozen=True)
class Family:
    """A kind of task: ``name``, ``doc`` and ``body`` are templates over the parameter ``{k}``."""

    name: str  # the function's name, e.g. "add_{k}"
    arg: str  # its one parameter
    doc: str  # what it returns, e.g. "x plus {k}"
    body: str  # the returned expression, e.g. "x + {k}"
    inputs: Callable[[random.Random, Any], object]  # one test input
    params: tuple = (None,)  # values of {k}; (None,) for a family without one

    def task(self, k: Any) -> tuple[str, str, str]:
        """(function name, request, canonical source) for parameter ``k``."""
        name = self.name.format(k=k)
        doc = self.doc.format(k=k)
        source = f"def {name}({self.arg}):\n    return {self.body.format(k=k)}\n"
        request = f"Write a Python function `{name}({self.arg})` that returns {doc}."
        return name, request, source


def families(max_operand: int = 20) -> list[Family]:
    """The task families; numeric parameters run from 2 to ``max_operand``."""
    numbers = tuple(range(2, max(max_operand, 2) + 1))
    return [
        Family("add_{k}", "x", "x plus {k}", "x + {k}", _int, numbers),
        Family("subtract_{k}", "x", "x minus {k}", "x - {k}", _int, numbers),
        Family("times_{k}", "x", "x times {k}", "x * {k}", _int, numbers),
        Family("is_multiple_of_{k}", "x", "True if x is a multiple of {k}, else False", "x % {k} == 0",
               _multiple_or_not, numbers),
        Family("at_most_{k}", "x", "the smaller of x and {k}", "min(x, {k})", _int, numbers),
        Family("at_least_{k}", "x", "the larger of x and {k}", "max(x, {k})", _int, numbers),
        Family("power_{k}", "x", "x to the power {k}", "x ** {k}", _small_int, (2, 3, 4)),
        Family("repeat_{k}", "s", "the string s repeated {k} times", "s * {k}", _word, (2, 3, 4, 5)),
        Family("first_{k}", "xs", "the first {k} items of the list xs", "xs[:{k}]", _int_list, (1, 2, 3, 4, 5)),
        Family("last_{k}", "xs", "the last {k} items of the list xs", "xs[-{k}:]", _int_list, (1, 2, 3, 4, 5)),
        Family("add_{k}_to_each", "xs", "a list with {k} added to each item of the list xs", "[x + {k} for x in xs]",
               _int_list, numbers),
        Family("greater_than_{k}", "xs", "the items of the list xs that are greater than {k}, in order",
               "[x for x in xs if x > {k}]", _int_list, numbers),
        Family("count_{k}", "s", "how many times the letter '{k}' appears in the string s", "s.count('{k}')",
               _sentence, _LETTERS),
        Family("starts_with_{k}", "s", "True if the string s starts with the letter '{k}', else False",
               "s.startswith('{k}')", _word, _FIRST_LETTERS),
        Family("add_suffix_{k}", "s", "the string s followed by '{k}'", "s + '{k}'", _word, _SUFFIXES),
        Family("reverse", "s", "the string s reversed", "s[::-1]", _word),
        Family("total", "xs", "the sum of the numbers in the list xs", "sum(xs)", _int_list),
        Family("largest", "xs", "the largest number in the list xs", "max(xs)", _int_list),
        Family("smallest", "xs", "the smallest number in the list xs", "min(xs)", _int_list),
        Family("length", "xs", "the number of items in the list xs", "len(xs)", _int_list),
        Family("shout", "s", "the string s in upper case", "s.upper()", _word),
        Family("is_even", "x", "True if x is even, else False", "x % 2 == 0", _int),
        Family("absolute", "x", "the absolute value of x", "abs(x)", _int),
        Family("squares", "xs", "a list of the squares of the items of the list xs", "[x * x for x in xs]",
               _int_list),
        Family("word_count", "s", "the number of words in the string s", "len(s.split())", _sentence),
    ]


def code_row(rng: random.Random, family: Family, k: Any, tests: int = 3) -> dict:
    """One row: the request, ``tests`` tests on distinct inputs, the entry point and the canonical answer."""
    name, request, source = family.task(k)
    namespace: dict = {}
    exec(compile(source, f"<{name}>", "exec"), namespace)  # our own canonical source, to get expected values
    function = namespace[name]
    inputs: list = []
    outputs: list = []
    for attempt in range(400):
        value = family.inputs(rng, k)
        if value in inputs:
            continue
        result = function(value)
        # The last test must not repeat an answer every other test gave (where the family allows): then a
        # constant ("return False") cannot pass them all.
        if len(inputs) == tests - 1 and attempt < 300 and all(out == result for out in outputs):
            continue
        inputs.append(value)
        outputs.append(result)
        if len(inputs) == tests:
            break
    checks = [f"assert {name}({value!r}) == {result!r}" for value, result in zip(inputs, outputs)]
    answer = f"```python\n{source}```"
    return {"messages": [{"role": "user", "content": request}, {"role": "assistant", "content": answer}],
            "prompt": [{"role": "user", "content": request}], "tests": checks, "entry_point": name}


def code_rows(n: int, *, seed: int = 0, max_operand: int = 20) -> list[dict]:
    """``n`` rows: every (family, parameter) task once in a seeded order, then again (new test inputs)."""
    rng = random.Random(seed)
    tasks = [(family, k) for family in families(max_operand) for k in family.params]
    rng.shuffle(tasks)
    return [code_row(rng, *tasks[i % len(tasks)]) for i in range(n)]
