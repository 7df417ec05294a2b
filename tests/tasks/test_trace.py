"""TRACE (conf/tasks/trace.yaml, cl_runner/tasks/trace.py): its released folder layout, written here a few rows per
task, loads with one setting (TRACE_BENCHMARK_DIR) and gives the rows' prompts and answers byte for byte; a missing
setting, folder or file stops with one line naming it; each task is scored by TRACE's metric for it; and one short
run of experiment=trace_seqft on the tiny model fills the matrix with those metrics."""

import json
from pathlib import Path

import pytest
from helpers import make_config, run_quietly

from cl_runner.core.errors import DataError
from cl_runner.scoring.answers import Reading
from cl_runner.scoring.metrics import metric_named
from cl_runner.scoring.text_metrics import py150_code
from cl_runner.tasks.load import load_sequence, load_task

# folder -> (key, two rows (prompt, answer)) in TRACE's formats (LLM-CL_Benchmark/dataset_examples.txt, commit 4fc6233)
STANCE = "判断以下文本对指定对象的态度。输出支持、反对或中立。\n文本：\n{}\n对象：\n饺子\n态度："
SCIENCE = "Choose an answer for the following question and give your reasons.\nQuestion:\nIs {} cold?\nChoices:\n"
ROWS = {
    "C-STANCE": ("cstance", [(STANCE.format("好吃"), "支持"), (STANCE.format("难吃"), "反对")]),
    "FOMC": ("fomc", [("What is the monetary policy stance for the following text? Please answer 'dovish', 'hawkish' "
                       "or 'neutral'.\nText:\nRates rise.\nStance:", "hawkish"),
                      ("What is the monetary policy stance for the following text? Please answer 'dovish', 'hawkish' "
                       "or 'neutral'.\nText:\nRates fall.\nStance:", "dovish")]),
    "MeetingBank": ("meetingbank", [("Write a summary of the following meeting transcripts.\nMeeting transcripts:\n"
                                     "Item 17. The council adopts the moratorium.\nSummary:",
                                     "The council adopts a moratorium on permits."),
                                    ("Write a summary of the following meeting transcripts.\nMeeting transcripts:\n"
                                     "Item 3. The budget passes.\nSummary:", "The budget passes.")]),
    "Py150": ("py150", [("Complete the next line of the following Python code.\n<s> import sys <EOL> x = ",
                         "print ( <STR_LIT:hi> , <NUM_LIT> )"),
                        ("Complete the next line of the following Python code.\n<s> def f ( ) : <EOL> ",
                         "return <NUM_LIT:1>")]),
    "ScienceQA": ("scienceqa", [(SCIENCE.format("ice") + "A. yes\nB. no\n", "A\nBecause ice is frozen water."),
                                (SCIENCE.format("fire") + "A. yes\nB. no\n", "B\nBecause fire is hot.")]),
    "NumGLUE-cm": ("numglue_cm", [("Solve the following math problem.\nQuestion: 2 apples and 3 apples?\nAnswer:", "5"),
                                  ("Solve the following math problem.\nQuestion: 4 cats and 1 cat?\nAnswer:", "5")]),
    "NumGLUE-ds": ("numglue_ds", [("Solve the following math problem.\nQuestion: 7 minus 2?\nAnswer:", "5"),
                                  ("Solve the following math problem.\nQuestion: 9 minus 3?\nAnswer:", "6")]),
    "20Minuten": ("minuten20", [("Provide a simplified version of the following paragraph in German.\n\nParagraph:\n"
                                 "Der Gemeinderat hat die Vorlage nach langer Debatte angenommen.\nSimplified "
                                 "version:\n", "Der Gemeinderat hat die Vorlage angenommen."),
                                ("Provide a simplified version of the following paragraph in German.\n\nParagraph:\n"
                                 "Die Bahn verkehrt wegen Bauarbeiten unregelmässig.\nSimplified version:\n",
                                 "Die Bahn fährt unregelmässig.")]),
}
ORDER = ["cstance", "fomc", "meetingbank", "py150", "scienceqa", "numglue_cm", "numglue_ds", "minuten20"]
METRICS = {"cstance": "exact_match", "fomc": "exact_match", "meetingbank": "rouge_l", "py150": "py150_similarity",
           "scienceqa": "exact_match", "numglue_cm": "exact_match", "numglue_ds": "exact_match", "minuten20": "sari"}


