"""``instruct``: short instructions with reference answers, for BLEU-rewarded RL (BLEUBERI).

BLEUBERI (Chang et al., 2025, "BLEUBERI: BLEU is a surprisingly effective reward for
instruction following") trains on instructions whose reward is BLEU against reference
answers. This is a tiny, deterministic stand-in for such data: instructions a small model
can follow (repeat, upper-case, sort or reverse words, count words, replace a word, make a
numbered list, answer a sum in a sentence, write a one-line thank-you note or description,
turn a statement into a question). A row has

  - ``prompt``: the instruction as a user turn;
  - ``references``: one to three acceptable answers (the ``bleu`` reward scores against all
    of them, as BLEUBERI does with several references per instruction);
  - ``messages``: the instruction and the first reference, for SFT before RL.

The first reference, given as the completion, scores BLEU 1.0.
"""

from __future__ import annotations

import random
from collections.abc import Callable

NOUNS = ("house", "school", "water", "mother", "father", "boy", "world", "picture", "page", "food", "country",
         "letter", "animal", "light", "number", "home", "night", "year", "study", "question", "answer", "land")
ADJECTIVES = ("small", "big", "large", "old", "new", "good", "great", "little", "long", "high", "different",
              "important")
VERBS = ("found", "saw", "made", "took", "wanted", "kept", "gave", "read", "showed", "asked for")


def sentence(rng: random.Random) -> str:
    """A short sentence such as "The old house saw the food." """
    noun, other = rng.sample(NOUNS, 2)
    return f"The {rng.choice(ADJECTIVES)} {noun} {rng.choice(VERBS)} the {other}."


def _words(rng: random.Random) -> list[str]:
    return rng.sample(NOUNS + ADJECTIVES, rng.randint(3, 5))


def _repeat(rng: random.Random, top: int) -> tuple[str, list[str]]:
    s = sentence(rng)
    return f"Repeat this sentence word for word: {s}", [s]


def _upper(rng: random.Random, top: int) -> tuple[str, list[str]]:
    s = sentence(rng)
    return f"Write this sentence in capital letters: {s}", [s.upper()]


def _sort(rng: random.Random, top: int) -> tuple[str, list[str]]:
    words = _words(rng)
    done = sorted(words)
    return f"Sort these words alphabetically: {', '.join(words)}", [", ".join(done), " ".join(done)]


def _reverse(rng: random.Random, top: int) -> tuple[str, list[str]]:
    words = _words(rng)
    done = words[::-1]
    return f"List these words in reverse order: {', '.join(words)}", [", ".join(done), " ".join(done)]


def _count(rng: random.Random, top: int) -> tuple[str, list[str]]:
    s = sentence(rng)
    n = len(s.split())
    return (f"How many words are in this sentence? {s}",
            [f"There are {n} words in the sentence.", f"The sentence has {n} words.", f"{n} words."])


def _numbered(rng: random.Random, top: int) -> tuple[str, list[str]]:
    words = _words(rng)
    return (f"Make a numbered list of these words: {', '.join(words)}",
            ["\n".join(f"{i}. {w}" for i, w in enumerate(words, 1)), "\n".join(f"{i}) {w}" for i, w in enumerate(words, 1))])


def _replace(rng: random.Random, top: int) -> tuple[str, list[str]]:
    noun, other, new = rng.sample(NOUNS, 3)
    adjective = rng.choice(ADJECTIVES)
    s = f"The {adjective} {noun} {rng.choice(VERBS)} the {other}."
    return f'Replace the word "{noun}" with "{new}" in this sentence: {s}', [s.replace(f" {noun} ", f" {new} ")]


def _last_word(rng: random.Random, top: int) -> tuple[str, list[str]]:
    s = sentence(rng)
    word = s.rstrip(".").split()[-1]
    return (f"What is the last word of this sentence? {s}",
            [f'The last word is "{word}".', f"The last word is {word}.", word])


def _sum(rng: random.Random, top: int) -> tuple[str, list[str]]:
    a, b = rng.randint(0, top), rng.randint(0, top)
    return (f"What is {a} plus {b}? Answer with a full sentence.",
            [f"{a} plus {b} is {a + b}.", f"The answer is {a + b}.", f"{a} + {b} = {a + b}."])


def _thanks(rng: random.Random, top: int) -> tuple[str, list[str]]:
    adjective, noun = rng.choice(ADJECTIVES), rng.choice(NOUNS)
    return (f"Write a one-line thank-you note for the {adjective} {noun}.",
            [f"Thank you for the {adjective} {noun}.", f"Thanks a lot for the {adjective} {noun}!",
             f"Thank you so much for the {adjective} {noun}, I like it very much."])


def _describe(rng: random.Random, top: int) -> tuple[str, list[str]]:
    adjective, noun = rng.choice(ADJECTIVES), rng.choice(NOUNS)
    return (f'Describe the {noun} in one sentence using the word "{adjective}".',
            [f"The {noun} is {adjective}.", f"It is a {adjective} {noun}.", f"This {noun} is very {adjective}."])


def _question(rng: random.Random, top: int) -> tuple[str, list[str]]:
    adjective, noun = rng.choice(ADJECTIVES), rng.choice(NOUNS)
    return (f"Turn this statement into a yes-or-no question: The {noun} is {adjective}.",
            [f"Is the {noun} {adjective}?"])


INSTRUCTIONS: dict[str, Callable[[random.Random, int], tuple[str, list[str]]]] = {
    "repeat": _repeat, "upper": _upper, "sort": _sort, "reverse": _reverse, "count": _count, "numbered": _numbered,
    "replace": _replace, "last_word": _last_word, "sum": _sum, "thanks": _thanks, "describe": _describe,
    "question": _question,
}


def instruct_rows(n: int, *, seed: int = 0, max_operand: int = 20) -> list[dict]:
    """``n`` rows cycling through the instruction kinds in a seeded order (sums go up to ``max_operand``)."""
    rng = random.Random(seed)
    kinds = list(INSTRUCTIONS)
    rows = []
    for i in range(n):
        if i % len(kinds) == 0:
            rng.shuffle(kinds)
        request, references = INSTRUCTIONS[kinds[i % len(kinds)]](rng, max_operand)
        rows.append({"messages": [{"role": "user", "content": request},
                                  {"role": "assistant", "content": references[0]}],
                     "prompt": [{"role": "user", "content": request}], "references": references})
    return rows
