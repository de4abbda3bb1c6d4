"""QA scoring: InstructRetro's own (Megatron's tools/retro/text_generation at core_r0.15.0) and the
official SQuAD v1.1 script's, each checked against its reference, reimplemented here from its source."""

import re
import string
from collections import Counter

import numpy as np
import pytest

from retro_ray.evaluation import scoring


# -- the reference, as written in Megatron-LM core_r0.15.0 --------------------------------------------
# tools/retro/text_generation/evaluate.py
def ref_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r'\b(a|an|the)\b', ' ', text)

    def white_space_fix(text):
        return ' '.join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return ''.join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def ref_read_prediction(line):  # read_prediction, for one line of the predictions file
    for marker in ("Answer:", "Answer: ", '????  ', 'A: ', "A:"):
        line = line.replace(marker, "")
    line = line.strip()
    if "<|endoftext|>" in line:
        line = line.replace("<|endoftext|>", "")
    return ref_normalize_answer(line)


def ref_ems(prediction, ground_truths):
    return max([ref_normalize_answer(prediction) == ref_normalize_answer(gt) for gt in ground_truths])


# tools/retro/text_generation/metrics.py
re_art = re.compile(r'\b(a|an|the)\b')
re_punc = re.compile(r'[!"#$%&()*+,-./:;<=>?@\[\]\\^`{|}~_\']')


def ref_metrics_normalize(s):
    s = s.lower()
    s = re_punc.sub(' ', s)
    s = re_art.sub(' ', s)
    return ' '.join(s.split())


def ref_compute_each_pair(guess, answer):  # F1Metric.compute_each_pair, n=1
    if answer == "":
        return None
    if guess == "":
        return 0
    g_tokens = ref_metrics_normalize(guess).split()
    a_tokens = ref_metrics_normalize(answer).split()
    common = Counter(g_tokens) & Counter(a_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(g_tokens)
    recall = 1.0 * num_same / len(a_tokens)
    return (2 * precision * recall) / (precision + recall)


def ref_f1(pred, answers):  # compute_f1_score with load_groundtruth_file's answers[0]
    return ref_compute_each_pair(pred.strip().replace("<|endoftext|>", ""), answers[0].strip())


# the official SQuAD v1.1 evaluate script
def squad_f1(prediction, ground_truth):
    prediction_tokens = ref_normalize_answer(prediction).split()
    ground_truth_tokens = ref_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


TABLE = [  # (continuation after "The answer is", gold answers)
    (" The Eiffel Tower", ["eiffel tower"]),
    (" Paris, France.", ["paris france"]),
    (" Paris-France", ["paris france"]),          # a hyphen: deleted by EM, a space in the reference's F1
    (" in Paris", ["Paris", "Lyon"]),
    (" Lyon", ["Paris", "lyon"]),                 # EM: the best gold; reference F1: the first gold only
    (" New York City", ["New York", "NYC"]),
    ("", ["Paris"]),
    (" the", ["a"]),
    (" Answer: 1066", ["1066"]),                  # the reference strips "Answer:" before EM
    (" 1066.\nUser: and then?", ["1066"]),        # the reference keeps every line; SQuAD's scoring the first
    (" Shakespeare\n\nwrote it", ["William Shakespeare", "Shakespeare"]),
    (" don't know", ["don t know"]),
    (" x", [" "]),                                # an empty first gold: the reference skips its F1
]


@pytest.mark.parametrize("continuation, golds", TABLE)
def test_reference_scoring_equals_megatrons(continuation, golds):
    prediction = continuation.replace("\n", " ").strip()  # retro_text_generation.py: newlines -> spaces
    scored = scoring.score(continuation, golds)
    assert scored["prediction"] == prediction
    assert scored["em"] == float(ref_ems(ref_read_prediction(prediction), golds))
    expected = ref_f1(prediction, golds)
    assert scored["f1"] == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize("continuation, golds", TABLE)
def test_squad_scoring_equals_the_official_script_on_the_first_line(continuation, golds):
    answer = continuation.strip().split("\n")[0].strip()
    answer = re.sub(r"^(the answer is)\s*:?\s*", "", answer, flags=re.IGNORECASE).strip()
    scored = scoring.score(continuation, golds)
    assert scored["answer"] == answer
    assert scored["em_squad"] == float(ref_ems(answer, golds))
    assert scored["f1_squad"] == pytest.approx(max(squad_f1(answer, g) for g in golds))


def test_the_scorings_differ_where_the_reference_says():
    hyphen = scoring.score(" Paris-France", ["paris france"])
    assert hyphen["em"] == 0.0 and hyphen["f1"] == 1.0 and hyphen["em_squad"] == 0.0
    second_gold = scoring.score(" Lyon", ["Paris", "lyon"])
    assert second_gold["em"] == 1.0 and second_gold["f1"] == 0.0 and second_gold["f1_squad"] == 1.0
    two_lines = scoring.score(" 1066.\nUser: and then?", ["1066"])
    assert two_lines["em"] == 0.0 and two_lines["em_squad"] == 1.0
    table = scoring.mean_scores([scoring.score(c, g) for c, g in TABLE])
    assert table["n"] == len(TABLE)
    f1s = [ref_f1(c.replace("\n", " ").strip(), g) for c, g in TABLE]
    assert table["f1"] == pytest.approx(100 * np.mean([f for f in f1s if f is not None]))  # skipped, not zero
