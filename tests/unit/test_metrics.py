"""Judge-free metrics: option-letter parsing, SQuAD-style EM / F1, retrieval recall, aggregation."""

from __future__ import annotations

import pytest

from mukv.eval.metrics import (
    exact_match,
    judge_free_scores,
    multiple_choice_accuracy,
    normalize_answer,
    parse_option_letter,
    recall_scores,
    retrieval_recall,
    token_f1,
)

# Real StreamingBench options: three of them start with the article "A".
ARTICLES = ["A compass.", "A map.", "An altitude meter.", "A weather radar."]
COLOURS = ["Black.", "Red and green.", "Yellow and blue.", "Black and orange."]


# --- option letters ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The usual completions after "Best option: (".
        ("B) A map.", "B"),
        ("B)", "B"),
        ("B", "B"),
        ("B ) a map", "B"),
        ("D) A weather radar.\nThe radar is on the left.", "D"),
        # Other explicit formats.
        ("(B)", "B"),
        ("(C) An altitude meter.", "C"),
        ("[C]", "C"),
        ("B.", "B"),
        ("B. A map.", "B"),
        ("B:", "B"),
        ("B: A map", "B"),
        ("B, a map", "B"),
        ("**D**", "D"),
        ("`C`", "C"),
        ('"A"', "A"),
        ("(B", "B"),
        # Leading white space and new lines.
        ("   C", "C"),
        ("\n\n  C) An altitude meter.", "C"),
        ("\tD", "D"),
        # Lower case only where unambiguous.
        ("b)", "B"),
        ("b", "B"),
        ("(b) a map", "B"),
        ("d.", "D"),
        ("c: an altitude meter", "C"),
        ("a map", None),  # prose, not option "a)" -- and no choices to match
        ("a.m. is when it happened", None),
        # Answer phrases.
        ("Answer: B", "B"),
        ("answer: (c)", "C"),
        ("The answer is (C)", "C"),
        ("The answer is C.", "C"),
        ("The correct answer would be D", "D"),
        ("I think the answer is D.", "D"),
        ("Best option: (B)", "B"),
        ("The best option is B because the map is visible.", "B"),
        ("Option A is correct.", "A"),
        ("The correct choice is (a)", "A"),
        ("I think (C) is right.", "C"),
        ("The answer is A.", "A"),
        # The article "A" is not option A ...
        ("A man is riding a bike.", None),
        ("A bird.", None),
        ("I don't know.", None),
        ("I'm not sure", None),
        ("The answer is A map", None),
        ("the answer is a map", None),
        # ... but a lone or formatted "A" is.
        ("A", "A"),
        ("A)", "A"),
        ("A.", "A"),
        ("(A) A compass.", "A"),
        ("A\nThe compass in the cockpit.", "A"),
        # Bare upper-case letter then a space, for letters that are not English words.
        ("C The altitude meter", "C"),
        # Letters beyond the options, garbage, nothing.
        ("E", None),
        ("E) A lamp.", None),
        ("(F)", None),
        ("The answer is E.", None),
        ("", None),
        ("   \n ", None),
        ("!!!", None),
        ("xyz", None),
        ("options A and B are both wrong", None),
        ("i.e. nothing", None),
    ],
)
def test_option_letter_without_choices(text, expected):
    assert parse_option_letter(text, 4) == expected


@pytest.mark.parametrize(
    ("text", "choices", "expected"),
    [
        # Option text instead of a letter: exact, case-insensitive, punctuation ignored.
        ("A map.", ARTICLES, "B"),  # the tricky one: starts with the article "A", means option B
        ("a map", ARTICLES, "B"),
        ("A MAP", ARTICLES, "B"),
        ("A compass.", ARTICLES, "A"),
        ("An altitude meter", ARTICLES, "C"),
        ("A A compass.", ARTICLES, "A"),  # letter followed by its own option text
        ("A weather radar", ARTICLES, "D"),
        # Unique containment.
        ("The answer is a map.", ARTICLES, "B"),
        ("Answer: A compass.", ARTICLES, "A"),
        ("It shows a weather radar on the screen.", ARTICLES, "D"),
        ("altitude meter", ARTICLES, "C"),  # the answer inside exactly one option
        ("black and orange", COLOURS, "D"),  # "Black." is inside "Black and orange." too: longest wins
        ("black", COLOURS, "A"),
        ("It is black.", COLOURS, "A"),
        ("red", COLOURS, "B"),
        # Ambiguous or unrelated text.
        ("Both black and red and green", COLOURS, None),
        ("A man is riding a bike.", ARTICLES, None),
        ("blue", ["Blue sky.", "Blue sea.", "Red.", "Green."], None),
        ("", ARTICLES, None),
        # A letter wins over option text when it is explicitly formatted.
        ("C) A map.", ARTICLES, "C"),
        ("E) A map.", ARTICLES, None),  # an explicit, impossible option is not second-guessed
        # Counting options: the number is the option text.
        ("3", ["2", "3", "4", "5"], "B"),
        ("There are 3 people.", ["2", "3", "4", "5"], "B"),
        ("3 or 4", ["2", "3", "4", "5"], None),
        # Non-ASCII option text.
        ("Café", ["café", "tea"], "A"),
    ],
)
def test_option_letter_with_choices(text, choices, expected):
    assert parse_option_letter(text, len(choices), choices) == expected


