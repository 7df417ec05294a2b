"""The instruction-data readers (cl_runner/tasks/formats.py): chat `messages` rows and Alpaca rows become examples
with no template written; a bad row stops the run with one line naming its file and line; the format and chat
options are checked, each naming its key; the sequence's chat defaults reach the tasks that leave theirs null."""

import json

import pytest
from helpers import make_config, write_jsonl

from cl_runner.config.schema import TaskConfig
from cl_runner.core.errors import ConfigError, DataError
from cl_runner.tasks import load_sequence
from cl_runner.tasks.formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT
from cl_runner.tasks.load import load_task

CONVERSATION = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris"}]
MESSAGES = [{"messages": CONVERSATION}] + [{"messages": [{"role": "user", "content": f"Say {w}"},
                                                         {"role": "assistant", "content": w}]}
                                           for w in ("one", "two", "three", "four")]
ALPACA = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
          {"instruction": "Name a colour.", "input": "", "output": "Red"},
          {"instruction": "Name a fruit.", "output": "Apple"}]  # "input" may be missing


def _task(tmp_path, fmt, rows, **keys):
    path = write_jsonl(tmp_path / f"{fmt}.jsonl", rows)
    cfg = TaskConfig(name="t", path="json", format=fmt, data_files={"train": str(path), "test": str(path)}, **keys)
    return load_task(cfg, 0, tmp_path, "tasks.tasks.0")


def test_messages_rows_become_the_conversation_and_its_last_answer(tmp_path):
    test = _task(tmp_path, "messages", MESSAGES).test
    first = test[0]
    assert first.messages == (("system", "Be terse."), ("user", "Hi"), ("assistant", "Hello."),
                              ("user", "Capital of France?"))
    assert first.target == " Paris"  # target_template applies as in every format
    # without a chat template the prompt is a plain transcript ending with the assistant's cue
    assert first.prompt == "System: Be terse.\nUser: Hi\nAssistant: Hello.\nUser: Capital of France?\nAssistant:"
    assert [e.messages for e in test[1:]] == [(("user", f"Say {w}"),) for w in ("one", "two", "three", "four")]


def test_alpaca_rows_get_alpacas_own_prompt_and_the_instruction_as_the_user_turn(tmp_path):
    test = _task(tmp_path, "alpaca", ALPACA, target_template="{target}").test
    assert test[0].prompt == ALPACA_PROMPT.format(instruction="Add the numbers.", input="2 and 3")
    assert test[0].prompt.endswith("### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:")
    assert test[1].prompt == ALPACA_PROMPT_NO_INPUT.format(instruction="Name a colour.")  # empty input: no section
    assert test[2].prompt == ALPACA_PROMPT_NO_INPUT.format(instruction="Name a fruit.")
    assert [e.target for e in test] == ["5", "Red", "Apple"]
    assert [e.messages for e in test] == [(("user", "Add the numbers.\n\n2 and 3"),), (("user", "Name a colour."),),
                                         (("user", "Name a fruit."),)]


BAD_MESSAGES = [
    ({"text": "hi"}, "no 'messages'"),
    ({"messages": "hi"}, "'messages' is a string, not a list of turns"),
    ({"messages": []}, "'messages' is an empty list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                   {"role": "user", "content": "and?"}]}, "the last message is the user's"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]}, "message 0 has no 'content'"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "yo"}]},
     "message 0 (user) has content that is a number, not a string"),
    ({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "yo"}]}, "has role 'bot'"),
    ({"messages": [{"role": "system", "content": "x"}, {"role": "assistant", "content": "yo"}]}, "no user turn"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}, "answer"),
]
BAD_ALPACA = [
    ({"instruction": "x"}, "no 'output'"),
    ({"output": "x"}, "no 'instruction'"),
    ({"instruction": "x", "output": 5}, "'output' is a number, not a string"),
    ({"instruction": "x", "input": ["a"], "output": "y"}, "'input' is a list, not a string"),
    ({"instruction": "x", "output": ""}, "'output' is empty"),
]


@pytest.mark.parametrize(("fmt", "row", "message"), [("messages", *b) for b in BAD_MESSAGES] +
                         [("alpaca", *b) for b in BAD_ALPACA])
def test_a_bad_row_is_one_line_naming_the_file_and_line(tmp_path, fmt, row, message):
    good = MESSAGES[1] if fmt == "messages" else ALPACA[0]
    with pytest.raises(DataError) as err:
        _task(tmp_path, fmt, [good, good, row, good])
    text = str(err.value)
    assert "\n" not in text and message in text
    assert text.startswith(f"tasks.tasks.0.data_files: {tmp_path / (fmt + '.jsonl')} line 3: "), text


