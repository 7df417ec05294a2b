"""Per-example text-overlap scores of a prediction against its reference, as the published evaluations compute them.
Pure functions of two strings, no torch, no third-party package; each is written from its reference's formula and
tested equal to it (tests/scoring/test_text_metrics.py). Every score lies in [0, 1].

- ``rouge_l``: TRACE's ROUGE-L (BeyonderXX/TRACE metrics.py ``score_rouge``: the ``rouge`` package, version 1.0.1,
  ``Rouge(metrics=["rouge-l"]).get_scores(target, prediction)["rouge-l"]["f"]``). Its ROUGE-L is the summary-level
  one of that package: each text is split into sentences at ``.``, words at single spaces (after collapsing
  whitespace); the longest common subsequence of every pair of sentences is reconstructed, and the distinct words
  of all of them are counted (the package's default ``exclusive=True`` counts words as sets, also the lengths);
  F = 2PR / (P + R + 1e-8). Case-sensitive, no stemming. It is not rouge-score's ROUGE-L (Google's package, which
  lower-cases, keeps only letters and digits, counts repeated words and computes one sentence-level LCS): the two
  give different numbers on the same text.
- ``bleu``: TRACE's BLEU-n (metrics.py ``bleu_score``): NLTK's ``sentence_bleu`` with one reference, uniform
  weights over 1..n-grams and no smoothing, on TRACE's tokens (split at whitespace and ``.``, empty pieces
  dropped). No unigram in common gives 0; no n-gram in common for a higher order gives NLTK's near-zero value
  (that order's precision is the smallest float).
- ``token_f1``: SQuAD v1.1's F1 (its official evaluate script ``f1_score``): the harmonic mean of precision and
  recall of the bag of words of the SQuAD-normalised texts; 0 when no word is shared.
- ``edit_similarity``: TRACE's Py150 metric (metrics.py ``caculate_fuzz``): fuzzywuzzy's ``fuzz.ratio``, which
  without python-Levenshtein (TRACE's requirements.txt lists none) is ``round(100 * difflib.SequenceMatcher(None,
  prediction, reference).ratio())`` with 100 for equal strings; divided by 100 here. rapidfuzz's ``fuzz.ratio``
  (a Levenshtein ratio) can differ from it by a few points.
- ``py150_code``: TRACE's Py150 post-processing (evaluations/eval_Py150.py ``postprocess``), applied to prediction
  and reference before the edit similarity (the ``py150_similarity`` metric): the literal placeholders of the
  Py150 token format are written back, ``<NUM_LIT>`` as ``0``, ``<STR_LIT>`` and ``<CHAR_LIT>`` as nothing,
  ``<STR_LIT:x>`` (and NUM, CHAR) as ``x``.

TRACE skips a pair whose prediction or reference is the empty string and still divides by the number of examples,
so an empty prediction scores 0 everywhere; so it does here (ROUGE-L: also a text with no sentence, where the
package raises).
"""

from __future__ import annotations

import difflib
import math
import re
import sys
from collections import Counter

from cl_runner.scoring.answers import squad_normalize

_TRACE_TOKEN_SPLIT = re.compile(r"\s|\.")
_PY150_LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)  # eval_Py150.py:8


# ------------------------------------------------------------------------------------------------------ ROUGE-L
def _sentences(text: str) -> list[list[str]]:
    """The rouge package's sentences (split at ".", whitespace collapsed, empty pieces dropped), as words."""
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if piece]


