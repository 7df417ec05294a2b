"""The checks of a task's row format and chat-template options (``format``, ``chat_template``, ``system_prompt``),
apart from schema.py; each message names its key. The readers themselves are in cl_runner/tasks/formats.py."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from cl_runner.core.checks import check_choice

FORMATS = ("columns", "messages", "alpaca")  # columns: template + columns (the default) | chat messages | Alpaca
# keys a messages or alpaca row does not read (the row holds the conversation, or Alpaca's fields)
UNUSED_BY_ROWS = ("template", "input_column", "target_column", "verbalizer", "max_train_per_class",
                  "max_eval_per_class")


def format_errors(task: Any, key: str) -> list[str]:
    """``task.format``: one of ``FORMATS``; a messages/alpaca task reads files (``source: datasets``) and sets none
    of the columns format's keys."""
    errs: list[str] = []
    check_choice(errs, f"{key}.format", task.format, FORMATS)
    if task.format not in ("messages", "alpaca"):
        return errs
    if task.source != "datasets":
        errs.append(f"{key}.format: {task.format} rows are read with source: datasets (path: json + data_files)")
    defaults = {f.name: f.default for f in fields(task) if f.name in UNUSED_BY_ROWS}
    errs += [f"{key}.{name}: not used by format: {task.format} (its rows say what the prompt and answer are); "
             "drop it" for name in UNUSED_BY_ROWS if getattr(task, name) != defaults[name]]
    return errs


def chat_errors(tasks: Any, key: str) -> list[str]:
    """The chat options of every task and monitor of ``tasks`` (a ``TasksConfig``), each with the sequence's
    defaults applied to the tasks (a monitor has no default): a system prompt needs the chat template, and a
    plain-text task (no prompt) has no user turn to template."""
    errs: list[str] = []
    entries = [(f"{key}.tasks.{i}", t, tasks.chat_template) for i, t in enumerate(tasks.tasks)]
    entries += [(f"{key}.monitor.{name}", m, False) for name, m in tasks.monitor.items()
                if getattr(m, "lm_eval", None) is None]
    for task_key, task, chat_default in entries:
        chat = task.chat_template if task.chat_template is not None else chat_default
        if chat and task.format == "columns" and task.source == "datasets" and task.input_column is None:
            errs.append(f"{task_key}.chat_template: a plain-text task (input_column: null) has no user turn to "
                        f"template; set {task_key}.chat_template=false")
        if task.system_prompt is not None and not chat:
            errs.append(f"{task_key}.system_prompt: only used with chat_template: true")
    if tasks.system_prompt is not None and not any(
            t.chat_template or (t.chat_template is None and tasks.chat_template) for t in tasks.tasks):
        errs.append(f"{key}.system_prompt: only used with chat_template: true (no task of the sequence has it)")
    return errs
