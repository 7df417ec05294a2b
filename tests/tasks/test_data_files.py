"""What a task's data may hold and what is refused rather than reinterpreted (round three): a list or mapping where
text belongs, a CSV quote that is never closed, a file ``datasets`` cannot read among several (each named with its
file and line or row); a UTF-8 byte-order mark, accepted in every format and never part of a prompt; a tokenizer
too small for its own byte symbols. The CLI side of each refusal is in tests/cli/test_bad_inputs.py."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from bad_files import GOOD, GOOD_LINES, write_data_files

from cl_runner.config.schema import MIN_TOKENIZER_VOCAB, ModelConfig, TaskConfig
from cl_runner.core.errors import DataError, ModelError
from cl_runner.models.load import train_tokenizer
from cl_runner.tasks.files import check_json_lines
from cl_runner.tasks.load import doubled_cue, load_task

KEY = "tasks.tasks.0"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_data_files(root)
    return root


def load(root: Path, train: str, builder: str = "json", test: str | None = None, **options):
    cfg = TaskConfig(name="t", path=builder, data_files={"train": train, "test": test or train},
                     **({"input_column": "question", "target_column": "answer"} | options))
    return load_task(cfg, 0, root, KEY)


# ----------------------------------------------------------------------------------------- no text where text belongs
@pytest.mark.parametrize(("name", "message"), [
    ("list_value.jsonl", f"{KEY}.data_files: {{root}}/list_value.jsonl line 3: column 'question' holds a list, not "
                         "text (a string or number); give it the text to train on"),
    ("dict_value.jsonl", f"{KEY}.data_files: {{root}}/dict_value.jsonl line 3: column 'answer' holds a mapping"),
    ("list_value.json", f"{KEY}.input_column: split 'train' of {{root}}/list_value.json, row 3: column 'question' "
                        "holds a list"),
])
def test_a_list_or_mapping_where_text_belongs_is_named_by_file_line_and_column(files, name, message):
    with pytest.raises(DataError) as info:
        load(files, name)
    assert str(info.value).startswith(message.replace("{root}", str(files))), info.value


def test_a_template_column_is_text_too_and_other_columns_may_hold_anything(tmp_path):
    rows = [{"question": "q1", "answer": "a1", "context": ["x"], "meta": {"id": 1}},
            {"question": "q2", "answer": "a2", "context": "c", "meta": [1, 2]}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"rows.jsonl line 1: column 'context' holds a list"):
        load(tmp_path, "rows.jsonl", template="{context} {input}\nAnswer:")
    assert [e.target for e in load(tmp_path, "rows.jsonl").test] == [" a1", " a2"]  # meta is never read


def test_numbers_and_booleans_read_as_their_text(tmp_path):
    (tmp_path / "numbers.jsonl").write_text('{"question": 2.5, "answer": 1}\n{"question": "q", "answer": 0}\n')
    assert [(e.prompt, e.target) for e in load(tmp_path, "numbers.jsonl").test] == [("2.5\nAnswer:", " 1"),
                                                                                   ("q\nAnswer:", " 0")]


def test_a_cue_the_inputs_already_end_with_is_warned_about_once_per_task(tmp_path, caplog):
    rows = [{"question": "Is it red?\nAnswer:", "answer": "yes"}, {"question": "Is it blue? Answer: ", "answer": "no"},
            {"question": "Is it green?", "answer": "no"}]
    (tmp_path / "cued.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("WARNING", logger="cl_runner.tasks.load"):
        task = load(tmp_path, "cued.jsonl")
    assert task.test[0].prompt == "Is it red?\nAnswer:\nAnswer:"  # nothing is changed, only said
    (record,) = [r for r in caplog.records if "already end with" in r.getMessage()]  # once, for all splits
    message = record.getMessage()
    assert "\n" not in message and message.startswith("task t: 4 of 6 examples already end with 'Answer:', which "
                                                      f"{KEY}.template appends again")
    assert doubled_cue("Q: {input}", rows) == ("", 0)  # nothing after the input: nothing doubled
    assert doubled_cue("{question}\nReply:", rows) == ("Reply:", 0)
    assert doubled_cue("{input} Answer:", rows, input_column="question") == ("Answer:", 2)


# ----------------------------------------------------------------------------------------- csv files
def test_a_csv_quote_never_closed_is_named_by_the_line_it_opens_on(files):
    with pytest.raises(DataError) as info:
        load(files, "open_quote.csv", "csv")
    assert str(info.value) == (f"{KEY}.data_files: {files / 'open_quote.csv'} line 3 opens a quoted value (\") that "
                               "is never closed; close it, or double a quote inside a quoted value (\"\")")


@pytest.mark.parametrize("text", [
    'question,answer\nq1,a1\nq2,a2',  # no newline at the end
    'question,answer\nq1,a1\n"q2 over\ntwo lines",a2',  # the last value quoted over two lines, no newline after it
    'question,answer\nq1,"a ""quoted"" word"\nq2,a2\n\n\n',  # doubled quotes; blank lines at the end
])
def test_csv_files_that_end_in_any_good_way_still_load(tmp_path, text):
    (tmp_path / "ok.csv").write_text(text)
    assert len(load(tmp_path, "ok.csv", "csv").test) == 2


def test_a_file_datasets_cannot_read_is_named_among_several(tmp_path):
    pd.DataFrame({"question": ["q1", "q2"], "answer": ["a1", "a2"]}).to_parquet(tmp_path / "good.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not a parquet file" * 10)
    with pytest.raises(DataError) as info:
        load(tmp_path, "good.parquet", "parquet", test="bad.parquet")
    assert str(info.value).startswith(f"{KEY}.path: could not load dataset 'parquet' from {tmp_path / 'bad.parquet'}: ")
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------- a byte-order mark
BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize(("name", "builder", "data"), [
    ("bom.jsonl", "json", BOM + GOOD_LINES.encode()),
    ("bom.json", "json", BOM + json.dumps(GOOD).encode()),
    ("bom.csv", "csv", BOM + b"question,answer\ncapital of france?,paris\ncapital of peru?,lima\n"),
])
def test_a_byte_order_mark_is_accepted_in_every_format(tmp_path, name, builder, data):
    (tmp_path / name).write_bytes(data)
    assert [e.prompt for e in load(tmp_path, name, builder).test] == [f"{r['question']}\nAnswer:" for r in GOOD]


def test_a_byte_order_mark_never_reaches_a_text_files_first_row(tmp_path):
    (tmp_path / "bom.txt").write_bytes(BOM + b"first line of text\nsecond line\n")
    task = load(tmp_path, "bom.txt", "text", input_column=None, target_column="text", template="",
                metric="perplexity")
    assert [e.target for e in task.test] == [" first line of text", " second line"]  # datasets keeps the BOM


# ----------------------------------------------------------------------------------------- the trained tokenizer
def test_a_tokenizer_smaller_than_its_byte_symbols_is_refused_not_raised():
    assert MIN_TOKENIZER_VOCAB == 257
    message = "model.tokenizer_vocab_size: expected at least 257 (the trained BPE's 256 byte symbols and EOS), got "
    assert ModelConfig(arch={"model_type": "gpt2"}, tokenizer_vocab_size=10).errors("model") == [message + "10"]
    assert ModelConfig(arch={"model_type": "gpt2"}, tokenizer_vocab_size=257).errors("model") == []
    with pytest.raises(ModelError) as info:
        train_tokenizer(["some text"] * 5, 256)
    assert str(info.value) == message + "256"
    assert len(train_tokenizer(["some text"] * 5, 257)) == 257


def test_a_json_lines_error_gives_its_reason_whole_with_its_column(tmp_path):
    (tmp_path / "tab.jsonl").write_text('{"question": "a\tb", "answer": "x"}\n')
    with pytest.raises(DataError) as info:
        check_json_lines(tmp_path / "tab.jsonl", KEY)
    assert str(info.value).endswith("tab.jsonl line 1 is not valid JSON (Invalid control character at column 16)")