def test_option_letter_respects_the_number_of_choices():
    assert parse_option_letter("C", 2) is None
    assert parse_option_letter("B", 2) == "B"
    assert parse_option_letter("I", 9) == "I"
    assert parse_option_letter("I)", 9) == "I"
    assert parse_option_letter("I think so", 9) is None
    assert parse_option_letter("Z", 26) == "Z"
    assert parse_option_letter(None, 4) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("num_choices", [0, 27, -1])
def test_option_letter_rejects_bad_counts(num_choices):
    with pytest.raises(ValueError, match="num_choices"):
        parse_option_letter("A", num_choices)


def test_option_letter_rejects_mismatched_choices():
    with pytest.raises(ValueError, match="choices"):
        parse_option_letter("A", 3, ARTICLES)


# --- normalisation, EM, F1 -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Cat sat.", "cat sat"),
        ("  An   apple,  a PEAR!  ", "apple pear"),
        ("theatre", "theatre"),  # articles only as whole words
        ("It's A-OK", "its aok"),
        ("", ""),
        ("the a an", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match("The red car.", "red car") == 1.0
    assert exact_match("a red car", "the red car!") == 1.0
    assert exact_match("red cars", "red car") == 0.0
    assert exact_match("", "the") == 1.0  # both normalise to empty


def test_token_f1_by_hand():
    # pred tokens [red, car, on, left]; ref [red, car]: common 2, P = 2/4, R = 2/2 -> F1 = 2/3.
    assert token_f1("The red car on the left", "a red car") == pytest.approx(2 / 3)
    # pred [man, is, cooking], ref [man, cooking, pasta]: common 2, P = R = 2/3 -> 2/3.
    assert token_f1("The man is cooking", "man cooking pasta") == pytest.approx(2 / 3)
    # Repeated tokens count once per occurrence: pred [dog, dog], ref [dog]: common 1, P=1/2, R=1.
    assert token_f1("dog dog", "dog") == pytest.approx(2 / 3)
    assert token_f1("blue", "red") == 0.0
    assert token_f1("Red car", "red car.") == 1.0


def test_token_f1_empty_cases():
    assert token_f1("", "") == 1.0
    assert token_f1("the", "a") == 1.0  # both empty after normalisation
    assert token_f1("", "red") == 0.0
    assert token_f1("red", "") == 0.0


# --- retrieval recall ------------------------------------------------------------------------


def block(start: float, end: float) -> dict:
    return {"granularity": "clip", "start_time": start, "end_time": end, "tokens": 10}


def test_recall_overlap_and_coverage():
    result = retrieval_recall([block(0, 5), block(8, 12)], (10, 20))
    assert result == {"hit": 1.0, "coverage": pytest.approx(0.2)}


def test_recall_miss():
    assert retrieval_recall([block(0, 5), block(30, 40)], (10, 20)) == {"hit": 0.0, "coverage": 0.0}
    assert retrieval_recall([], (10, 20)) == {"hit": 0.0, "coverage": 0.0}


def test_recall_touching_endpoints_hit_but_cover_nothing():
    assert retrieval_recall([block(0, 10)], (10, 20)) == {"hit": 1.0, "coverage": 0.0}
    assert retrieval_recall([block(20, 25)], (10, 20)) == {"hit": 1.0, "coverage": 0.0}
    assert retrieval_recall([block(0, 9.999)], (10, 20))["hit"] == 0.0


def test_recall_coverage_of_overlapping_spans_is_a_union():
    # [12, 16] and [14, 18] overlap: union [12, 18] = 6 of 10 s; [5, 11] adds [10, 11] = 1 s.
    result = retrieval_recall([block(14, 18), block(12, 16), block(5, 11)], (10, 20))
    assert result["hit"] == 1.0
    assert result["coverage"] == pytest.approx(0.7)
    # A block around the whole window covers it fully, duplicates do not count twice.
    assert retrieval_recall([block(0, 30), block(0, 30), block(12, 13)], (10, 20))["coverage"] == pytest.approx(1.0)


def test_recall_zero_length_window():
    assert retrieval_recall([block(0, 5)], (5, 5)) == {"hit": 1.0, "coverage": 1.0}
    assert retrieval_recall([block(3, 7)], (5, 5)) == {"hit": 1.0, "coverage": 1.0}
    assert retrieval_recall([block(6, 7)], (5, 5)) == {"hit": 0.0, "coverage": 0.0}


def test_recall_accepts_a_list_window_and_rejects_bad_input():
    assert retrieval_recall([block(0, 5)], [0, 10])["coverage"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="evidence"):
        retrieval_recall([block(0, 5)], (10, 0))
    with pytest.raises(ValueError, match="start_time"):
        retrieval_recall([{"tokens": 3}], (0, 10))
    with pytest.raises(ValueError, match="invalid span"):
        retrieval_recall([block(5, 1)], (0, 10))


# --- aggregation ---------------------------------------------------------------------------


def mc(prediction: str, answer: str, task: str | None, choices=ARTICLES) -> dict:
    return {"qid": "q", "prediction": prediction, "choices": choices, "answer": answer, "task": task}


def test_multiple_choice_accuracy():
    records = [
        mc("B) A map.", "A map.", "Object Recognition"),  # right
        mc("A map.", "A map.", "Object Recognition"),  # right, by text
        mc("C", "A map.", "Object Recognition"),  # wrong
        mc("no idea", "A compass.", "Counting"),  # unparsed -> wrong
        mc("(A)", "A compass.", "Counting"),  # right
        mc("D", "A weather radar.", None),  # right, task unknown
        {"qid": "open", "prediction": "a map", "answer": "a map", "choices": None, "task": None},  # skipped
    ]
    result = multiple_choice_accuracy(records)
    assert result["count"] == 6
    assert result["unparsed"] == 1
    assert result["overall"] == pytest.approx(4 / 6)
    assert result["per_task"] == {
        "Counting": pytest.approx(0.5),
        "Object Recognition": pytest.approx(2 / 3),
        "unknown": 1.0,
    }


def test_multiple_choice_accuracy_empty_and_bad_answer():
    assert multiple_choice_accuracy([]) == {"overall": 0.0, "per_task": {}, "count": 0, "unparsed": 0}
    with pytest.raises(ValueError, match="not one of the choices"):
        multiple_choice_accuracy([mc("A", "A globe.", "x")])


def test_multiple_choice_accuracy_accepts_prediction_objects():
    from mukv.eval.schema import Prediction

    record = Prediction(
        qid="q1",
        video_id="v",
        question="What is shown?",
        answer="A map.",
        choices=ARTICLES,
        task="Object Recognition",
        prediction="B",
        method="mukv",
        time=6.0,
        frames_seen=3,
        encode_seconds=0.1,
        vision_seconds=0.1,
        memory_seconds=0.0,
        prepare_seconds=0.0,
        first_token_seconds=0.1,
        total_seconds=0.2,
        context_tokens=10,
        generated_tokens=1,
        stop_reason="eos",
        retrieved=[block(0, 4)],
        memory={},
        peak_rss_bytes=1,
        evidence=(2.0, 6.0),
    )
    assert multiple_choice_accuracy([record])["overall"] == 1.0
    assert recall_scores([record]) == {"hit": 1.0, "coverage": pytest.approx(0.5), "count": 1}


def test_judge_free_scores():
    records = [
        {"prediction": "The red car.", "answer": "red car", "choices": None},  # EM 1, F1 1
        {"prediction": "a blue car", "answer": "red car", "choices": None},  # EM 0, F1 0.5
        {"prediction": "B", "answer": "A map.", "choices": ARTICLES},  # multiple choice: skipped
    ]
    result = judge_free_scores(records)
    assert result == {"exact_match": pytest.approx(0.5), "token_f1": pytest.approx(0.75), "count": 2}
    assert judge_free_scores([]) == {"exact_match": 0.0, "token_f1": 0.0, "count": 0}


def test_recall_scores():
    records = [
        {"evidence": [10, 20], "retrieved": [block(10, 15)]},  # hit, 0.5
        {"evidence": (10, 20), "retrieved": [block(30, 40)]},  # miss
        {"evidence": (0, 4), "retrieved": []},  # nothing retrieved: miss
        {"evidence": None, "retrieved": [block(0, 1)]},  # no window: skipped
        {"retrieved": [block(0, 1)]},  # no window: skipped
    ]
    result = recall_scores(records)
    assert result == {"hit": pytest.approx(1 / 3), "coverage": pytest.approx(0.5 / 3), "count": 3}
    assert recall_scores([]) == {"hit": 0.0, "coverage": 0.0, "count": 0}


@pytest.mark.parametrize("missing", ["answer", "prediction"])
def test_judge_free_scores_refuse_a_record_without_texts(missing):
    record = {"qid": "v/3", "question": "What?", "answer": "a cat", "prediction": "a cat"}
    del record[missing]
    with pytest.raises(ValueError, match=rf"record 'v/3': field '{missing}' is missing or not text"):
        judge_free_scores([record])
    with pytest.raises(ValueError, match="is missing or not text"):
        judge_free_scores([{"qid": "v/4"}])  # nothing at all never scores 1.0
