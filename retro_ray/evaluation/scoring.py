"""QA scores two ways: InstructRetro's own (Megatron's ``tools/retro/text_generation``) and SQuAD's.

``reference``: what the reference scores is the whole continuation up to the end of text, with
newlines as spaces (``retro_text_generation.py``). Its EM (``evaluate.py``: ``read_prediction``
strips "Answer:" and "A:" markers) is the best over the gold answers after SQuAD's
normalisation; its F1 (``metrics.py``: ``F1Metric``) replaces punctuation with spaces rather
than deleting it and compares with the first gold answer only, skipping questions whose first
answer is empty.

``squad``: the official SQuAD v1.1 script's EM and F1 (punctuation deleted, the best over the
gold answers) on the answer span: the first line of the continuation, without a leading
"The answer is".
"""

from __future__ import annotations

import collections
import re

from retro_ray.evaluation.evidence import normalize

REFERENCE_PUNCTUATION = re.compile(r"[!\"#$%&()*+,-./:;<=>?@\[\]\\^`{|}~_']")
"""``metrics.py``'s ``re_punc`` (``,-.`` is the range of ",", "-" and ".")."""
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_MARKERS = ("Answer:", "Answer: ", "????  ", "A: ", "A:")
"""What ``evaluate.py``'s ``read_prediction`` removes from a prediction before its EM, in order."""


def reference_prediction(continuation: str) -> str:
    """The text the reference keeps of a generation: up to the end of text, newlines as spaces."""
    return continuation.split("<|endoftext|>")[0].replace("\n", " ").strip()


def reference_em(prediction: str, golds: list[str]) -> float:
    for marker in _MARKERS:
        prediction = prediction.replace(marker, "")
    prediction = normalize(prediction.strip())
    return max((float(prediction == normalize(g)) for g in golds), default=0.0)


def _reference_normalize(text: str) -> str:
    return " ".join(_ARTICLES.sub(" ", REFERENCE_PUNCTUATION.sub(" ", text.lower())).split())


def reference_f1(prediction: str, golds: list[str]) -> float | None:
    """Unigram F1 with the first gold answer; None when it is empty (the reference skips it)."""
    answer, guess = (golds[0].strip() if golds else ""), prediction.strip()
    if not answer:
        return None
    if not guess:
        return 0.0
    return _f1(_reference_normalize(guess).split(), _reference_normalize(answer).split())


def _f1(pred: list[str], gold: list[str]) -> float:
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def extract_answer(continuation: str) -> str:
    """The answer span of a generation: its first line, without a leading "The answer is"."""
    line = continuation.strip().split("\n")[0].strip()
    return re.sub(r"^(the answer is)\s*:?\s*", "", line, flags=re.IGNORECASE).strip()


def squad_em(answer: str, golds: list[str]) -> float:
    return max((float(normalize(answer) == normalize(g)) for g in golds), default=0.0)


def squad_f1(answer: str, golds: list[str]) -> float:
    """Unigram F1 of the normalised answers (0 when they share no word), the best over the golds."""
    tokens = normalize(answer).split()
    return max((_f1(tokens, normalize(g).split()) for g in golds), default=0.0)


def score(continuation: str, golds: list[str]) -> dict:
    """A generation against its gold answers: both scorings and the texts they scored."""
    prediction, answer = reference_prediction(continuation), extract_answer(continuation)
    return {"prediction": prediction, "answer": answer, "em": reference_em(prediction, golds),
            "f1": reference_f1(prediction, golds), "em_squad": squad_em(answer, golds),
            "f1_squad": squad_f1(answer, golds)}


def mean_scores(rows: list[dict]) -> dict:
    """Percentages over scored rows: ``em``, ``f1`` (reference), ``em_squad``, ``f1_squad``, and ``n``."""
    out = {"n": len(rows)}
    for key in ("em", "f1", "em_squad", "f1_squad"):
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = 100 * sum(values) / max(len(values), 1)
    return out
