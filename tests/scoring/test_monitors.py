"""Monitor tasks (tasks.monitor, docs/monitors.md): extra columns scored at every stage, never trained, kept out of
ACC/forgetting/BWT/FWT; an lm-evaluation-harness task (a local YAML over a local jsonl) as a monitor, offline."""

import csv
import importlib.util
import json

import pytest
import torch
from helpers import make_config, run_quietly, write_jsonl

from cl_runner.config.schema import as_dict
from cl_runner.core.errors import ConfigError
from cl_runner.engine import run as run_module
from cl_runner.scoring import cl_metrics as metrics
from cl_runner.scoring import monitors

SMALL = ["train.epochs=2", "checkpoint.enabled=false", *(f"tasks.tasks.{i}.num_subjects=12" for i in range(3))]
LM_EVAL_TASK = """task: cl_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _write_monitor_data(root):
    qa = [{"question": f"what is {a} plus {b}?", "answer": str(a + b)} for a in range(3) for b in range(2)]
    write_jsonl(root / "sums.jsonl", qa)
    mc = [{"question": f"is {w} a colour?", "choices": ["yes", "no"], "label": int(w in "sky tree")}
          for w in ("red", "blue", "sky", "tree", "green", "pink")]
    write_jsonl(root / "mc.jsonl", mc)
    (root / "lm_tasks").mkdir()
    (root / "lm_tasks" / "cl_local_mc.yaml").write_text(LM_EVAL_TASK.format(data=root / "mc.jsonl"))


MONITORS = ["+tasks.monitor.sums={path: json, data_files: {test: sums.jsonl}, train_split: test, "
            "input_column: question, target_column: answer}",
            "+tasks.monitor.harness={lm_eval: cl_local_mc, include_path: lm_tasks, limit: 4, num_fewshot: 1}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same small run with the two monitors and without: its metrics, matrix rows and final weights."""
    root = tmp_path_factory.mktemp("monitors")
    _write_monitor_data(root)
    out, finish = {}, run_module.finish

    def keep_weights(parts, *args):
        out[parts.run_dir.name + "/weights"] = {k: v.detach().clone() for k, v in parts.model.state_dict().items()}
        return finish(parts, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_module, "finish", keep_weights)
        patch.chdir(root)
        for name, extra in (("with", MONITORS), ("without", [])):
            out[name] = run_quietly(make_config(*SMALL, *extra), root / name, base_dir=root)
            out[name + "/rows"] = list(csv.reader((root / name / "accuracy_matrix.csv").open()))
            lines = (root / name / "history.jsonl").read_text().splitlines()
            out[name + "/history"] = [{k: r[k] for k in ("task", "epoch", "step", "train_loss", "validation_score")}
                                      for r in map(json.loads, lines)]
    return out


@pytest.mark.slow
def test_monitor_columns_are_extra_and_outside_the_sequence_metrics(runs):
    header, *rows = runs["with/rows"]
    assert header == ["stage", "color", "city", "food", "monitor:sums", "monitor:harness"]
    assert runs["without/rows"][0] == header[:4]
    sequence = [[float(v) for v in row[1:4]] for row in rows]
    expected = metrics.summarize(sequence[1:], sequence[0], [True] * 3, ["color", "city", "food"])
    m = runs["with"]
    for key in ("average_accuracy", "average_forgetting", "backward_transfer", "forward_transfer"):
        assert m[key] == expected[key] == runs["without"][key]
    assert [t["task"] for t in m["per_task"]] == ["color", "city", "food"]
    sums = [float(row[4]) for row in rows]
    summary = m["monitors"]["sums"]
    assert (summary["init"], summary["final"]) == (sums[0], sums[-1])
    assert summary["drop"] == pytest.approx(sums[0] - sums[-1]) and summary["worst"] == min(sums)
    assert summary["worst_stage"] == rows[sums.index(min(sums))][0]
    assert "monitors" not in runs["without"] and m["monitor_tasks"]["harness"]["lm_eval"] == "cl_local_mc"


@pytest.mark.slow
def test_monitors_never_reach_training(runs):
    """The weights, the training history and the sequence's scores are those of the run without monitors (the
    tiny model trains with dropout, so a monitor that moved the random stream would change them too)."""
    with_w, without_w = runs["with/weights"], runs["without/weights"]
    assert with_w.keys() == without_w.keys()
    assert all(torch.equal(with_w[k], without_w[k]) for k in with_w)
    assert runs["with/history"] == runs["without/history"]
    assert [r[:4] for r in runs["with/rows"]] == runs["without/rows"]


@pytest.mark.slow
def test_lm_eval_local_task_runs_as_a_monitor_offline(runs):
    stages = runs["with"]["stages"]
    results = [s["monitors"]["harness"] for s in stages]
    assert len(results) == 4  # init and after each of the 3 tasks
    for r in results:
        assert r["n"] == 4 and r["score_key"] == "acc,none" and r["score"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert [float(row[5]) for row in runs["with/rows"][1:]] == [r["score"] for r in results]


def test_summary_reads_perplexity_drops_as_worse():
    stages = [{"stage": s, "monitors": {"ppl": {"score": v, "higher_is_better": False}}}
              for s, v in (("init", 10.0), ("after_a", 30.0), ("after_b", 20.0))]
    assert monitors.summarize(stages, ["ppl"]) == {"ppl": {
        "init": 10.0, "final": 20.0, "drop": 10.0, "worst_stage": "after_a", "worst": 30.0,
        "higher_is_better": False, "seconds": 0.0}}


def test_harness_result_takes_the_first_metric_or_score_key():
    out = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.7}},
           "higher_is_better": {"t": {"acc": True}}, "n-samples": {"t": {"original": 9, "effective": 4}}}
    monitor = monitors.Monitor("m", make_config("+tasks.monitor.m={lm_eval: t}").tasks.monitor["m"])
    assert monitors.harness_result(out, monitor) == {"score": 0.5, "n": 4, "score_key": "acc,none",
                                                     "higher_is_better": True}
    monitor.cfg.score_key = "acc_norm,none"
    assert monitors.harness_result(out, monitor)["score"] == 0.7


def test_missing_lm_eval_package_is_named(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(ConfigError, match=r"tasks.monitor.mmlu.lm_eval: needs the lm_eval package, which is not "
                                          r"installed \(pip install 'cl-runner\[lm_eval\]'\)"):
        make_config("+tasks.monitor.mmlu={lm_eval: mmlu}")


def test_monitor_files_compose(tmp_path):
    cfg = make_config("+tasks/monitor=[text_perplexity,wordnet_probe,mmlu]")
    assert list(cfg.tasks.monitor) == ["text_perplexity", "wordnet_probe", "mmlu"]
    assert cfg.tasks.monitor["wordnet_probe"].metric == "label_accuracy"
    assert (cfg.tasks.monitor["mmlu"].lm_eval, cfg.tasks.monitor["mmlu"].limit) == ("mmlu", 20)
    assert json.dumps(as_dict(cfg))  # metrics.json's config holds them as plain data
