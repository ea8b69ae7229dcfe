from __future__ import annotations

import pytest

from mukv.backends.prompts import PromptTemplate, validate_question


def test_open_ended_prompt_matches_the_release_format():
    prompts = PromptTemplate()
    assert prompts.system == "<|im_start|>system \nYou are a helpful assistant.<|im_end|><|im_start|>user "
    assert prompts.render_question("  What is here? ") == "\nWhat is here?<|im_end|><|im_start|>assistant\n"


def test_multiple_choice_prompt_letters_the_options_and_opens_the_answer():
    text = PromptTemplate().render_question("Which colour?", ["red", " blue "])
    assert text == (
        "\nWhich colour?\n(A) red\n(B) blue\nOnly give the best option.<|im_end|><|im_start|>assistant\nBest option: ("
    )


@pytest.mark.parametrize("question", ["", "   ", "\n\t"])
def test_empty_question_is_rejected(question):
    with pytest.raises(ValueError, match="question: must not be empty"):
        validate_question(question)


def test_non_text_question_is_rejected():
    with pytest.raises(ValueError, match="expected text"):
        validate_question(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("choices", "message"),
    [(["only"], "at least 2"), (["a", " "], "every option needs text"), ([str(i) for i in range(27)], "at most 26")],
)
def test_bad_choices_are_rejected(choices, message):
    with pytest.raises(ValueError, match=message):
        PromptTemplate().render_question("Which?", choices)


def test_special_tokens_of_the_system_prompt_are_single_tokens(backend):
    ids = backend.tokenize(backend.prompts.system)[0].tolist()
    start = backend.tokenizer.convert_tokens_to_ids("<|im_start|>")
    end = backend.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids[0] == start
    assert ids.count(start) == 2 and ids.count(end) == 1
