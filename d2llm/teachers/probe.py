"""A fixed probe of text pairs that tells whether an approximation keeps a teacher's judgement.

int8 dynamic quantisation (``teacher.quantize("int8")``) quantises each Linear layer's input
with one scale per tensor. A small encoder cross-encoder keeps its ranking under it (MiniLM:
dev metrics within 0-2 points), but a decoder LLM does not: its hidden states carry a few
dimensions hundreds of times larger than the rest, and one scale for both rounds the rest to
zero. SmolLM2-135M's yes/no log-odds under int8 correlate with its float32 ones at r = 0.1 (STS-B
dev Spearman 54.7 -> 0.6), which makes every label noise.

So quantisation is checked, not assumed: the teacher scores these pairs before and after, and
the Pearson correlation of its log-odds must reach ``MIN_AGREEMENT``. The pairs are generic
English on purpose (the check runs before any user data is read, and costs two passes over
``len(PROBE_PAIRS)`` pairs): entailed, neutral and contradicting sentence pairs (sym), and
questions with a right and a wrong answer (asym), so that a faithful teacher's scores spread.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from d2llm.evaluation.metrics import pearson

if TYPE_CHECKING:
    from d2llm.config import TaskKind

MIN_AGREEMENT = 0.9  # Pearson r of the log-odds, approximation against float32

PROBE_PAIRS: dict[TaskKind, list[tuple[str, str]]] = {
    "sym": [
        ("A man is playing a guitar on stage.", "A man is playing an instrument."),
        ("A man is playing a guitar on stage.", "Nobody is playing any music."),
        ("Two dogs are running through a field of grass.", "Animals are running outside."),
        ("Two dogs are running through a field of grass.", "The dogs are asleep in their kennel."),
        ("A woman is slicing an onion in the kitchen.", "Someone is preparing food."),
        ("A woman is slicing an onion in the kitchen.", "A woman is driving a truck."),
        ("The children are building a sandcastle on the beach.", "Kids are playing in the sand."),
        ("The children are building a sandcastle on the beach.", "The children are at school."),
        ("An old man is reading a newspaper on a bench.", "A man sits outside and reads."),
        ("An old man is reading a newspaper on a bench.", "A girl is swimming in a pool."),
        ("The stock market fell sharply on Monday.", "Share prices dropped at the start of the week."),
        ("The stock market fell sharply on Monday.", "The weather was sunny all weekend."),
    ],
    "asym": [
        ("What is the capital of France?", "Paris is the capital and largest city of France."),
        ("What is the capital of France?", "The Loire is the longest river in France."),
        ("Who wrote the novel Pride and Prejudice?", "Pride and Prejudice is a novel by Jane Austen."),
        ("Who wrote the novel Pride and Prejudice?", "The novel was adapted for television in 1995."),
        ("How many legs does a spider have?", "Spiders have eight legs and two body segments."),
        ("How many legs does a spider have?", "Many people are afraid of spiders."),
        ("When did the Second World War end?", "The Second World War ended in 1945."),
        ("When did the Second World War end?", "Tanks were used widely during the war."),
        ("What gas do plants absorb from the air?", "Plants take in carbon dioxide for photosynthesis."),
        ("What gas do plants absorb from the air?", "Some plants grow best in the shade."),
        ("What is the boiling point of water at sea level?", "At sea level water boils at 100 degrees."),
        ("What is the boiling point of water at sea level?", "Water covers most of the Earth's surface."),
    ],
}


def agreement(before: np.ndarray, after: np.ndarray) -> float:
    """Pearson r of two score vectors; where r is undefined (a constant side), 1.0 when both
    are equal, else 0.0."""
    r = pearson(before, after)
    if math.isnan(r):
        return 1.0 if np.allclose(before, after) else 0.0
    return r