def trace_benchmark(root: Path, without: tuple[str, str] | None = None) -> Path:
    """TRACE's LLM-CL_Benchmark layout: <Task>/{train,eval,test}.json, each a JSON list of prompt/answer rows."""
    for folder, (_, rows) in ROWS.items():
        for name in ("train.json", "eval.json", "test.json"):
            if (folder, name) != without:
                (root / folder).mkdir(parents=True, exist_ok=True)
                data = [{"prompt": p, "answer": a} for p, a in rows]
                (root / folder / name).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    """TRACE's layout in a folder, and the sequence's eight task configs composed with TRACE_BENCHMARK_DIR set to it
    (the one setting, read by every task's data_dir)."""
    root = trace_benchmark(tmp_path_factory.mktemp("trace") / "LLM-CL_Benchmark")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRACE_BENCHMARK_DIR", str(root))
        return root, make_config("tasks=trace", small=False).tasks


@pytest.fixture(scope="module")
def trace_tasks(benchmark):
    return benchmark[1].tasks


def test_the_sequence_is_traces_order_with_its_metrics_and_epochs(trace_tasks):
    assert [t.name for t in trace_tasks] == ORDER
    assert [t.subset for t in trace_tasks] == list(ROWS)
    assert {t.name: t.metric for t in trace_tasks} == METRICS
    assert [t.epochs for t in trace_tasks] == [5, 3, 7, 5, 3, 5, 5, 7]
    assert all(t.chat_template is False and t.stop == "" for t in trace_tasks)


def test_the_released_layout_loads_with_one_setting(benchmark, tmp_path):
    root, sequence = benchmark
    assert {t.data_dir for t in sequence.tasks} == {str(root)}
    tasks = load_sequence(sequence, seed=0, base_dir=tmp_path)
    assert [t.name for t in tasks] == ORDER
    for task, (folder, (_, rows)) in zip(tasks, ROWS.items(), strict=True):
        assert task.info["source"] == "trace" and task.info["path"] == str(root / folder)
        expected = [(p, a) for p, a in rows]
        for split in (task.train, task.validation, task.test):  # eval.json is the validation split
            assert [(e.prompt, e.target) for e in split] == expected, folder  # the row as it stands, nothing added
        assert task.metric == METRICS[task.name]


def test_a_folder_without_eval_json_holds_out_validation_rows(trace_tasks, tmp_path):
    root = trace_benchmark(tmp_path / "LLM-CL_Benchmark", without=("FOMC", "eval.json"))
    cfg = next(t for t in trace_tasks if t.name == "fomc")
    task = load_task(type(cfg)(**{**vars(cfg), "data_dir": str(root)}), seed=0, base_dir=tmp_path, key="tasks.fomc")
    assert len(task.validation) == 1 and len(task.train) == 1  # validation_fraction of the two training rows


def test_a_missing_setting_folder_or_file_is_one_line_naming_it(trace_tasks, tmp_path):
    cfg = type(trace_tasks[1])(**{**vars(trace_tasks[1]), "data_dir": None})  # TRACE_BENCHMARK_DIR unset
    with pytest.raises(DataError, match=r"^tasks\.tasks\.1\.data_dir: not set; .*set TRACE_BENCHMARK_DIR="):
        load_task(cfg, seed=0, base_dir=tmp_path, key="tasks.tasks.1")
    typo = type(cfg)(**{**vars(cfg), "data_dir": str(tmp_path / "LLM-CL_Benchmrk")})
    with pytest.raises(DataError, match=r"^tasks\.tasks\.1\.data_dir: .*LLM-CL_Benchmrk is not a folder \(TRACE_BENCH"):
        load_task(typo, seed=0, base_dir=tmp_path, key="tasks.tasks.1")
    root = trace_benchmark(tmp_path / "LLM-CL_Benchmark", without=("FOMC", "test.json"))
    missing = type(cfg)(**{**vars(cfg), "data_dir": str(root)})
    with pytest.raises(DataError, match=r"^tasks\.tasks\.1\.data_dir: .*FOMC/test\.json not found \(TRACE's layout"):
        load_task(missing, seed=0, base_dir=tmp_path, key="tasks.tasks.1")


def _score(task_cfg, generated: str, reference: str, source: str = "") -> dict:
    """One example scored as a run scores it (cl_runner/scoring/evaluate.py's Reading of the task's options)."""
    reading = Reading(task_cfg.stop, task_cfg.answer_pattern, task_cfg.normalizer or "default")
    return metric_named(task_cfg.metric).score_example(reading, generated, reference, source)


