"""Task metrics: each one registered object that says which evaluation pass it needs, how one example is scored
(its record in predictions/<stage>/<task>.jsonl), how the records make the task's score, which way is better,
whether each example is right or wrong, and how plots label it. Everything that needs a metric finds it here: the
config check of a task's ``metric:``, scoring (cl_runner/scoring/evaluate.py ``score_task``), the predictions files
and ``cl-report --flips``, the plots, the sign the continual-learning metrics give a task. Adding a metric is one
``register(Metric(...))``: docs/metrics.md says how.

"Task metrics" are the per-task scores that fill the score matrix; a run's summary numbers (average accuracy,
forgetting, ...) are cl_runner/scoring/cl_metrics.py's and cl_runner/outputs/report.py's.

A leaf: imports no other part of cl-runner except the pure text-scoring modules beside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from cl_runner.scoring import text_metrics
from cl_runner.scoring.answers import Reading
from cl_runner.scoring.sari import sari

# The evaluation passes (cl_runner/scoring/evaluate.py): greedy generation, then the metric scores each text;
# scoring every candidate label of a label set; the NLL of the target tokens
GENERATION, LABELS, PERPLEXITY = "generation", "labels", "perplexity"
PASSES = (GENERATION, LABELS, PERPLEXITY)

Record = dict[str, Any]
# A generation metric's per-example scoring: (reading, generated text, reference, source) -> the record's fields
# after "generated"; it must hold "prediction" (the answer as scored, "" for a blank one)
ScoreExample = Callable[[Reading, str, str, str], Record]


@dataclass(frozen=True)
class Metric:
    """One task metric (see the module docstring)."""

    name: str  # what a task's `metric:` says
    needs: str  # its evaluation pass: generation | labels | perplexity
    aggregate: Callable[[list[Record]], float]  # the task's score from its records, in example order
    label: str  # axis and column label in plots
    higher_is_better: bool = True
    graded: bool = False  # each record has "correct" (a right or wrong answer per example; cl-report --flips)
    bounded: bool = True  # scores lie in [0, 1] (plots colour them on a fixed scale); else positive, log-scaled
    score_example: ScoreExample | None = None  # generation metrics only

    def __post_init__(self) -> None:
        if self.needs not in PASSES:
            raise ValueError(f"metric {self.name}: needs must be one of {', '.join(PASSES)}, got {self.needs!r}")
        if (self.needs == GENERATION) != (self.score_example is not None):
            raise ValueError(f"metric {self.name}: a generation metric (and only one) has a score_example")


TASK_METRICS: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Make ``metric`` usable by every task (``metric: <name>``); a name is registered once."""
    if metric.name in TASK_METRICS:
        raise ValueError(f"a task metric named {metric.name!r} is already registered")
    TASK_METRICS[metric.name] = metric
    return metric


def metric_names() -> tuple[str, ...]:
    return tuple(TASK_METRICS)


def find(name: str) -> Metric | None:
    """The registered metric ``name``, or None (e.g. an lm-evaluation-harness score key, or an older run's name)."""
    return TASK_METRICS.get(name)


def metric_named(name: str) -> Metric:
    metric = TASK_METRICS.get(name)
    if metric is None:
        raise ValueError(f"metric: expected one of {', '.join(TASK_METRICS)}, got {name!r}")
    return metric


def needs(name: str) -> str | None:
    """The evaluation pass metric ``name`` needs; None for a name that is not registered."""
    metric = find(name)
    return metric.needs if metric is not None else None


def higher_is_better(name: str) -> bool:
    """The direction of ``name``; a name that is not registered reads as higher-is-better (an accuracy)."""
    metric = find(name)
    return metric.higher_is_better if metric is not None else True


# ------------------------------------------------------------------------------------------------------ aggregates
def mean_of(field: str) -> Callable[[list[Record]], float]:
    """The mean of the records' ``field`` (booleans count 1 and 0; an exact sum, so in any order); 0 for none."""
    def aggregate(records: list[Record]) -> float:
        return math.fsum(r[field] for r in records) / max(len(records), 1)

    return aggregate


def perplexity_of(records: list[Record]) -> float:
    """exp of the mean NLL per target token over the records (token-weighted), capped at exp(50)."""
    tokens = sum(r["tokens"] for r in records)
    return math.exp(min(math.fsum(r["nll"] for r in records) / max(tokens, 1), 50.0))


# ------------------------------------------------------------------------------------------------------ examples
def exact(reading: Reading, generated: str, reference: str, source: str) -> Record:
    prediction = reading.normalized(generated)
    return {"prediction": prediction, "correct": prediction == reading.normalized(reference, reference=True)}


def text_score(name: str, score: Callable[[str, str], float]) -> ScoreExample:
    """Per-example scoring by ``score(prediction, reference)`` on the read answers, recorded under ``name``."""
    def score_example(reading: Reading, generated: str, reference: str, source: str) -> Record:
        prediction = reading.answer(generated)
        return {"prediction": prediction, name: score(prediction, reading.answer(reference, reference=True))}

    return score_example


def _sari(reading: Reading, generated: str, reference: str, source: str) -> Record:
    prediction = reading.answer(generated)
    return {"prediction": prediction, "sari": sari(source, prediction, [reading.answer(reference, reference=True)])}


def _text_metric(name: str, label: str, score: Callable[[str, str], float]) -> Metric:
    return Metric(name, GENERATION, mean_of(name), label, score_example=text_score(name, score))


# ------------------------------------------------------------------------------------------------------ built in
register(Metric("exact_match", GENERATION, mean_of("correct"), "exact match", graded=True, score_example=exact))
register(Metric("label_accuracy", LABELS, mean_of("correct"), "label accuracy", graded=True))
register(Metric("perplexity", PERPLEXITY, perplexity_of, "perplexity", higher_is_better=False, bounded=False))
register(_text_metric("rouge_l", "ROUGE-L", text_metrics.rouge_l))
register(_text_metric("bleu_1", "BLEU-1", partial(text_metrics.bleu, max_order=1)))
register(_text_metric("bleu_4", "BLEU-4", partial(text_metrics.bleu, max_order=4)))
register(_text_metric("token_f1", "token F1", text_metrics.token_f1))
register(_text_metric("edit_similarity", "edit similarity", text_metrics.edit_similarity))
register(_text_metric("py150_similarity", "edit similarity (Py150)", text_metrics.py150_similarity))
register(Metric("sari", GENERATION, mean_of("sari"), "SARI", score_example=_sari))
