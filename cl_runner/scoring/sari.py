"""SARI (Xu et al. 2016) of one simplification, as TRACE computes it for 20Minuten: TRACE's metrics.py
``caculate_sari`` calls the Hugging Face ``sari`` metric (``datasets.load_metric("sari")``, the same code as
``evaluate``'s metrics/sari/sari.py), which is EASSE's / tensor2tensor's variant of the original: 0/0 counts as 1,
and the keep recall divides by the count of kept reference n-grams (the "alleged bug" fix). Source, prediction and
references are lower-cased and tokenised with sacrebleu's ``13a`` tokenizer (the rules of mteval-v13a, written out
below so that SARI needs no sacrebleu at run time; tests compare it with sacrebleu's), then split at single spaces:

    SARI = (mean_n F1_keep(n) + mean_n P_del(n) + mean_n F1_add(n)) / 3,   n = 1..4

where, with S, C and R the n-gram counts of source, candidate (prediction) and the references (each source and
candidate count multiplied by the number of references):
keep: kept = S & C, good = kept & R; P = mean over kept of good/kept, R = sum(good) / sum(S & R), F1 of the two;
delete: deleted = S - C, good = deleted - R; P = mean over deleted of good/deleted;
add (sets of n-grams): added = C - S, good = added & R; P = |good| / |added|, R = |good| / |R - S|, F1.
The metric's score is in [0, 1]; TRACE (and the Hugging Face metric) print it x 100.
"""

from __future__ import annotations

import re
from collections import Counter

# sacrebleu's tokenizer_13a / tokenizer_re rules (mteval-v13a's language-independent and Western parts)
_13A_RULES = (
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # symbols and punctuation on their own
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma unless preceded by a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # ... unless followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # a dash after a digit
)
_ENTITIES = (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"))


def tokenize_13a(line: str) -> str:
    """sacrebleu's ``13a`` tokenisation of one line: tokens joined by single spaces."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        for entity, char in _ENTITIES:
            line = line.replace(entity, char)
    line = f" {line} "
    for pattern, replacement in _13A_RULES:
        line = pattern.sub(replacement, line)
    return " ".join(line.split())


def _grams(words: list[str], n: int) -> list[str]:
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision > 0 or recall > 0 else 0.0


def _sari_ngram(source: list[str], candidate: list[str], references: list[list[str]]) -> tuple[float, float, float]:
    """(keep F1, deletion precision, addition F1) of one n-gram order."""
    n_refs = len(references)
    ref_counts = Counter(gram for ref in references for gram in ref)
    src_counts = Counter({gram: count * n_refs for gram, count in Counter(source).items()})
    cand_counts = Counter({gram: count * n_refs for gram, count in Counter(candidate).items()})

    kept = src_counts & cand_counts
    kept_good = kept & ref_counts
    kept_all = src_counts & ref_counts
    keep_precision = sum(kept_good[g] / kept[g] for g in kept_good) / len(kept) if kept else 1
    keep_recall = sum(kept_good.values()) / sum(kept_all.values()) if kept_all else 1

    deleted = src_counts - cand_counts
    deleted_good = deleted - ref_counts
    del_precision = sum(deleted_good[g] / deleted[g] for g in deleted_good) / len(deleted) if deleted else 1

    added = set(cand_counts) - set(src_counts)
    added_good = added & set(ref_counts)
    added_all = set(ref_counts) - set(src_counts)
    add_precision = len(added_good) / len(added) if added else 1
    add_recall = len(added_good) / len(added_all) if added_all else 1
    return _f1(keep_precision, keep_recall), del_precision, _f1(add_precision, add_recall)


def sari(source: str, prediction: str, references: list[str]) -> float:
    """SARI of ``prediction`` (a simplification of ``source``) against ``references``, in [0, 1]."""
    def words(text: str) -> list[str]:
        return tokenize_13a(text.lower()).split(" ")

    src, cand, refs = words(source), words(prediction), [words(r) for r in references]
    keep, delete, add = [], [], []
    for n in range(1, 5):
        k, d, a = _sari_ngram(_grams(src, n), _grams(cand, n), [_grams(r, n) for r in refs])
        keep.append(k)
        delete.append(d)
        add.append(a)
    return (sum(keep) / 4 + sum(delete) / 4 + sum(add) / 4) / 3
