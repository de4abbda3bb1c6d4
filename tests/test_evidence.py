"""Finding gold answers in text, and an evidence corpus for an open-domain question set."""

import json

import pyarrow.parquet as pq

from conftest import SHARED, WIKI

from retro_ray.evaluation.evidence import AnswerMatcher, answer_recall, coverage, normalize, select_evidence


def test_answers_match_as_whole_normalised_words():
    matcher = AnswerMatcher([["Paris"], ["the U.S. Army"], ["1990", "nineteen ninety"], ["the"]])
    assert matcher.found("He moved to PARIS, France in 1990.") == {0, 2}
    assert matcher.found("Parisian art of 19900") == set()  # whole words only
    assert matcher.found("served in the US army") == {1}  # punctuation and articles normalised away
    assert normalize("The  U.S.-Army!") == "usarmy"


def test_answer_recall_counts_the_first_passage_with_an_answer():
    passages = [["nothing", "Paris is here", "x"], ["no", "no"], ["1990 it was"]]
    recall = answer_recall(passages, [["paris"], ["yes"], ["1990"]], ks=(1, 2, 20))
    assert recall == {"1": 1 / 3, "2": 2 / 3, "20": 2 / 3}
    assert coverage(["a text about Paris", "and 1990"], [["paris"], ["yes"], ["1990"]]) == 2 / 3


def test_evidence_holds_answers_and_four_times_as_many_distractors():
    table = pq.read_table(WIKI, columns=["title", "text"]).slice(0, 300)
    titles, texts = table.column("title").to_pylist(), table.column("text").to_pylist()
    questions = []
    for line in (SHARED / "qa" / "nq-open-dev.jsonl").read_text().splitlines()[:60]:
        row = json.loads(line)
        questions.append({"question": row["question"], "answers": row["answer"]})
    chosen, report = select_evidence(zip(titles, texts), questions, per_question=1, distractors=4.0, seed=0)
    matcher = AnswerMatcher([q["answers"] for q in questions])
    holding = [i for i in chosen if matcher.found(f"{titles[i]} {texts[i]}")]
    assert report["articles"] == 300 and report["distractors"] == 4 * report["with_answer"]
    assert len(chosen) == report["with_answer"] + report["distractors"] == len(set(chosen))
    assert len(holding) >= report["with_answer"]  # a distractor may hold an answer too
    covered = coverage((f"{titles[i]} {texts[i]}" for i in chosen), [q["answers"] for q in questions])
    assert covered == report["answer_coverage"] > 0  # every question with an answer somewhere keeps one
    again, _ = select_evidence(zip(titles, texts), questions, per_question=1, distractors=4.0, seed=0)
    assert again == chosen  # seeded
