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


def test_tiny_tokenizer_chat_template_is_the_session_format():
    # The tiny model is trained in the session's format; its chat template must render exactly that.
    from mukv.backends.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    prompts = PromptTemplate()
    question = "What colour was the star?"
    video_turn = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    rendered = tokenizer.apply_chat_template(video_turn, tokenize=False, add_generation_prompt=True)
    assert rendered == prompts.system + "<video>" + prompts.render_question(question)
    answered = tokenizer.apply_chat_template([*video_turn, {"role": "assistant", "content": "red"}], tokenize=False)
    assert answered == prompts.system + "<video>" + prompts.render_question(question) + "red<|im_end|>"
    explicit = [{"role": "system", "content": "You are a helpful assistant."}, *video_turn]
    assert tokenizer.apply_chat_template(explicit, tokenize=False, add_generation_prompt=True) == rendered
