"""Split documents longer than the student's input into overlapping passages, by tokens.

The student truncates every text at ``student.max_length`` tokens, so a long document indexed
as one text would lose its tail without a trace. ``split_passages`` cuts each document into
windows of at most ``window`` tokens (special tokens excluded) whose starts are ``stride``
tokens apart; a passage is a character span of its document, cut at word boundaries, so the
passage text is the document's own text (no detokenisation). Documents that fit are one
passage: the whole text.

Spans are checked by tokenising each cut passage again: a span that re-tokenises to more than
``window`` tokens (a word split differently at the cut) loses its last word until it fits, and
the next window starts no later than where this one ends, so no text is ever dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from d2llm.errors import ConfigError


@dataclass(frozen=True)
class PassageSpans:
    """Passage ``i`` is ``texts[doc[i]][start[i]:end[i]]``; passages of a document are contiguous."""

    doc: np.ndarray  # int64 [P]: document position
    start: np.ndarray  # int64 [P]: first character
    end: np.ndarray  # int64 [P]: one past the last character

    def __len__(self) -> int:
        return int(self.doc.size)

    @classmethod
    def one_per_document(cls, texts: Sequence[str]) -> PassageSpans:
        n = len(texts)
        return cls(
            np.arange(n, dtype=np.int64), np.zeros(n, dtype=np.int64), np.array([len(t) for t in texts])
        )

    def text(self, texts: Sequence[str], i: int) -> str:
        return texts[int(self.doc[i])][int(self.start[i]) : int(self.end[i])]

    def texts(self, texts: Sequence[str]) -> list[str]:
        """Every passage's text, in position order."""
        return [self.text(texts, i) for i in range(len(self))]

    def first_passages(self, n_docs: int | None = None) -> np.ndarray:
        """The position of each document's first passage (passages of a document are contiguous
        and documents in order, so this is where each document's run begins)."""
        n = int(self.doc[-1]) + 1 if n_docs is None and self.doc.size else int(n_docs or 0)
        return np.searchsorted(self.doc, np.arange(n))

    def best_per_document(self, passage_scores: np.ndarray, n_docs: int) -> np.ndarray:
        """Each document's best passage score (-inf for a document without passages)."""
        best = np.full(n_docs, -np.inf)
        np.maximum.at(best, self.doc, passage_scores)
        return best

    def passages_of(self, docs: np.ndarray) -> np.ndarray:
        """Every passage position of the documents ``docs``, in position order."""
        docs = np.unique(np.asarray(docs, dtype=np.int64))
        starts = np.searchsorted(self.doc, docs, side="left")
        ends = np.searchsorted(self.doc, docs, side="right")
        if docs.size == 0:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in zip(starts, ends, strict=True)])


def passage_window(tokenizer: Any, max_length: int, window: int | None) -> int:
    """The window in tokens: ``window``, or all the student's ``max_length`` minus special tokens.

    A window that would not fit in ``max_length`` is a config error: the student would truncate it.
    """
    room = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    if window is None:
        return room
    if window > room:
        raise ConfigError(
            f"search.passage_window {window} does not fit the student: max_length {max_length} minus "
            f"{max_length - room} special tokens leaves {room} tokens; passages would be truncated"
        )
    return window


def _word_bounds(encoding: Any, window: int) -> list[tuple[int, int, int, int]]:
    """(first token, one past last token, first char, one past last char) of each word.

    A word of more tokens than the window (a URL, a hash) is cut into pieces of half a window:
    re-tokenised on their own, such pieces still fit the window.
    """
    words: list[tuple[int, int, int, int]] = []
    previous = None
    for t, (word, (c0, c1)) in enumerate(zip(encoding.word_ids, encoding.offsets, strict=True)):
        if word is None:
            continue
        if word == previous and words:
            w0, _, s0, e0 = words[-1]
            words[-1] = (w0, t + 1, s0, max(c1, e0))
        else:
            words.append((t, t + 1, c0, c1))
        previous = word
    piece = max(1, window // 2)
    out: list[tuple[int, int, int, int]] = []
    for w0, w1, s0, e0 in words:
        if w1 - w0 <= window:
            out.append((w0, w1, s0, e0))
            continue
        for t0 in range(w0, w1, piece):
            t1 = min(t0 + piece, w1)
            c0 = s0 if t0 == w0 else encoding.offsets[t0][0]
            c1 = e0 if t1 == w1 else encoding.offsets[t1][0]
            out.append((t0, t1, c0, c1))
    return out


def _split_words(
    words: list[tuple[int, int, int, int]], window: int, stride: int, fits: Any
) -> list[tuple[int, int]]:
    """Character spans covering every word: greedy windows of whole words (long words alone)."""
    spans = []
    i = 0
    while i < len(words):
        j = i + 1  # at least one word (each fits the window, see _word_bounds)
        while j < len(words) and words[j][1] - words[i][0] <= window:
            j += 1
        while j > i + 1 and not fits(words[i][2], words[j - 1][3]):
            j -= 1
        spans.append((words[i][2], words[j - 1][3]))
        if j == len(words):
            break
        # The next window starts `stride` tokens later, but never after this one's end (no gap).
        nxt = i + 1
        while nxt < j and words[nxt][0] - words[i][0] < stride:
            nxt += 1
        i = nxt
    return spans


def split_passages(
    texts: Sequence[str], tokenizer: Any, window: int, stride: int, chunk_docs: int = 1024
) -> PassageSpans:
    """Passage spans of ``texts``: one per document that fits ``window`` tokens, several otherwise.

    Tokenises ``chunk_docs`` documents at a time, so memory holds one chunk's tokens at most.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("splitting documents into passages needs a fast tokenizer (token offsets)")
    if not 1 <= stride <= window:
        raise ConfigError(f"search.passage_stride must be in [1, passage_window={window}], got {stride}")

    def fits(text: str, c0: int, c1: int) -> bool:
        return len(tokenizer(text[c0:c1], add_special_tokens=False, verbose=False)["input_ids"]) <= window

    doc, start, end = [], [], []
    for first in range(0, len(texts), chunk_docs):
        chunk = [str(t) for t in texts[first : first + chunk_docs]]
        # verbose=False: long documents are expected here, no "longer than the maximum" warning.
        encoded = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        for k, text in enumerate(chunk):
            position = first + k
            if len(encoded["input_ids"][k]) <= window:
                doc.append(position)
                start.append(0)
                end.append(len(text))
                continue
            words = _word_bounds(encoded.encodings[k], window)
            for c0, c1 in _split_words(words, window, stride, lambda a, b, t=text: fits(t, a, b)):
                doc.append(position)
                start.append(c0)
                end.append(c1)
    return PassageSpans(
        np.array(doc, dtype=np.int64), np.array(start, dtype=np.int64), np.array(end, dtype=np.int64)
    )
