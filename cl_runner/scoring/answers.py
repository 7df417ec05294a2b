"""How a generated text and its reference are read before a generation metric scores them: cut at the task's stop
string, the answer extracted (``answer_pattern``), surrounding whitespace trimmed; exact match then compares them
under one of the normalisers below (``normalizer``). Pure string functions, no torch.

Normalisers (``eval.normalizer``, a task's ``normalizer`` wins where set):

- ``default``: cl-runner's rule (``normalize_answer``): collapse whitespace; with ``eval.strip_punctuation`` drop
  trailing ``. , ; : ! ?`` and then quotes at either end; with ``eval.lowercase`` lower-case.
- ``olora``: O-LoRA's (src/compute_metrics.py ``normalize_answer``, SQuAD's without the articles): lower-case,
  remove every ASCII punctuation character (``string.punctuation``), collapse whitespace.
- ``squad``: SQuAD v1.1's official script: lower-case, remove punctuation, remove the words a/an/the, collapse
  whitespace. Token F1 always reads answers this way.
- ``exact``: nothing beyond the trim (TRACE's accuracy compares the strings as they are, metrics.py
  ``caculate_accuracy``).

Answer extraction (``eval.answer_pattern``, a task's ``answer_pattern`` wins where set): a regular expression
searched in the text (after the cut at the stop string); the answer is its first group, or the whole match when it
has no group. A generation without a match has a blank answer (wrong, and counted as ``blank``); a reference
without a match is kept whole (so a pattern written for the model's output can leave plain references alone).
Named patterns (``ANSWER_PATTERNS``) stand for common rules.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Callable
from dataclasses import dataclass

_TRAILING = re.compile(r"[\s.,;:!?]+$")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)

# name -> regular expression, usable as an answer_pattern value
ANSWER_PATTERNS = {
    # TRACE's ScienceQA answer: the first character of the output (evaluations/eval_ScienceQA.py ``resolve``:
    # datium[0], "the first char is the answer. e.g. A, B,..."), here the first after leading whitespace, because
    # cl-runner's targets start with target_template's space
    "first_character": r"^\s*(\S)",
    # the option letter written after "Answer:" (e.g. "... so the answer is clear. Answer: (B)")
    "letter_after_answer": r"Answer:\s*\(?([A-Za-z])\b",
}


def normalize_answer(text: str, stop: str, lowercase: bool = True, strip_punctuation: bool = True) -> str:
    """The ``default`` exact-match rule: cut at the stop string, trim whitespace, optionally case and trailing
    punctuation."""
    if stop and stop in text:
        text = text[: text.index(stop)]
    text = " ".join(text.split())
    if strip_punctuation:
        text = _TRAILING.sub("", text).strip("\"'`")
    return text.lower() if lowercase else text


def olora_normalize(text: str) -> str:
    """O-LoRA's exact-match normaliser: lower-case, every ASCII punctuation character removed, whitespace collapsed."""
    return " ".join("".join(ch for ch in text.lower() if ch not in _PUNCTUATION).split())


def squad_normalize(text: str) -> str:
    """SQuAD v1.1's: lower-case, punctuation removed, the articles a/an/the removed, whitespace collapsed."""
    without = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", without).split())


NORMALIZERS: dict[str, str] = {  # name -> what it does (config checks, docs)
    "default": "cl-runner's: whitespace collapsed, eval.strip_punctuation, eval.lowercase",
    "olora": "O-LoRA's: lower-case, all punctuation removed, whitespace collapsed",
    "squad": "SQuAD v1.1's: lower-case, punctuation and a/an/the removed, whitespace collapsed",
    "exact": "none: the answer as generated (trimmed)",
}


def answer_errors(key: str, normalizer: str | None, answer_pattern: str | None) -> list[str]:
    """Config errors of how answers are read (``<key>.normalizer``, ``<key>.answer_pattern``; None: unset)."""
    errs: list[str] = []
    if normalizer is not None and normalizer not in NORMALIZERS:
        errs.append(f"{key}.normalizer: expected one of {', '.join(NORMALIZERS)}, got {normalizer!r}")
    if answer_pattern is not None:
        try:
            compile_pattern(answer_pattern)
        except re.error as exc:
            errs.append(f"{key}.answer_pattern: {answer_pattern!r} is neither a regular expression ({exc}) nor "
                        f"one of {', '.join(ANSWER_PATTERNS)}")
    return errs


@functools.lru_cache(maxsize=64)
def compile_pattern(value: str) -> re.Pattern:
    return re.compile(ANSWER_PATTERNS.get(value, value))


@dataclass(frozen=True)
class Reading:
    """How one task's generations and references are read (its stop string and the options above)."""

    stop: str = "\n"
    answer_pattern: str | None = None
    normalizer: str = "default"
    lowercase: bool = True  # the default normaliser's options (eval.lowercase, eval.strip_punctuation)
    strip_punctuation: bool = True

    def answer(self, text: str, reference: bool = False) -> str:
        """``text`` cut at the stop string, its answer extracted, trimmed: what the text metrics score."""
        if self.stop and self.stop in text:
            text = text[: text.index(self.stop)]
        if self.answer_pattern is not None:
            pattern = compile_pattern(self.answer_pattern)
            found = pattern.search(text)
            if found is not None:
                text = found.group(1) if pattern.groups else found.group(0)
            elif not reference:
                text = ""
        return text.strip()

    def normalized(self, text: str, reference: bool = False) -> str:
        """The answer as exact match compares it."""
        return self._normalize(self.answer(text, reference))

    @property
    def _normalize(self) -> Callable[[str], str]:
        if self.normalizer == "default":
            return functools.partial(normalize_answer, stop="", lowercase=self.lowercase,
                                     strip_punctuation=self.strip_punctuation)
        if self.normalizer == "olora":
            return olora_normalize
        if self.normalizer == "squad":
            return squad_normalize
        if self.normalizer == "exact":
            return str
        raise ValueError(f"normalizer: expected one of {', '.join(NORMALIZERS)}, got {self.normalizer!r}")
