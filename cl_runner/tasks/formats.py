"""Readers for the instruction data people have, so a task points ``data_files`` at it with no template written.

``format`` of a task (cl_runner/config/task_formats.py checks the options):

- ``columns`` (the default): a template filled from the row's columns (cl_runner/tasks/load.py).
- ``messages``: chat rows ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}``.
  The last message is the assistant's answer (the target); the turns before it are the prompt conversation.
  Without a chat template the prompt is a plain transcript (``User: ...`` lines, then ``Assistant:``).
- ``alpaca``: rows ``{"instruction", "input" (optional), "output"}``. Without a chat template the prompt is
  Stanford Alpaca's own (its train.py ``PROMPT_DICT``, the no-input variant when ``input`` is empty); with one,
  the user turn is the instruction, then a blank line and the input when there is one.

The target goes through ``target_template`` in every format. A bad row (a missing key, a non-string content, no
assistant answer at the end) is an error naming the file and line before ``datasets`` reads the file
(``check_format_rows``), or the split and row for rows from elsewhere (``format_examples``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from cl_runner.config.schema import TaskConfig, TasksConfig
from cl_runner.core.errors import DataError
from cl_runner.tasks.base import Chat, Example

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}  # role -> its name in a plain transcript
ALPACA_PROMPT = (  # tatsu-lab/stanford_alpaca, train.py, PROMPT_DICT["prompt_input"]
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (  # PROMPT_DICT["prompt_no_input"], used when "input" is empty
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
COLUMNS = {"messages": ("messages",), "alpaca": ("instruction", "output")}  # what a split's rows must hold


def with_sequence_defaults(task: TaskConfig, tasks: TasksConfig) -> TaskConfig:
    """``task`` with ``chat_template`` and ``system_prompt`` taken from the sequence where it leaves them null."""
    return dataclasses.replace(
        task, chat_template=tasks.chat_template if task.chat_template is None else task.chat_template,
        system_prompt=tasks.system_prompt if task.system_prompt is None else task.system_prompt)


def chat_of(task: TaskConfig, key: str) -> Chat | None:
    """What the encoder needs to apply the chat template (None: the task is not chat-templated)."""
    return Chat(key=f"{key}.chat_template", system_prompt=task.system_prompt) if task.chat_template else None


def needed_columns(task: TaskConfig) -> list[tuple[str, str]]:
    """(key, column) pairs the rows of a messages or alpaca task must have."""
    return [("format", column) for column in COLUMNS[task.format]]


# ------------------------------------------------------------------------------------------- rows
def _kind(value: Any) -> str:
    kinds = {list: "a list", dict: "an object", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _message_problem(messages: Any) -> str | None:
    if not isinstance(messages, list):
        return f"'messages' is {_kind(messages)}, not a list of turns"
    if not messages:
        return "'messages' is an empty list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"message {i} is {_kind(message)}, not an object with 'role' and 'content'"
        for name in ("role", "content"):
            if name not in message:
                return f"message {i} has no '{name}'"
        if message["role"] not in ROLES:
            return f"message {i} has role {message['role']!r}; expected one of {', '.join(ROLES)}"
        if not isinstance(message["content"], str):
            return f"message {i} ({message['role']}) has content that is {_kind(message['content'])}, not a string"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn (the last message, the assistant's, is the answer)"
    if messages[-1]["role"] != "assistant":
        return (f"the last message is the {messages[-1]['role']}'s; the conversation must end with the assistant's "
                "answer")
    if not any(m["role"] == "user" for m in messages[:-1]):
        return "no user turn before the assistant's answer"
    if not messages[-1]["content"].strip():
        return "the assistant's answer (the last message) is empty"
    return None


def _alpaca_problem(row: dict) -> str | None:
    for name in ("instruction", "output"):
        if name not in row or row[name] is None:
            return f"no '{name}' (Alpaca rows hold instruction, input and output)"
        if not isinstance(row[name], str):
            return f"'{name}' is {_kind(row[name])}, not a string"
        if not row[name].strip():
            return f"'{name}' is empty"
    if row.get("input") is not None and not isinstance(row["input"], str):
        return f"'input' is {_kind(row['input'])}, not a string"
    return None


def row_problem(fmt: str, row: Any) -> str | None:
    """What is wrong with one row of format ``fmt`` (messages | alpaca), or None."""
    if not isinstance(row, dict):
        return f"{_kind(row)}, not a JSON object"
    if fmt == "alpaca":
        return _alpaca_problem(row)
    if "messages" not in row:
        return "no 'messages' (format: messages rows are {\"messages\": [{\"role\": ..., \"content\": ...}]})"
    return _message_problem(row["messages"])


def _json_rows(path: Path) -> list[tuple[str, Any]]:
    """(where, row) of a JSON-lines file (``line N``) or of a file holding one JSON list (``row N``)."""
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip()[:1] == "[":
        try:
            return [(f"row {i}", row) for i, row in enumerate(json.loads(text), 1)]
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number} is not valid JSON ({exc.msg})") from None
    return rows


def check_format_rows(task: TaskConfig, files: list[Path], key: str) -> None:
    """Every row of the local .jsonl/.json files of a messages or alpaca task, before ``datasets`` reads them
    (it would turn a missing key into null, and stop at a mixed type naming neither file nor row)."""
    if task.format == "columns":
        return
    for path in files:
        if path.suffix in (".jsonl", ".json"):
            for where, row in _json_rows(path):
                problem = row_problem(task.format, row)
                if problem:
                    raise DataError(f"{key}: {path} {where}: {problem}")


# ------------------------------------------------------------------------------------------- examples
def _messages_example(row: dict) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    *turns, answer = ((m["role"], m["content"]) for m in row["messages"])
    transcript = "".join(f"{ROLES[role]}: {content}\n" for role, content in turns) + f"{ROLES['assistant']}:"
    return transcript, answer[1], tuple(turns)


def _alpaca_example(row: dict) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    instruction, given, output = row["instruction"], row.get("input") or "", row["output"]
    template = ALPACA_PROMPT if given != "" else ALPACA_PROMPT_NO_INPUT  # Alpaca's own test: input != ""
    user = instruction + (f"\n\n{given}" if given else "")
    return template.format(instruction=instruction, input=given), output, (("user", user),)


def format_examples(task: TaskConfig, rows: list[dict[str, Any]], key: str, split: str) -> list[Example]:
    """The rows of a messages or alpaca task as examples (the plain prompt, and the conversation a chat template
    renders); a bad row names the split and row."""
    read = _messages_example if task.format == "messages" else _alpaca_example
    out: list[Example] = []
    for index, row in enumerate(rows):
        problem = row_problem(task.format, row)
        if problem:
            raise DataError(f"{key}.format: {split} row {index}: {problem}")
        prompt, target, conversation = read(row)
        if task.labels is not None and target not in task.labels:
            raise DataError(f"{key}.labels: {split} row {index} has answer {target!r}, not one of "
                            f"{', '.join(task.labels)}")
        out.append(Example(prompt=prompt, target=task.target_template.replace("{target}", target),
                           messages=conversation))
    return out
