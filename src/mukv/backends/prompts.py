"""Prompt pieces shared by every memory method (method.md section 5).

The context a question is answered from is ``[system | visual tokens | question]``. The
system piece is prefilled once per stream; visual tokens follow it directly; the question piece
is appended when a question is asked.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

OPTION_LETTERS = string.ascii_uppercase


@dataclass(frozen=True, kw_only=True)
class PromptTemplate:
    """Text around the visual tokens, in the chat format of the language model.

    The defaults are the Qwen2 chat format used by LLaVA-OneVision and by the MuKV and ReKV
    releases (including the release's space after ``system`` and ``user``), so that the cached
    ``init`` tokens match theirs.
    """

    system: str = "<|im_start|>system \nYou are a helpful assistant.<|im_end|><|im_start|>user "
    question: str = "\n{question}<|im_end|><|im_start|>assistant\n"
    choice_question: str = (
        "\n{question}\n{options}\nOnly give the best option.<|im_end|><|im_start|>assistant\nBest option: ("
    )
    option: str = "({letter}) {text}"

    def render_question(self, question: str, choices: Sequence[str] | None = None) -> str:
        """The text appended after the visual context for ``question``.

        Raises ``ValueError`` for an empty question, fewer than two choices, more choices than
        letters, or an empty choice.
        """
        question = validate_question(question)
        if choices is None:
            return self.question.format(question=question)
        choices = list(choices)
        if len(choices) < 2:
            raise ValueError(f"choices: need at least 2 options, got {len(choices)}")
        if len(choices) > len(OPTION_LETTERS):
            raise ValueError(f"choices: at most {len(OPTION_LETTERS)} options, got {len(choices)}")
        if any(not str(c).strip() for c in choices):
            raise ValueError("choices: every option needs text")
        options = "\n".join(
            self.option.format(letter=OPTION_LETTERS[i], text=str(c).strip()) for i, c in enumerate(choices)
        )
        return self.choice_question.format(question=question, options=options)


def validate_question(question: str) -> str:
    """Strip ``question`` and reject an empty one, or one that is not text, with ``ValueError``."""
    if not isinstance(question, str):
        raise ValueError(f"question: expected text, got {type(question).__name__}")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as exc:  # undecodable bytes (a terminal in another encoding) arrive as surrogates
        raise ValueError(f"question: not valid UTF-8 text (at character {exc.start})") from None
    stripped = question.strip()
    if not stripped:
        raise ValueError("question: must not be empty")
    return stripped
