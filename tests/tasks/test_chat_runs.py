"""Whole runs over instruction data with no template written by the user: a chat `messages` jsonl and an Alpaca jsonl,
with a chat template (a tiny GPT-2 over a ChatML tokenizer; replay and packing on, label scoring beside them; LAMOL)
and without one (the CLI on the default tiny model: Alpaca's prompt and a plain transcript); asking for the chat
template of a tokenizer that has none stops the run in one line before anything trains."""

import json

import pytest
from chatml import chatml_tokenizer
from helpers import cl_run, make_config, run_quietly, write_jsonl

from cl_runner.core.errors import ConfigError

CITIES = ["paris", "rome", "oslo", "lima"]
COLOURS = ["red", "blue", "green"]


def _write_data(root):
    messages = [{"messages": [{"role": "user", "content": f"Where does person {i} live?"},
                              {"role": "assistant", "content": CITIES[i % 4]}]} for i in range(12)]
    messages[0]["messages"][:0] = [{"role": "system", "content": "Answer with one word."}]
    alpaca = [{"instruction": f"Name the colour of item {i}.", "input": "" if i % 2 else f"item {i} is bright",
               "output": COLOURS[i % 3]} for i in range(12)]
    sentiment = [{"text": f"the film was {w}", "label": w in ("great", "fine")} for w in ("great", "dull", "fine")]
    write_jsonl(root / "chat.jsonl", messages)
    write_jsonl(root / "alpaca.jsonl", alpaca)
    write_jsonl(root / "sentiment.jsonl", sentiment * 4)
    return [json.dumps(r) for r in messages + alpaca + sentiment]


SEQUENCE = [
    {"name": "where", "path": "json", "format": "messages",
     "data_files": {"train": "chat.jsonl", "test": "chat.jsonl"}},
    {"name": "colour", "path": "json", "format": "alpaca",
     "data_files": {"train": "alpaca.jsonl", "test": "alpaca.jsonl"}},
    {"name": "sentiment", "path": "json", "data_files": {"train": "sentiment.jsonl", "test": "sentiment.jsonl"},
     "input_column": "text", "target_column": "label", "template": "Is this review positive? {input}",
     "verbalizer": {"True": "yes", "False": "no"}, "metric": "label_accuracy"},
]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    chatml_tokenizer(_write_data(root), save_to=root / "tokenizer")
    return root


def _records(run_dir, task):
    path = run_dir / "predictions" / "after_sentiment" / f"{task}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_messages_and_alpaca_files_train_and_score_with_the_chat_template(chat_dir, tmp_path):
    cfg = make_config("tasks.name=chat", f"model.tokenizer={chat_dir / 'tokenizer'}", "tasks.chat_template=true",
                      "strategy=replay", "train.pack=true", "train.epochs=3", "train.keep_best=false", tasks=SEQUENCE)
    result = run_quietly(cfg, tmp_path, base_dir=chat_dir)
    assert result["tasks"] == ["where", "colour", "sentiment"]
    assert result["config"]["tasks"]["chat_template"] is True
    where, colour, sentiment = (_records(tmp_path, t) for t in ("where", "colour", "sentiment"))
    assert where[0]["prompt"] == ("<|im_start|>system\nAnswer with one word.<|im_end|>\n<|im_start|>user\nWhere "
                                  "does person 0 live?<|im_end|>\n<|im_start|>assistant\n")
    assert colour[0]["prompt"] == ("<|im_start|>user\nName the colour of item 0.\n\nitem 0 is bright<|im_end|>\n"
                                   "<|im_start|>assistant\n")
    assert [r["target"] for r in where] == [f" {CITIES[i % 4]}" for i in range(12)]
    # each generation ended at an end-of-turn or ran out of its budget: never a template's next turn
    assert not any("user" in r["generated"] or "assistant" in r["generated"] for r in where + colour)
    assert {r["prediction"] for r in sentiment} <= {" yes", " no"}
    assert all(len(r["label_scores"]) == 2 for r in sentiment)


@pytest.mark.slow
def test_lamol_runs_on_chat_templated_tasks(chat_dir, tmp_path):
    cfg = make_config("tasks.name=chat", f"model.tokenizer={chat_dir / 'tokenizer'}", "tasks.chat_template=true",
                      "strategy=lamol", "train.epochs=2", "train.keep_best=false", tasks=SEQUENCE[:2])
    result = run_quietly(cfg, tmp_path, base_dir=chat_dir)
    lines = [json.loads(line) for line in (tmp_path / "lamol_pseudo_where.jsonl").read_text().splitlines()]
    assert len(lines) == round(0.2 * result["examples"]["colour"]["train"]) > 0
    assert all(line["generated_before"] == "colour" for line in lines)
    assert result["strategy_accounting"]["pseudo_examples"]["where"]["sampled"] == len(lines)


INSTRUCTION_SEQUENCE = """\
name: instructions
tasks:
  - {name: where, path: json, format: messages, data_files: {train: chat.jsonl, test: chat.jsonl}}
  - {name: colour, path: json, format: alpaca, data_files: {train: alpaca.jsonl, test: alpaca.jsonl}}
"""


@pytest.mark.slow
def test_cl_run_reads_messages_and_alpaca_files_without_a_template(chat_dir, tmp_path):
    (tmp_path / "cl-conf" / "tasks").mkdir(parents=True)
    (tmp_path / "cl-conf" / "tasks" / "instructions.yaml").write_text(INSTRUCTION_SEQUENCE, encoding="utf-8")
    for name in ("chat.jsonl", "alpaca.jsonl"):
        (tmp_path / name).write_bytes((chat_dir / name).read_bytes())
    proc = cl_run("tasks=instructions", "device=cpu", "train.epochs=1", "checkpoint.enabled=false",
                  "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = {t: [json.loads(line) for line in (tmp_path / "run" / "predictions" / "after_colour" / f"{t}.jsonl")
                   .read_text(encoding="utf-8").splitlines()] for t in ("where", "colour")}
    assert records["where"][0]["prompt"] == "System: Answer with one word.\nUser: Where does person 0 live?\nAssistant:"
    assert records["colour"][1]["prompt"] == (  # Stanford Alpaca's prompt, its no-input variant for an empty input
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName the colour of item 1.\n\n### Response:")



def test_the_chat_template_of_a_tokenizer_without_one_is_refused_before_anything_trains(chat_dir, tmp_path):
    cfg = make_config("tasks.name=chat", "tasks.chat_template=true", tasks=SEQUENCE[:1])  # tokenizer: trained, plain
    with pytest.raises(ConfigError) as err:
        run_quietly(cfg, tmp_path, base_dir=chat_dir)
    assert str(err.value).startswith("tasks.tasks.0.chat_template: the tokenizer") and "\n" not in str(err.value)
    assert not (tmp_path / "history.jsonl").exists() and not (tmp_path / "checkpoints").exists()
