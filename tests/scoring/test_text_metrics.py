"""The generation metrics give the published implementations' numbers: known answers from the references' own
documentation and examples, values computed by hand from their formulas, and (where the reference package is
installed, as in the dev environment) equality with it on random texts."""

from __future__ import annotations

import math
import random
import sys
import warnings

import pytest

from cl_runner.scoring.answers import olora_normalize, squad_normalize
from cl_runner.scoring.sari import sari, tokenize_13a
from cl_runner.scoring.text_metrics import bleu, edit_similarity, rouge_l, token_f1, trace_tokens

# The example of the rouge package's README (pltrdy/rouge, version 1.0.1, the one TRACE pins), its whitespace kept
README_HYPOTHESIS = ("the #### transcript is a written version of each day 's cnn student news program use this "
                     "transcript to he    lp students with reading comprehension and vocabulary use the weekly "
                     "newsquiz to test your knowledge of storie s you     saw on cnn student news")
README_REFERENCE = ("this page includes the show transcript use the transcript to help students with reading "
                    "comprehension and     vocabulary at the bottom of the page , comment for a chance to be mentioned "
                    "on cnn student news . you must be a teac    her or a student age # # or older to request a "
                    "mention on the cnn student news roll call . the weekly newsquiz tests     students ' knowledge "
                    "of even ts in the news")


def _random_texts(seed: int, words: list[str], n: int = 1500) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(" ".join(rng.choice(words) for _ in range(rng.randint(1, 14))),
             " ".join(rng.choice(words) for _ in range(rng.randint(1, 14)))) for _ in range(n)]


# ------------------------------------------------------------------------------------------------------ ROUGE-L
def test_rouge_l_is_the_rouge_packages_readme_example():
    # README: Rouge().get_scores(hypothesis, reference) -> "rouge-l": {"f": 0.44705881864636676, ...}; TRACE calls
    # get_scores(target, prediction), so the README's hypothesis is the reference here
    assert rouge_l(README_REFERENCE, README_HYPOTHESIS) == 0.44705881864636676


def test_rouge_l_counts_distinct_words_and_adds_1e8_as_the_package_does():
    # one sentence each: LCS "the cat on the mat" has 5 tokens but 4 distinct words; each text has 5 distinct words
    # (rouge-score's ROUGE-L F1 would be 5/6 = 0.833: a different number)
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == 2.0 * ((0.8 * 0.8) / (0.8 + 0.8 + 1e-8))
    assert rouge_l("the cat", "the cat") == 2.0 * (1.0 / (2.0 + 1e-8))


def test_rouge_l_is_not_rouge_scores():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    google = rouge_scorer.RougeScorer(["rougeL"]).score("the cat is on the mat", "the cat sat on the mat")
    assert google["rougeL"].fmeasure == pytest.approx(5 / 6) != pytest.approx(rouge_l("the cat sat on the mat",
                                                                                        "the cat is on the mat"))


def test_rouge_l_is_summary_level_over_sentences_split_at_full_stops():
    # sentences "a b" / "c d" against "a c" / "b d": the union of the pairwise LCS words is all four (a single
    # sequence "a b c d" against "a c b d" has an LCS of 3)
    assert rouge_l("a b. c d", "a c. b d") == 2.0 * (1.0 / (2.0 + 1e-8))
    assert rouge_l("a b c d", "a c b d") == 2.0 * ((0.75 * 0.75) / (1.5 + 1e-8))


def test_rouge_l_of_an_empty_text_is_zero():
    assert rouge_l("", "the cat") == rouge_l("the cat", "") == rouge_l("...", "the cat") == 0.0


# ------------------------------------------------------------------------------------------------------ BLEU
def test_trace_bleu_tokens_split_at_whitespace_and_full_stops():
    assert trace_tokens(" The cat.sat\ton  the mat. ") == ["The", "cat", "sat", "on", "the", "mat"]


def test_bleu_known_answers_by_hand():
    # "the cat sat on the mat" vs "the cat sat on the red mat": 1..4-gram precisions 6/6, 4/5, 3/4, 2/3, 6 tokens
    # against 7, brevity penalty exp(1 - 7/6)
    prediction, reference = "the cat sat on the mat", "the cat sat on the red mat"
    assert bleu(prediction, reference, 1) == pytest.approx(math.exp(1 - 7 / 6), rel=1e-15)
    assert bleu(prediction, reference, 4) == pytest.approx(math.exp(1 - 7 / 6) * (0.8 * 0.75 * 2 / 3) ** 0.25,
                                                           rel=1e-12)
    # no 4-gram in common: NLTK (no smoothing) counts that precision as the smallest float, not 0
    close = bleu("the cat sat on the mat", "the cat is on the mat", 4)
    assert close == pytest.approx(math.exp(0.25 * (math.log(5 / 6) + math.log(3 / 5) + math.log(1 / 4)
                                                   + math.log(sys.float_info.min))), rel=1e-9)
    assert 0 < close < 1e-70
    assert bleu("the cat sat on the mat", "the cat is on the mat", 1) == 5 / 6
    assert bleu("dog", "the cat", 1) == bleu("", "the cat", 4) == 0.0