def _lcs_words(x: list[str], y: list[str]) -> set[str]:
    """The words of the longest common subsequence of ``x`` and ``y``, reconstructed as the rouge package does
    (from the end; on a tie it steps back in ``y``)."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i, word in enumerate(x, 1):
        row, above = table[i], table[i - 1]
        for j, other in enumerate(y, 1):
            row[j] = above[j - 1] + 1 if word == other else max(above[j], row[j - 1])
    words: set[str] = set()
    i, j = len(x), len(y)
    while i and j:
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l(prediction: str, reference: str) -> float:
    """TRACE's ROUGE-L F of ``prediction`` against ``reference`` (see the module docstring)."""
    if not prediction or not reference:
        return 0.0
    # TRACE calls get_scores(target, prediction): the target is the package's hypothesis, the prediction its
    # reference, whose sentences the union runs over
    evaluated, references = _sentences(reference), _sentences(prediction)
    if not evaluated or not references:
        return 0.0
    union: set[str] = set()
    for ref_words in references:
        for eval_words in evaluated:
            union |= _lcs_words(ref_words, eval_words)
    recall = len(union) / len({w for s in references for w in s})
    precision = len(union) / len({w for s in evaluated for w in s})
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


# ------------------------------------------------------------------------------------------------------ BLEU
def trace_tokens(text: str) -> list[str]:
    """TRACE's BLEU tokens: the pieces between whitespace characters and full stops, empty ones dropped."""
    return [token for token in _TRACE_TOKEN_SPLIT.split(text) if token]


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu(reference: list[str], hypothesis: list[str], max_order: int) -> float:
    """NLTK's ``sentence_bleu([reference], hypothesis, weights=(1/max_order,) * max_order)`` with no smoothing."""
    matches, totals = [], []
    for n in range(1, max_order + 1):
        counts, ref_counts = _ngrams(hypothesis, n), _ngrams(reference, n)
        matches.append(sum(min(count, ref_counts[gram]) for gram, count in counts.items()))
        totals.append(max(1, sum(counts.values())))  # NLTK: at least 1 (an n-gram order longer than the text)
    if matches[0] == 0:
        return 0.0
    hyp_len, ref_len = len(hypothesis), len(reference)
    penalty = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    # NLTK's method0: an order with no match counts with the smallest float as its precision
    logs = [(1 / max_order) * math.log(m / t if m else sys.float_info.min) for m, t in zip(matches, totals,
                                                                                         strict=True)]
    return penalty * math.exp(math.fsum(logs))


def bleu(prediction: str, reference: str, max_order: int) -> float:
    """TRACE's BLEU-``max_order`` of one prediction (metrics.py ``bleu_score``)."""
    if not prediction or not reference:
        return 0.0
    return sentence_bleu(trace_tokens(reference), trace_tokens(prediction), max_order)


# ------------------------------------------------------------------------------------------------------ token F1
def token_f1(prediction: str, reference: str) -> float:
    """SQuAD v1.1's token F1."""
    predicted, expected = squad_normalize(prediction).split(), squad_normalize(reference).split()
    same = sum((Counter(predicted) & Counter(expected)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return (2 * precision * recall) / (precision + recall)


# ------------------------------------------------------------------------------------------------------ edit similarity
def edit_similarity(prediction: str, reference: str) -> float:
    """fuzzywuzzy's ``fuzz.ratio(prediction, reference)`` / 100, as TRACE's environment computes it (difflib)."""
    if not prediction or not reference:
        return 0.0
    if prediction == reference:
        return 1.0
    return round(100 * difflib.SequenceMatcher(None, prediction, reference).ratio()) / 100


def py150_code(code: str) -> str:
    """TRACE's ``postprocess`` of Py150 code (evaluations/eval_Py150.py:6-12): placeholders back to literals."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    # as TRACE does it: the matches found first, then each replaced everywhere in turn (not re.sub, whose result
    # differs where one literal's text holds another placeholder)
    for kind, value in _PY150_LITERAL.findall(code):
        code = code.replace(f"<{kind}_LIT:{value}>", value)
    return code


def py150_similarity(prediction: str, reference: str) -> float:
    """TRACE's Py150 score of one example: ``edit_similarity`` of the post-processed texts."""
    return edit_similarity(py150_code(prediction), py150_code(reference))
