"""Task sequences: load each task's rows (bundled generator or ``datasets``), format prompts, encode tokens.

May import: core, config.schema, models and scoring.metrics (the token layout of ``models.lm``; a metric's
direction)."""

from cl_runner.tasks.base import Example, Task
from cl_runner.tasks.encode import EncodedTask, encode_task
from cl_runner.tasks.load import load_sequence

__all__ = ["Example", "Task", "EncodedTask", "encode_task", "load_sequence"]
