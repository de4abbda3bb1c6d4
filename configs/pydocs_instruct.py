"""Writes ``pydocs-instruct.jsonl``: the quick start's instruction data, made from the embedded
Python documentation (``builtin:pydocs``) so that it needs no download.

Every module docstring and ``pydoc`` topic gives one QA row: a question about the module or
statement, answered by the first sentence of its documentation, with the document's opening
(about 100 words, holding that sentence) as its gold context and the module or topic as its
title, as InstructRetro tunes on QA rows with gold context. Documents that ``pydocs-qa.jsonl``
asks about are left out: the QA set (and ``demo-questions.jsonl``, asked about the same
documents) stays unseen.

    .venv/bin/python configs/pydocs_instruct.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydoc_data.topics import topics

from retro_ray.corpus import builtin_pydocs

HERE = Path(__file__).resolve().parent
MAX_WORDS = 40
CONTEXT_WORDS = 100


def first_sentence(title: str, text: str) -> str | None:
    """The first prose sentence after the title (and a reST heading's ``*`` line), or None."""
    body = " ".join(text.split("\n", 1)[-1].split()).removeprefix(f"{title} ")
    body = re.sub(r"^.*?\*{3,}\s*", "", body) if "***" in body[:200] else body
    match = re.match(r"(.+?[.:])(\s|$)", body)
    sentence = match.group(1).removesuffix(":") + ("." if match.group(1).endswith(":") else "") if match else None
    if not sentence or sentence.startswith(("New in", "Changed in", "Deprecated")) or len(sentence.split()) < 4 or len(sentence.split()) > MAX_WORDS or "::=" in sentence:
        return None
    return sentence


def opening(text: str, answer: str) -> str:
    """The document's first CONTEXT_WORDS words, or as many more as reach the end of its answer."""
    words = text.split()
    before = " ".join(words).find(answer.rstrip(".:"))
    end = len(" ".join(words)[:before].split()) + len(answer.split()) if before >= 0 else 0
    return " ".join(words[: max(CONTEXT_WORDS, end)])


def question(title: str, text: str) -> str:
    """A topic (``pydoc`` keyword) is asked about by its heading, a module by its name."""
    if title in topics:
        heading = re.search(r"^(.+)\n\*{3,}", text, re.M)
        return f"What does the Python documentation say about {heading.group(1) if heading else title}?"
    return f"What is the Python module {title} for?"


def main() -> None:
    held_out = {json.loads(line)["doc"] for line in (HERE / "pydocs-qa.jsonl").read_text().splitlines() if line}
    rows = []
    for doc in builtin_pydocs():
        if doc["title"] in held_out or doc["title"].startswith("_"):
            continue
        answer = first_sentence(doc["title"], doc["text"])
        if answer:
            context = opening(doc["text"], answer)
            rows.append({"question": question(doc["title"], doc["text"]), "answer": answer, "title": doc["title"],
                         "context": context})
    out = HERE / "pydocs-instruct.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{len(rows)} rows -> {out}")


if __name__ == "__main__":
    main()
