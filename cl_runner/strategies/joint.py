"""Joint (multi-task) training on every task seen so far: the usual upper bound of a CL sequence."""

from __future__ import annotations

from cl_runner.models.lm import Encoded
from cl_runner.strategies.base import Context, Strategy, no_options


class Joint(Strategy):
    """At task i, trains on the union of the training sets of tasks 0..i and validates on all of them."""

    name = "joint"
    Config = no_options("joint")

    def train_dataset(self, ctx: Context, examples: list[Encoded]) -> list[Encoded]:
        seen: list[Encoded] = []
        for task_examples in ctx.train_sets[: ctx.task_index]:
            seen.extend(task_examples)
        return seen + examples

    def validation_tasks(self, ctx: Context) -> list[int]:
        return list(range(ctx.task_index + 1))
