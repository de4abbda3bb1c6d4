"""Where the answers are: gold answers found in passages, documents and corpora.

- ``AnswerMatcher`` finds which questions' gold answers occur in a text, as DPR's ``has_answer``
  does it: both normalised as SQuAD normalises (lower case, no punctuation, no articles), the
  answer as a whole-word run of the text. Aho-Corasick (``pyahocorasick``), so one pass over a
  text serves thousands of questions.
- ``answer_recall``: the share of questions with a gold answer in their top k passages (DPR's
  top-k retrieval accuracy).
- ``select_evidence``: an evidence corpus for an open-domain QA set at a small scale: from a
  corpus of articles (Wikipedia), the articles that hold a question's gold answer among words of
  the question, plus a stated multiple of other articles as distractors.

Imports neither torch nor Ray.
"""

from __future__ import annotations

import heapq
import re
import string
from collections.abc import Iterable, Iterator

import numpy as np

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_STOPWORDS = frozenset(
    "what who whom whose which when where why how is are was were be been do does did of in on at to for from "
    "by with and or as that this these those it its into about than there their they he she his her i you we "
    "not no has have had can will would should could name called".split())


def normalize(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation removed, a/an/the removed, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


class AnswerMatcher:
    """Which questions have a gold answer in a text. ``answers[q]``: question q's gold answers."""

    def __init__(self, answers: list[list[str]]):
        import ahocorasick

        self.automaton = ahocorasick.Automaton()
        keys: dict[str, list[int]] = {}
        for q, golds in enumerate(answers):
            for gold in golds:
                key = normalize(gold)
                if key:
                    keys.setdefault(f" {key} ", []).append(q)
        for key, questions in keys.items():
            self.automaton.add_word(key, questions)
        self.empty = not keys
        if not self.empty:
            self.automaton.make_automaton()

    def found(self, text: str) -> set[int]:
        """The questions whose gold answer occurs in ``text``."""
        return {q for q, _ in self.occurrences(normalize(text))}

    def occurrences(self, normalized: str) -> Iterator[tuple[int, int]]:
        """(question, end offset) of every gold answer occurring in an already ``normalize``d text."""
        if self.empty:
            return
        for end, questions in self.automaton.iter(f" {normalized} "):
            for q in questions:
                yield q, end


def answer_recall(passages: list[list[str]], answers: list[list[str]], ks: Iterable[int] = (1, 5, 20)) -> dict[str, float]:
    """{k: share of questions with a gold answer in their first k passages} (``passages[q]``
    ranked best first; a question with fewer passages is scored on those it has)."""
    first = []  # per question: the rank of its first passage with an answer (inf: none)
    for texts, golds in zip(passages, answers):
        matcher = AnswerMatcher([golds])
        first.append(next((rank for rank, text in enumerate(texts) if matcher.found(text)), float("inf")))
    n = max(len(first), 1)
    return {str(k): sum(rank < k for rank in first) / n for k in ks}


def coverage(documents: Iterable[str], answers: list[list[str]]) -> float:
    """The share of questions whose gold answer occurs in at least one of ``documents``."""
    matcher, covered = AnswerMatcher(answers), set()
    for text in documents:
        covered |= matcher.found(text)
    return len(covered) / max(len(answers), 1)


def _content_words(text: str) -> set[str]:
    return {w for w in normalize(text).split() if w not in _STOPWORDS}


WINDOW_CHARS = 300
"""Text on either side of an answer occurrence that tells whether the article is about the
question (about 50 words each way: a DPR passage around the answer)."""


def select_evidence(articles: Iterator[tuple[str, str]], questions: list[dict], per_question: int = 1,
                    distractors: float = 4.0, seed: int = 0) -> tuple[list[int], dict]:
    """Choose an evidence corpus for ``questions`` ({question, answers}) from ``articles`` ((title,
    text) in a fixed order, read once) -> (chosen article indices in corpus order, report).

    For each question, the ``per_question`` articles holding one of its gold answers where the
    answer's neighbourhood (``WINDOW_CHARS`` either side) shares the most content words with the
    question, then the article's own share as the tie-break: an article about the question, not
    one where a short answer ("1990", "Donna") occurs by chance. Then ``distractors`` times as many
    other articles drawn uniformly at random (seeded). The report says how many of each, the share
    of questions with an answer-holding article (``answer_coverage``), and the share whose
    evidence holds the answer beside at least half of the question's content words
    (``evidence_coverage``: the evidence is about the question)."""
    matcher = AnswerMatcher([q["answers"] for q in questions])
    words = [_content_words(q["question"]) for q in questions]
    best: list[list[tuple[float, float, int]]] = [[] for _ in questions]  # per question: a min-heap of scores
    total = 0
    for index, (title, text) in enumerate(articles):
        total += 1
        normalized = normalize(f"{title} {text}")
        window: dict[int, float] = {}
        for q, end in matcher.occurrences(normalized):
            near = set(normalized[max(0, end - WINDOW_CHARS): end + WINDOW_CHARS].split()) & words[q]
            window[q] = max(window.get(q, 0.0), len(near) / max(len(words[q]), 1))
        if not window:
            continue
        present = set(normalized.split())
        for q, near in window.items():
            entry = (near, len(words[q] & present) / max(len(words[q]), 1), -index)  # ties: the earlier article
            if len(best[q]) < per_question:
                heapq.heappush(best[q], entry)
            elif entry > best[q][0]:
                heapq.heapreplace(best[q], entry)
    holding = sorted({-i for heap in best for _, _, i in heap})
    others = np.setdiff1d(np.arange(total), holding)
    n_other = min(len(others), int(round(distractors * len(holding))))
    drawn = np.random.default_rng(seed).choice(others, size=n_other, replace=False) if n_other else []
    chosen = sorted(holding + [int(i) for i in drawn])
    n = max(len(questions), 1)
    report = {"articles": total, "with_answer": len(holding), "distractors": n_other,
              "questions": len(questions), "answer_coverage": sum(bool(h) for h in best) / n,
              "evidence_coverage": sum(any(near >= 0.5 for near, _, _ in h) for h in best) / n,
              "how": f"for each question the {per_question} article(s) holding a gold answer (SQuAD-normalised, "
                     f"whole words) whose text around the answer shares the most content words with the question, "
                     f"plus {distractors:g}x as many other articles drawn at random (seed {seed})"}
    return chosen, report
