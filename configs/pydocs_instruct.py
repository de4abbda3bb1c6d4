"""Writes ``pydocs-instruct.jsonl``: the quick start's instruction data, made from the embedded
Python documentation (``builtin:pydocs``) so that it needs no download.

Every module docstring and ``pydoc`` topic gives one QA row, answered from the first sentence of
its documentation, with the document's opening (about 60 words, holding that sentence) as its
gold context and the module or topic as its title, as InstructRetro tunes on QA rows with gold
context, placed at random among the openings of two other documents: serving gives a question
three passages, and a model tuned on one learns to answer from whichever it reads first. The question is phrased in one of several ways, in turn (what a module is for, what it
does, which module a description names, what the documentation says about a statement...), as
the reference's blend of many QA sets asks what, which and how, for short spans and sentences.
Documents that ``pydocs-qa.jsonl`` or ``demo-questions.jsonl`` ask about are left out: the QA set
and the demo stay unseen.

    .venv/bin/python configs/pydocs_instruct.py
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from pydoc_data.topics import topics

from retro_ray.database.corpus import builtin_pydocs

HERE = Path(__file__).resolve().parent
MAX_WORDS = 40
CONTEXT_WORDS = 60
DISTRACTORS = 2
"""Openings of other documents beside the gold one: serving gives several passages, and the
model learns to answer from the one its question is about."""
DISTRACTOR_WORDS = 40


def first_sentence(title: str, text: str) -> str | None:
    """The first prose sentence after the title (and a reST heading's ``*`` line), or None."""
    body = " ".join(text.split("\n", 1)[-1].split()).removeprefix(f"{title} ")
    body = re.sub(r"^.*?\*{3,}\s*", "", body) if "***" in body[:200] else body
    match = re.match(r"(.+?[.:])(\s|$)", body)
    sentence = match.group(1).removesuffix(":") + ("." if match.group(1).endswith(":") else "") if match else None
    if not sentence or sentence.startswith(("New in", "Changed in", "Deprecated")) or len(sentence.split()) < 4 or len(sentence.split()) > MAX_WORDS or "::=" in sentence:
        return None
    return sentence


def opening(text: str, answer: str, words_wanted: int) -> str:
    """The document's first ``words_wanted`` words, or as many more as reach the end of its answer."""
    words = text.split()
    before = " ".join(words).find(answer.rstrip(".:")) if answer else -1
    end = len(" ".join(words)[:before].split()) + len(answer.split()) if before >= 0 else 0
    return " ".join(words[: max(words_wanted, end)])


def question(title: str, text: str, answer: str, turn: int) -> tuple[str, str]:
    """The ``turn``-th phrasing of a question about a document -> (question, answer). A topic
    (``pydoc`` keyword) is asked about by its heading, a module by its name; one phrasing in
    each asks for the name a description belongs to (a short span)."""
    if title in topics:
        found = re.search(r"^(.+)\n\*{3,}", text, re.M)
        heading = found.group(1) if found else title
        forms = [(f"What does the Python documentation say about {heading}?", answer),
                 (f"What is {heading[0].lower() + heading[1:]} in Python?", answer),
                 (f"How does the Python language reference describe {heading}?", answer),
                 (f"Which topic of the Python language reference is about this: {answer}", heading)]
    else:
        forms = [(f"What is the Python module {title} for?", answer),
                 (f"What does the {title} module do?", answer),
                 (f"Describe the Python module {title} in one sentence.", answer),
                 (f"Which Python module is documented as: {answer}", title)]
    return forms[turn % len(forms)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--distractors", type=int, default=DISTRACTORS)
    parser.add_argument("--context-words", type=int, default=CONTEXT_WORDS)
    parser.add_argument("--out", default=str(HERE / "pydocs-instruct.jsonl"))
    args = parser.parse_args()
    held_out = {json.loads(line)["doc"] for name in ("pydocs-qa.jsonl", "demo-questions.jsonl")
                for line in (HERE / name).read_text().splitlines() if line}
    docs = [d for d in builtin_pydocs() if d["title"] not in held_out and not d["title"].startswith("_")]
    rng = random.Random(0)
    rows = []
    for doc in docs:
        answer = first_sentence(doc["title"], doc["text"])
        if not answer:
            continue
        asked, said = question(doc["title"], doc["text"], answer, len(rows))
        context = [{"title": doc["title"], "text": opening(doc["text"], answer, args.context_words)}]
        for other in rng.sample([d for d in docs if d is not doc], args.distractors):
            context.append({"title": other["title"], "text": opening(other["text"], "", DISTRACTOR_WORDS)})
        rng.shuffle(context)  # the gold passage anywhere among them, as retrieval ranks it
        rows.append({"question": asked, "answer": said, "title": doc["title"], "context": context})
    out = Path(args.out)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{len(rows)} rows -> {out}")


if __name__ == "__main__":
    main()