def test_bleu_equals_nltks_sentence_bleu_on_traces_tokens():
    translate = pytest.importorskip("nltk.translate.bleu_score")
    words = ["the", "cat", "sat", "on", "mat", "a", "red", ".", "dog", "the."]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLTK warns of every order with no n-gram in common
        for prediction, reference in _random_texts(0, words):
            for order, weights in ((1, (1.0,)), (4, (0.25,) * 4)):  # TRACE's bleu_score(reference, hypothesis, n)
                expected = translate.sentence_bleu([trace_tokens(reference)], trace_tokens(prediction), weights)
                assert bleu(prediction, reference, order) == expected, (prediction, reference, order)


# ------------------------------------------------------------------------------------------------------ token F1
def test_token_f1_is_squads():
    # SQuAD normalisation: "eiffel tower paris" (3 words) against "eiffel tower in paris" (4): P 1, R 3/4
    assert token_f1("The Eiffel Tower, Paris", "Eiffel tower in Paris") == 2 * 0.75 / 1.75
    assert token_f1("a cat", "The cat!") == 1.0  # articles and punctuation do not count
    assert token_f1("dog dog", "dog") == 2 * 0.5 / 1.5  # bags of words: one "dog" matches
    assert token_f1("dog", "cat") == token_f1("", "cat") == token_f1("the", "the") == 0.0  # v1.1: no word, 0


def test_the_normalisers_are_squads_and_olora():
    assert squad_normalize("The  Answer: a dog's bone.") == "answer dogs bone"
    assert olora_normalize("The  Answer: a dog's bone.") == "the answer a dogs bone"  # keeps the articles
    assert olora_normalize("Science & Mathematics") == "science mathematics"


# ------------------------------------------------------------------------------------------------------ edit similarity
def test_edit_similarity_is_fuzzywuzzys_ratio_as_trace_runs_it():
    assert edit_similarity("this is a test", "this is a test!") == 0.97  # fuzzywuzzy's README
    assert edit_similarity("fuzzy wuzzy was a bear", "wuzzy fuzzy was a bear") == 0.91  # its README too
    # difflib's matching blocks (fuzzywuzzy without python-Levenshtein, TRACE's requirements), not the longest
    # common subsequence of a Levenshtein ratio (rapidfuzz: 2 * 3 / 12 = 0.50)
    assert edit_similarity("ababb", "bbbaacc") == 0.33
    assert edit_similarity("x = 1", "x = 1") == 1.0
    assert edit_similarity("", "x = 1") == edit_similarity("x = 1", "") == 0.0  # TRACE skips them, counted as 0


# ------------------------------------------------------------------------------------------------------ SARI
def test_sari_is_the_hugging_face_metrics_example():
    # metrics/sari/sari.py's docstring: sari.compute(...) -> {'sari': 26.953601953601954}
    references = ["About 95 species are currently known .", "About 95 species are now accepted .",
                  "95 species are now accepted ."]
    assert 100 * sari("About 95 species are currently accepted .", "About 95 you now get in .", references) \
        == 26.953601953601954


def test_sari_by_hand():
    assert sari("a b", "a b", ["a b"]) == 1.0  # 0/0 counts as 1: a prediction equal to every text scores 1
    # copying the source "a b c d" when the reference is "a b": keep F1 per order 2/3, 1/2, 0, 0 (the source's 3-
    # and 4-grams are kept, none is in the reference); deleting nothing has precision 1; adding nothing scores 1
    assert sari("a b c d", "a b c d", ["a b"]) == ((2 / 3 + 0.5 + 0 + 0) / 4 + 1 + 1) / 3
    assert sari("A B", "a b", ["a b"]) == 1.0  # lower-cased


def test_the_13a_tokenizer_is_sacrebleus():
    assert tokenize_13a("Hello, world! (It's 3.5-4 km.)") == "Hello , world ! ( It's 3.5 - 4 km . )"
    sacrebleu = pytest.importorskip("sacrebleu")
    theirs = sacrebleu.metrics.bleu._get_tokenizer("13a")()
    rng = random.Random(1)
    chars = "ab c.,-&;:!?\"'()[]{}<>/\\0123 \n"
    for _ in range(2000):
        line = "".join(rng.choice(chars) for _ in range(rng.randint(0, 30)))
        assert tokenize_13a(line) == theirs(line), line
    assert tokenize_13a("a &amp; b &lt;skipped&gt;<skipped>") == theirs("a &amp; b &lt;skipped&gt;<skipped>")