def test_a_json_list_file_names_the_row(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([ALPACA[0], {"instruction": "x"}]), encoding="utf-8")
    cfg = TaskConfig(name="t", path="json", format="alpaca", data_files={"train": str(path), "test": str(path)})
    with pytest.raises(DataError, match=r"alpaca.json row 2: no 'output'"):
        load_task(cfg, 0, tmp_path, "tasks.tasks.0")
    path.write_text(json.dumps(ALPACA), encoding="utf-8")  # Alpaca's own alpaca_data.json is such a list
    assert [e.target for e in load_task(cfg, 0, tmp_path, "tasks.tasks.0").test] == [" 5", " Red", " Apple"]


def test_a_file_without_the_formats_key_names_the_column(tmp_path):
    with pytest.raises(DataError, match=r"no 'messages'"):
        _task(tmp_path, "messages", [{"question": "q", "answer": "a"}] * 3)


def test_answers_outside_the_label_set_are_refused(tmp_path):
    rows = [{"instruction": "Sentiment of: good", "output": "positive"}, {"instruction": "of: meh", "output": "meh"}]
    with pytest.raises(DataError, match=r"tasks.tasks.0.labels: \w+ row \d+ has answer 'meh', not one of positive"):
        _task(tmp_path, "alpaca", rows, labels=["positive", "negative"], metric="label_accuracy")


def _sequence(tmp_path, *overrides, tasks):
    for task in tasks:
        task.setdefault("path", "json")
        write_jsonl(tmp_path / "m.jsonl", MESSAGES)
        task.setdefault("data_files", {"train": str(tmp_path / "m.jsonl"), "test": str(tmp_path / "m.jsonl")})
    return make_config("tasks.name=s", *overrides, tasks=tasks)


def test_the_sequences_chat_defaults_reach_the_tasks_that_leave_theirs_null(tmp_path):
    cfg = _sequence(tmp_path, "tasks.chat_template=true", "tasks.system_prompt=Be kind.", tasks=[
        {"name": "a", "format": "messages"},
        {"name": "b", "format": "messages", "system_prompt": "Be brief."},
        {"name": "c", "format": "messages", "chat_template": False, "system_prompt": None}])
    a, b, c = load_sequence(cfg.tasks, 0, tmp_path)
    assert (a.chat.key, a.chat.system_prompt) == ("tasks.tasks.0.chat_template", "Be kind.")
    assert b.chat.system_prompt == "Be brief."
    assert c.chat is None
    plain = load_sequence(_sequence(tmp_path, tasks=[{"name": "a", "format": "messages"}]).tasks, 0, tmp_path)
    assert plain[0].chat is None  # off by default


@pytest.mark.parametrize(("overrides", "task", "message"), [
    ((), {"format": "sharegpt"}, "tasks.tasks.0.format: expected one of columns, messages, alpaca, got 'sharegpt'"),
    ((), {"format": "messages", "template": "{x}"}, "tasks.tasks.0.template: not used by format: messages"),
    ((), {"format": "alpaca", "target_column": "out"}, "tasks.tasks.0.target_column: not used by format: alpaca"),
    ((), {"format": "alpaca", "max_train_per_class": 2}, "tasks.tasks.0.max_train_per_class: not used by format"),
    ((), {"system_prompt": "x"}, "tasks.tasks.0.system_prompt: only used with chat_template: true"),
    (("tasks.system_prompt=x",), {}, "tasks.system_prompt: only used with chat_template: true"),
    (("tasks.chat_template=true",), {"input_column": None, "template": "", "metric": "perplexity"},
     "tasks.tasks.0.chat_template: a plain-text task (input_column: null) has no user turn"),
])
def test_bad_format_and_chat_options_name_their_key(tmp_path, overrides, task, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _sequence(tmp_path, *overrides, tasks=[{"name": "a", **task}])


def test_a_monitor_checks_its_own_chat_options(tmp_path):
    with pytest.raises(ConfigError, match=r"tasks.monitor.m.system_prompt: only used with chat_template: true"):
        make_config("+tasks.monitor.m={source: facts, relation: color, num_subjects: 4, system_prompt: hi}",
                    "tasks.chat_template=true")  # the sequence's default does not reach monitors