def test_each_task_is_scored_as_trace_scores_it(trace_tasks):
    by_name = {t.name: t for t in trace_tasks}
    # accuracy: the whole answer, case and punctuation kept (metrics.py caculate_accuracy compares the strings)
    cases = (("cstance", "支持", "支持。"), ("fomc", "hawkish", "Hawkish"), ("numglue_ds", "5", "5.0"))
    for name, right, wrong in cases:
        assert _score(by_name[name], right, right)["correct"] and not _score(by_name[name], wrong, right)["correct"]
    # ScienceQA: the first character is the answer, the rationale does not count (eval_ScienceQA.py:10)
    science = by_name["scienceqa"]
    assert _score(science, "A\nBecause of something else.", "A\nBecause ice is frozen water.")["correct"]
    assert not _score(science, "B\nBecause ice is frozen water.", "A\nBecause ice is frozen water.")["correct"]
    # MeetingBank: ROUGE-L over the whole, multi-sentence output (no stop string cuts it)
    meeting = _score(by_name["meetingbank"], "The council adopts.\nA moratorium.", "The council adopts a moratorium.")
    assert 0 < meeting["rouge_l"] < 1 and meeting["prediction"].endswith("A moratorium.")
    # Py150: literal placeholders written back before the edit similarity (eval_Py150.py postprocess)
    assert _score(by_name["py150"], 'print ( "hi" , 0 )', 'print ( "hi" , <NUM_LIT> )')["py150_similarity"] == 1.0
    assert _score(by_name["py150"], "return 1", "return <NUM_LIT:1>")["py150_similarity"] == 1.0
    # 20Minuten: SARI against the prompt as source: copying the source scores less than the reference itself
    source, reference = ROWS["20Minuten"][1][0]
    sari = by_name["minuten20"]
    assert _score(sari, reference, reference, source)["sari"] > _score(sari, source, reference, source)["sari"]


def test_py150_postprocess_is_tracess():
    assert py150_code("x = <NUM_LIT> + <NUM_LIT:3>") == "x = 0 + 3"
    assert py150_code("f ( <STR_LIT> , <STR_LIT:a b> , <CHAR_LIT:c> , <CHAR_LIT> )") == "f (  , a b , c ,  )"


def test_the_experiments_pin_traces_settings():
    seqft, lora, replay = (make_config(f"experiment=trace_{m}", small=False) for m in ("seqft", "lora", "replay"))
    assert seqft.model.name_or_path == "meta-llama/Llama-2-7b-chat-hf" and seqft.tasks.name == "trace"
    assert (seqft.strategy.name, seqft.train.lr, seqft.train.batch_size) == ("naive", 1e-5, 256)
    assert (lora.strategy.name, lora.train.lr, lora.train.batch_size) == ("shared_lora", 1e-4, 64)
    assert (lora.strategy.rank, lora.strategy.alpha, lora.strategy.dropout) == (8, 32.0, 0.1)
    assert (replay.strategy.name, replay.train.lr, replay.train.batch_size) == ("replay", 1e-5, 256)
    for cfg in (seqft, lora, replay):
        assert (cfg.train.max_length, cfg.eval.max_new_tokens, cfg.train.warmup_ratio) == (1536, 512, 0.0)
        assert cfg.paper["metric"] == "average_accuracy" and "unchecked" in cfg.paper["source"]


def test_the_general_ability_preset_composes_and_no_setting_leaves_data_dir_unset(monkeypatch):
    monkeypatch.delenv("TRACE_BENCHMARK_DIR", raising=False)
    tasks = make_config("tasks=trace", "+tasks/monitor=trace_general", small=False).tasks
    assert {t.data_dir for t in tasks.tasks} == {None}  # what the missing-setting error above starts from
    monitors = tasks.monitor
    assert {k: m.lm_eval for k, m in monitors.items()} == {
        "mmlu": "mmlu", "gsm8k": "gsm8k", "bbh": "bbh", "tydiqa": "tydiqa_goldp_en", "boolq": "boolq", "piqa": "piqa"}
    assert all(m.limit is not None for m in monitors.values())  # small defaults: a sample at every stage


@pytest.mark.slow
def test_a_short_trace_run_on_the_tiny_model_fills_the_matrix_with_traces_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACE_BENCHMARK_DIR", str(trace_benchmark(tmp_path / "LLM-CL_Benchmark")))
    cfg = make_config("experiment=trace_seqft", "model=tiny", "device=cpu", "train.max_steps=1", "train.batch_size=2",
                      "train.grad_accum=1", "train.max_length=128", "eval.max_new_tokens=4", "checkpoint.enabled=false",
                      small=False)
    metrics = run_quietly(cfg, tmp_path / "run", base_dir=tmp_path)
    assert metrics["status"] == "completed" and metrics["experiment_name"] == "trace_seqft"
    assert metrics["tasks"] == ORDER and metrics["metric_per_task"] == [METRICS[n] for n in ORDER]
    assert len(metrics["stages"]) == 9  # init, then after each of the eight tasks
    final = metrics["stages"][-1]["scores"]
    assert all(0.0 <= final[name]["score"] <= 1.0 and final[name]["n"] == 2 for name in ORDER)
    header = (tmp_path / "run" / "accuracy_matrix.csv").read_text().splitlines()[0]
    assert header.split(",")[1:] == ORDER
