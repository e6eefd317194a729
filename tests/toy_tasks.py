"""A toy matching task with a learnable rule: two texts match exactly when they name the same noun.

Texts read ``"the <adjective> <noun> <verb>"`` (every word is in the tiny tokenizers' vocabulary,
tests/unit/conftest.py). A positive pair shares the noun and nothing else; a negative pair
shares the adjective and the verb but not the noun, so word overlap points the wrong way and
only the rule separates the two. Used by the teacher fine-tuning and distillation tests.
"""

from __future__ import annotations

import random

import pandas as pd

NOUNS = ("cat", "dog", "bird", "horse", "car", "bike", "guitar", "piano", "ball", "table", "man", "woman")
ADJECTIVES = ("red", "blue", "green", "big", "small", "young", "old", "happy", "sad", "fast", "slow")
VERBS = ("sits", "runs", "rides", "eats", "jumps", "sleeps", "walks", "cooks", "reads", "sings", "plays")


def text(adjective: str, noun: str, verb: str) -> str:
    return f"the {adjective} {noun} {verb}"


def noun_of(sentence: str) -> str:
    """The noun of a toy text: the rule's whole input."""
    return sentence.split()[2]


def _other(options: tuple[str, ...], not_this: str, rng: random.Random) -> str:
    return rng.choice([o for o in options if o != not_this])


def rule_pairs(n: int, seed: int) -> list[tuple[str, str, bool]]:
    """``n`` pairs ``(text_a, text_b, match)``, alternating positive and negative."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        adjective, noun, verb = rng.choice(ADJECTIVES), NOUNS[i // 2 % len(NOUNS)], rng.choice(VERBS)
        anchor = text(adjective, noun, verb)
        if i % 2 == 0:  # same noun, different adjective and verb
            other = text(_other(ADJECTIVES, adjective, rng), noun, _other(VERBS, verb, rng))
        else:  # same adjective and verb, different noun
            other = text(adjective, _other(NOUNS, noun, rng), verb)
        rows.append((anchor, other, i % 2 == 0))
    return rows


def mined_rows(n_anchors: int, k: int, seed: int) -> list[tuple[str, str, list[str]]]:
    """``(anchor, positive, K hard negatives)``: the negatives keep the anchor's adjective and verb."""
    rng = random.Random(seed)
    rows = []
    seen: set[str] = set()
    while len(rows) < n_anchors:
        adjective, noun, verb = rng.choice(ADJECTIVES), NOUNS[len(rows) % len(NOUNS)], rng.choice(VERBS)
        anchor = text(adjective, noun, verb)
        if anchor in seen:
            continue
        seen.add(anchor)
        positive = text(_other(ADJECTIVES, adjective, rng), noun, _other(VERBS, verb, rng))
        nouns = rng.sample([x for x in NOUNS if x != noun], k)
        rows.append((anchor, positive, [text(adjective, x, verb) for x in nouns]))
    return rows


def pair_table(rows: list[tuple[str, str, bool]], split: str, task: str = "sym") -> pd.DataFrame:
    """Rows in the canonical pair-table layout (docs/architecture.md), as a class dataset."""
    return pd.DataFrame(
        {
            "text_a": [r[0] for r in rows],
            "text_b": [r[1] for r in rows],
            "label": [0.0 if r[2] else 1.0 for r in rows],
            "label_name": ["match" if r[2] else "other" for r in rows],
            "task": task,
            "source": "toy",
            "split": split,
            "is_positive": [r[2] for r in rows],
        }
    )
