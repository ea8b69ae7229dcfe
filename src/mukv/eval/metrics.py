"""Judge-free scoring: option-letter parsing, SQuAD-style answer matching, retrieval recall.

Pure functions, no I/O. The open-ended metric of the papers is the LLM judge of
:mod:`mukv.eval.judge`; the exact match and token F1 here are *judge-free* companions that are
reported side by side and must never be presented as the papers' metric
(``docs/evaluation.md``, Scoring).

Records given to the aggregation helpers are mappings (a ``predictions.jsonl`` line loaded with
``json.loads``) or objects with the same attributes (a :class:`~mukv.eval.schema.Prediction`).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "exact_match",
    "judge_free_scores",
    "multiple_choice_accuracy",
    "normalize_answer",
    "parse_option_letter",
    "recall_scores",
    "retrieval_recall",
    "token_f1",
]

_LETTERS = string.ascii_uppercase

# One-letter English words: a leading "A " / "I " is prose ("A man is ...", "I think ..."), not an
# option, unless what follows is that option's own text.
_WORD_LETTERS = frozenset("AI")

_DECORATION = "*_`\"'“”‘’ \t\r\n"

# Rule 1: explicit option formats at the very start.
_LEAD_BRACKETED = re.compile(r"[(\[]\s*([A-Za-z])\s*[)\]]")  # (B)  (b)  [C]
_LEAD_CLOSED = re.compile(r"([A-Za-z])\s*[)\]]")  # B)  b)  B ]
_LEAD_DOT_COLON = re.compile(r"([A-Za-z])[.:](?=\s|$)")  # B.  b:  (not "a.m.")
_LEAD_COMMA = re.compile(r"([A-Z]),(?=\s|$)")  # B,  (upper case only)
_ONLY_LETTER = re.compile(r"[^A-Za-z0-9]*([A-Za-z])[^A-Za-z0-9]*")  # B  b  (B  **B**  B.
# Rule 3: a bare upper-case letter followed by white space.
_LEAD_BARE = re.compile(r"([A-Z])(\s+)(.*)", re.DOTALL)
# Rule 4: "option B", "choice (C)", "Best option: (B)", "the correct option is C" anywhere; the
# letter is always a label here.
# Only the key words ignore case; a bare letter must be upper case.
_OPTION_PHRASE = re.compile(
    r"\b(?i:option|choice)\b\s*(?i:is|would\s+be|should\s+be)?\s*:?\s*(?:\(\s*([A-Za-z])\s*\)|([A-Z])(?![\w'’]))"
)
# "answer is C", "Answer: B", "the correct answer would be (C)" anywhere; an article may follow.
_ANSWER_PHRASE = re.compile(
    r"\b(?i:answer)\b\s*(?i:is|would\s+be|should\s+be)?\s*:?\s*(?:\(\s*([A-Za-z])\s*\)|([A-Z])(?![\w'’])(\s+\w)?)"
)
# Rule 5: an upper-case parenthesised letter anywhere: "I think (C) is right".
_PAREN_ANYWHERE = re.compile(r"\(\s*([A-Z])\s*\)")


def _match_key(text: str) -> str:
    """Case-folded text with every run of non-word characters (and ``_``) turned into one space."""
    return " ".join(re.sub(r"[\W_]+", " ", text.casefold()).split())


def parse_option_letter(text: str | None, num_choices: int, choices: Sequence[str] | None = None) -> str | None:
    """The option letter (``"A"``, ``"B"``, ...) a multiple-choice answer picks, or ``None``.

    The prompt ends with ``Best option: (``, so an answer usually starts ``B) ...`` or ``B``.
    Leading white space and decoration (``*``, ``_``, backticks, quotes) are dropped, then the
    rules below are tried in order; the first that fires decides. A letter a rule finds that is
    beyond ``num_choices`` makes the answer unparseable (``None``): the model named an option
    that does not exist, and no later rule overrides that.

    1. **Explicit option at the start**: ``(B)`` / ``[B]`` / ``B)`` in any case; ``B.`` / ``B:``
       in any case when followed by white space or the end (so ``a.m.`` is not an option);
       ``B,`` in upper case only; or the whole answer is one letter, in any case, with only
       punctuation around it (``B``, ``b``, ``(B``, ``**B**``).
    2. **Option text**: the whole answer equals one choice's text (case-folded, punctuation
       ignored), e.g. ``A map.`` for choices ``["A compass.", "A map.", ...]``  -> ``B``.
    3. **Bare upper-case letter then white space at the start**: ``B The man ...`` -> ``B``. For
       ``A`` and ``I`` (one-letter English words: ``A man is ...``, ``I think ...``) only when
       the rest is that option's own text (``A A compass.``) or the letter ends its line.
       A lower-case letter followed by a space (``a map``) is never an option.
    4. **Answer phrases anywhere**: ``option B`` / ``choice (C)`` / ``Best option: (B)`` /
       ``the correct option is C`` (upper case or parenthesised); ``Answer: B`` /
       ``the answer is (C)`` / ``answer would be C`` (upper case or parenthesised, and a bare
       ``A`` or ``I`` only when no word follows: ``the answer is A map`` is prose). The first
       phrase in the text decides.
    5. **A parenthesised upper-case letter anywhere**: ``I think (C) is right`` -> ``C``.
    6. **Option text contained** (needs ``choices``): the choices whose text occurs in the
       answer as whole words; if several, those contained in another matching choice are
       dropped (``black and orange`` picks ``Black and orange.`` over ``Black.``); if exactly one
       is left it is the answer. Otherwise the answer's text contained in exactly one choice
       (``altitude meter`` -> ``An altitude meter.``).

    Anything else (empty text, prose without a marker, ambiguous text) gives ``None``.

    Raises ``ValueError`` when ``num_choices`` is not between 1 and 26 or ``choices`` has a
    different length.
    """
    if not 1 <= num_choices <= len(_LETTERS):
        raise ValueError(f"num_choices: must be between 1 and {len(_LETTERS)}, got {num_choices}")
    if choices is not None and len(choices) != num_choices:
        raise ValueError(f"choices: {len(choices)} options given but num_choices is {num_choices}")
    if not text or not isinstance(text, str):
        return None
    body = text.strip(_DECORATION)
    if not body:
        return None
    keys = [_match_key(str(c)) for c in choices] if choices is not None else None

    def pick(letter: str) -> str | None:
        letter = letter.upper()
        return letter if _LETTERS.index(letter) < num_choices else None

    # 1. Explicit option at the start.
    for pattern in (_LEAD_BRACKETED, _LEAD_CLOSED, _LEAD_DOT_COLON, _LEAD_COMMA):
        found = pattern.match(body)
        if found:
            return pick(found.group(1))
    found = _ONLY_LETTER.fullmatch(body)
    if found:
        return pick(found.group(1))

    # 2. The whole answer is one option's text.
    answer_key = _match_key(body)
    if keys is not None and answer_key:
        exact = [i for i, key in enumerate(keys) if key and key == answer_key]
        if len(exact) == 1:
            return _LETTERS[exact[0]]

    # 3. A bare upper-case letter followed by white space.
    found = _LEAD_BARE.match(body)
    if found:
        letter, space, rest = found.groups()
        if letter not in _WORD_LETTERS or "\n" in space:
            return pick(letter)
        index = _LETTERS.index(letter)
        if keys is not None and index < num_choices and keys[index] and _match_key(rest) == keys[index]:
            return letter

    # 4. Answer phrases anywhere; the earliest one decides.
    phrases: list[tuple[int, str]] = []
    for found in _OPTION_PHRASE.finditer(body):
        phrases.append((found.start(), found.group(1) or found.group(2)))
        break
    for found in _ANSWER_PHRASE.finditer(body):
        bracketed, bare, next_word = found.groups()
        if bracketed:
            phrases.append((found.start(), bracketed))
            break
        if not (bare in _WORD_LETTERS and next_word):
            phrases.append((found.start(), bare))
            break
    if phrases:
        return pick(min(phrases)[1])

    # 5. A parenthesised upper-case letter anywhere.
    found = _PAREN_ANYWHERE.search(body)
    if found:
        return pick(found.group(1))

    # 6. Option text contained in the answer (or the answer in exactly one option).
    if keys is not None and answer_key:
        padded = f" {answer_key} "
        inside = [i for i, key in enumerate(keys) if key and f" {key} " in padded]
        inside = [i for i in inside if not any(j != i and f" {keys[i]} " in f" {keys[j]} " for j in inside)]
        if len(inside) == 1:
            return _LETTERS[inside[0]]
        if not inside:
            holders = [i for i, key in enumerate(keys) if key and padded in f" {key} "]
            if len(holders) == 1:
                return _LETTERS[holders[0]]
    return None


# --- open-ended, judge-free ------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, drop punctuation, drop the articles a/an/the,
    collapse white space."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(pred: str, ref: str) -> float:
    """1.0 when the normalised prediction equals the normalised reference, else 0.0 (judge-free)."""
    return float(normalize_answer(pred) == normalize_answer(ref))


def token_f1(pred: str, ref: str) -> float:
    """SQuAD-style bag-of-tokens F1 of the normalised texts (judge-free).

    Both empty after normalisation -> 1.0; only one empty -> 0.0.
    """
    pred_tokens = normalize_answer(pred).split()
    ref_tokens = normalize_answer(ref).split()
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


# --- retrieval recall ------------------------------------------------------------------------


def _span(block: Mapping[str, Any]) -> tuple[float, float]:
    try:
        start, end = float(block["start_time"]), float(block["end_time"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"retrieved block without numeric start_time/end_time: {block!r}") from exc
    if math.isnan(start) or math.isnan(end) or start > end:
        raise ValueError(f"retrieved block with an invalid span [{start}, {end}]: {block!r}")
    return start, end


def retrieval_recall(retrieved: Sequence[Mapping[str, Any]], evidence: Sequence[float]) -> dict[str, float]:
    """How well the retrieved blocks cover the evidence window ``[start, end]`` (seconds).

    ``hit``: 1.0 when some block's closed interval ``[start_time, end_time]`` meets the closed
    evidence window (touching end points count), else 0.0. ``coverage``: the length of the union
    of the blocks' spans clipped to the window, over the window's length; for a zero-length
    window, 1.0 when some block contains that instant, else 0.0.

    Raises ``ValueError`` for an evidence window that ends before it starts or a block without a
    valid span.
    """
    lo, hi = float(evidence[0]), float(evidence[1])
    if lo > hi:
        raise ValueError(f"evidence: start {lo} is after end {hi}")
    spans = [_span(block) for block in retrieved]
    touching = [(s, e) for s, e in spans if s <= hi and e >= lo]
    hit = 1.0 if touching else 0.0
    if hi == lo:
        return {"hit": hit, "coverage": hit}
    covered = 0.0
    reach = lo
    for start, end in sorted((max(s, lo), min(e, hi)) for s, e in touching):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return {"hit": hit, "coverage": min(1.0, covered / (hi - lo))}


# --- aggregation -----------------------------------------------------------------------------


def _get(record: Any, name: str) -> Any:
    if isinstance(record, Mapping):
        return record.get(name)
    return getattr(record, name, None)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def multiple_choice_accuracy(records: Iterable[Any]) -> dict[str, Any]:
    """Accuracy of multiple-choice predictions, overall and per task type.

    Each record has ``prediction``, ``choices``, ``answer`` (the right choice's text) and
    ``task``; records without ``choices`` (open-ended) are skipped. The predicted letter comes
    from :func:`parse_option_letter`; an unparseable prediction counts as wrong and is counted in
    ``unparsed``. A missing task is reported as ``"unknown"``. With no records, accuracies are
    0.0 and ``count`` is 0.

    Returns ``{"overall": float, "per_task": {task: float}, "count": int, "unparsed": int}``.
    Raises ``ValueError`` when a record's answer is not one of its choices.
    """
    correct: list[float] = []
    per_task: dict[str, list[float]] = defaultdict(list)
    unparsed = 0
    for record in records:
        choices = _get(record, "choices")
        if not choices:
            continue
        choices = [str(c) for c in choices]
        answer = _get(record, "answer")
        if answer not in choices:
            raise ValueError(f"record {_get(record, 'qid')!r}: answer {answer!r} is not one of the choices")
        letter = parse_option_letter(_get(record, "prediction") or "", len(choices), choices)
        if letter is None:
            unparsed += 1
        value = float(letter == _LETTERS[choices.index(answer)])
        correct.append(value)
        per_task[str(_get(record, "task") or "unknown")].append(value)
    return {
        "overall": _mean(correct),
        "per_task": {task: _mean(values) for task, values in sorted(per_task.items())},
        "count": len(correct),
        "unparsed": unparsed,
    }


def judge_free_scores(records: Iterable[Any]) -> dict[str, float | int]:
    """Judge-free open-ended scores: mean normalised exact match and mean token F1 of
    ``prediction`` against ``answer``.

    These are *not* the papers' metric (that is the LLM judge's yes-share and mean score, see
    :mod:`mukv.eval.judge`); report them only labelled as judge-free. Records with ``choices``
    (multiple choice, scored by :func:`multiple_choice_accuracy`) are skipped.

    Returns ``{"exact_match": mean, "token_f1": mean, "count": n}`` (means 0.0 when ``n`` is 0).
    Raises ``ValueError`` naming the record when its ``answer`` or ``prediction`` is missing or not
    text (two missing texts would otherwise "match" and score 1.0).
    """
    em: list[float] = []
    f1: list[float] = []
    for record in records:
        if _get(record, "choices"):
            continue
        prediction, answer = _get(record, "prediction"), _get(record, "answer")
        for name, value in (("answer", answer), ("prediction", prediction)):
            if not isinstance(value, str):
                raise ValueError(f"record {_get(record, 'qid')!r}: field {name!r} is missing or not text ({value!r})")
        em.append(exact_match(prediction, answer))
        f1.append(token_f1(prediction, answer))
    return {"exact_match": _mean(em), "token_f1": _mean(f1), "count": len(em)}


def recall_scores(records: Iterable[Any]) -> dict[str, float | int]:
    """Mean :func:`retrieval_recall` over the records that have an ``evidence`` window.

    Each record's ``retrieved`` is its list of blocks with ``start_time`` / ``end_time`` (none
    retrieved counts as a miss). Returns ``{"hit": mean, "coverage": mean, "count": n}`` (means
    0.0 when ``n`` is 0).
    """
    hits: list[float] = []
    coverage: list[float] = []
    for record in records:
        evidence = _get(record, "evidence")
        if evidence is None:
            continue
        result = retrieval_recall(_get(record, "retrieved") or [], evidence)
        hits.append(result["hit"])
        coverage.append(result["coverage"])
    return {"hit": _mean(hits), "coverage": _mean(coverage), "count": len(hits)}
