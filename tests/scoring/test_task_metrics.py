"""Task metrics are registered objects that everything finds: the config check, scoring, the predictions files,
the plots and the continual-learning metrics' signs. A metric registered in one place works end to end; answers
are read (stop string, extraction, normaliser) as documented; a small generation task runs scored by ROUGE-L."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import make_config, run_quietly, write_jsonl
from scored_items import LABELS, items, tiny_scorer

from cl_runner.config.schema import EvalConfig, TaskConfig
from cl_runner.core.errors import ConfigError
from cl_runner.outputs import plots, predictions
from cl_runner.scoring import cl_metrics, metrics
from cl_runner.scoring.answers import Reading
from cl_runner.scoring.evaluate import score_task
from cl_runner.scoring.metrics import GENERATION, Metric, mean_of
from cl_runner.tasks.base import Task
from cl_runner.tasks.encode import EncodedTask, EvalItem

BUILT_IN = ("exact_match", "label_accuracy", "perplexity", "rouge_l", "bleu_1", "bleu_4", "token_f1",
            "edit_similarity", "py150_similarity", "sari")


def test_every_built_in_metric_is_registered_and_a_task_may_name_it():
    assert metrics.metric_names() == BUILT_IN
    for name in BUILT_IN:
        task = TaskConfig(name="t", path="json", metric=name, labels=["a", "b"])
        assert task.errors("tasks.tasks.0") == [], name
    assert [n for n in BUILT_IN if not metrics.higher_is_better(n)] == ["perplexity"]
    assert [n for n in BUILT_IN if metrics.metric_named(n).graded] == ["exact_match", "label_accuracy"]
    errors = TaskConfig(name="t", path="json", metric="rouge").errors("tasks.tasks.0")
    assert errors == [f"tasks.tasks.0.metric: expected one of {', '.join(BUILT_IN)}, got 'rouge'"]


def test_a_name_is_registered_once_and_a_metric_says_its_pass():
    with pytest.raises(ValueError, match="already registered"):
        metrics.register(metrics.metric_named("rouge_l"))
    with pytest.raises(ValueError, match="needs must be one of generation, labels, perplexity"):
        Metric("m", "beam", mean_of("m"), "m")
    with pytest.raises(ValueError, match="a generation metric"):
        Metric("m", GENERATION, mean_of("m"), "m")


def test_normaliser_and_answer_pattern_options_are_checked_at_config_time():
    assert TaskConfig(name="t", path="p", normalizer="bad", answer_pattern="Answer: (").errors("tasks.tasks.0") == [
        "tasks.tasks.0.normalizer: expected one of default, olora, squad, exact, got 'bad'",
        "tasks.tasks.0.answer_pattern: 'Answer: (' is neither a regular expression (missing ), unterminated "
        "subpattern at position 8) nor one of first_character, letter_after_answer"]
    assert EvalConfig(normalizer="olora", answer_pattern="first_character").errors("eval") == []
    with pytest.raises(ConfigError, match=r"eval.normalizer: expected one of default, olora, squad, exact, got 'x'"):
        make_config("eval.normalizer=x")


# ------------------------------------------------------------------------------------------------------ reading
@pytest.mark.parametrize("normalizer, expected", [
    ("default", ["science & mathematics", "science & mathematics", "the answer: a dog"]),
    ("olora", ["science mathematics", "science mathematics", "the answer a dog"]),
    ("squad", ["science mathematics", "science mathematics", "answer dog"]),
    ("exact", ["Science & Mathematics.", "science & mathematics", "The answer: a dog!"]),
])
def test_each_normaliser_reads_answers_as_its_reference_does(normalizer, expected):
    reading = Reading(stop="\n", normalizer=normalizer)
    texts = [" Science & Mathematics.\nmore", "science & mathematics", "  The answer: a dog!"]
    assert [reading.normalized(t) for t in texts] == expected
    exact = metrics.metric_named("exact_match").score_example  # the reference is read the same way
    assert exact(reading, texts[0], " " + texts[0].upper(), "")["correct"] == (normalizer != "exact")


def test_answer_extraction_runs_after_the_stop_string_and_leaves_unmatched_references_whole():
    letter = Reading(stop="", answer_pattern="letter_after_answer")
    assert letter.answer("It is a mammal, so the whale. Answer: (B) because") == "B"
    assert letter.answer("no answer given") == ""  # a generation without a match: blank
    assert letter.answer(" B", reference=True) == "B"  # a reference without one: kept whole
    first = Reading(stop="", answer_pattern="first_character")  # TRACE's ScienceQA: the output's first character
    assert first.answer(" A\nBecause the magnet ...") == first.answer(" A\nThe force ...", reference=True) == "A"
    assert Reading(stop="\n", answer_pattern=r"Answer:\s*(\w+)").answer("x\nAnswer: yes") == ""  # cut first
    assert Reading(answer_pattern=r"\d+").answer("about 42 apples") == "42"  # no group: the whole match


def test_an_extracted_answer_decides_exact_match():
    scorer = tiny_scorer()
    task = EncodedTask("t", [], [], [EvalItem(it.prompt_ids, it.target_ids, "9") for it in items(scorer)], None)
    plain = score_task(scorer, task, "exact_match", "\n", None, max_new_tokens=3)
    # the generations are token ids written as numbers: the pattern takes the first digit of each
    extracted = score_task(scorer, task, "exact_match", "\n", None, max_new_tokens=3, answer_pattern=r"\d")
    firsts = [found.group(0) if (found := re.search(r"\d", r["generated"])) else "" for r in plain["examples"]]
    assert [r["prediction"] for r in extracted["examples"]] == firsts
    assert extracted["score"] == firsts.count("9") / len(task.test) and plain["score"] == 0.0


# ------------------------------------------------------------------------------------------------------ a new one
def _length_gap(reading: Reading, generated: str, reference: str, source: str) -> dict:
    prediction = reading.answer(generated)
    return {"prediction": prediction, "length_gap": abs(len(prediction) - len(reading.answer(reference)))}


@pytest.fixture
def own_registry(monkeypatch):
    """Metrics registered in a test stay in that test."""
    monkeypatch.setattr(metrics, "TASK_METRICS", dict(metrics.TASK_METRICS))


@pytest.fixture
def length_gap(own_registry):
    """A metric of our own, lower is better and unbounded (the mean gap in characters, plus 1)."""
    return metrics.register(Metric("length_gap", GENERATION, lambda rs: 1.0 + mean_of("length_gap")(rs), "length gap",
                                   higher_is_better=False, bounded=False, score_example=_length_gap))


def test_a_metric_registered_in_one_place_works_end_to_end(length_gap, tmp_path):
    assert TaskConfig(name="t", path="json", metric="length_gap").errors("tasks.tasks.0") == []
    scorer = tiny_scorer()
    task = EncodedTask("t", [], [], items(scorer), None)
    result = score_task(scorer, task, "length_gap", "\n", None, max_new_tokens=3)
    records = result.pop("examples")
    assert result["score"] == 1.0 + sum(r["length_gap"] for r in records) / len(records) > 1.0
    assert all(r["length_gap"] == abs(len(r["generated"].strip()) - len(it.target.strip()))
               for r, it in zip(records, task.test, strict=True))
    # its predictions file holds its field, and the file gives back the score
    spec = [SimpleNamespace(name="t", metric="length_gap")]
    writer = predictions.PredictionWriter(tmp_path, "final", "after_t", spec, lambda j: task.test, scorer.decode)
    writer.write("after_t", {0: records})
    written = predictions.read_records(tmp_path / "predictions" / "after_t" / "t.jsonl")
    assert "length_gap" in written[0] and predictions.score(written, "length_gap") == result["score"]
    assert not predictions.graded("length_gap")
    # its direction reaches the plots, the task and the continual-learning metrics
    assert plots.axis_label("length_gap") == "length gap (lower is better)"
    colours = plots.cell_colours(np.array([[2.0, 0.2], [4.0, 0.9]]), ["length_gap", "exact_match"])
    assert colours[0, 0] > colours[1, 0] and colours[1, 1] > colours[0, 1]  # brighter = better either way
    assert not Task("t", "length_gap", [], [], []).higher_is_better
    summary = cl_metrics.summarize([[2.0, 0.5], [4.0, 0.9]], [9.0, 0.1], [False, True], ["gap", "acc"])
    assert summary["per_task"][0]["forgetting"] == 2.0  # the gap grew from 2 to 4: worse, positive forgetting
    plots.plot_run(tmp_path, ["gap", "acc"], [[9.0, 0.1], [2.0, 0.5], [4.0, 0.9]], ["length_gap", "exact_match"])
    assert (tmp_path / "score_matrix.png").stat().st_size > 10_000


def test_a_bounded_lower_is_better_metric_is_coloured_the_right_way_round(own_registry):
    metrics.register(Metric("error_rate", metrics.LABELS, mean_of("wrong"), "error rate", higher_is_better=False))
    colours = plots.cell_colours(np.array([[0.1], [0.7]]), ["error_rate"])
    assert colours[0, 0] == pytest.approx(0.9) and colours[1, 0] == pytest.approx(0.3)


def test_label_and_perplexity_scores_are_their_metrics_aggregates():
    scorer = tiny_scorer()
    task = EncodedTask("t", [], [], items(scorer), [[20], [21, 22], [23]])
    for name in ("label_accuracy", "perplexity"):
        result = score_task(scorer, task, name, "\n", LABELS)
        assert result["score"] == metrics.metric_named(name).aggregate(result["examples"])


# ------------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_a_generation_task_scored_by_rouge_l_runs_end_to_end(tmp_path):
    rows = [{"text": f"summarise report {i}", "summary": f"the report {i % 3} says growth was {i % 2 + 1} percent"}
            for i in range(8)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[:4])
    task = {"name": "summaries", "path": "json", "data_files": {"train": "train.jsonl", "test": "test.jsonl"},
            "input_column": "text", "target_column": "summary", "metric": "rouge_l", "max_new_tokens": 12}
    cfg = make_config("tasks.name=summaries", "train.epochs=4", tasks=[task])
    result = run_quietly(cfg, tmp_path / "run", base_dir=tmp_path)
    assert result["metric_per_task"] == ["rouge_l"]
    final = result["stages"][-1]["scores"]["summaries"]
    assert 0.0 <= final["score"] <= 1.0 and final["n"] == 4
    records = predictions.read_records(predictions.stage_file(tmp_path / "run", "after_summaries", "summaries"))
    assert all({"generated", "prediction", "rouge_l"} <= set(r) for r in records)
    assert predictions.score(records, "rouge_l") == final["score"] > 0.0  # the words "the report ..." come back
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["average_accuracy"] == final["score"]
