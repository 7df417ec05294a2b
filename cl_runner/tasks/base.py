"""What a task is once loaded: formatted prompt/target pairs per split, a metric and an optional label set."""

from __future__ import annotations

from dataclasses import dataclass, field

import cl_runner.scoring.metrics as metrics


@dataclass(frozen=True)
class Example:
    prompt: str  # everything the model is given ("" for plain-text language modelling)
    target: str  # the text it must produce; the loss is computed on these tokens only
    # under a chat template: the conversation before the answer as (role, content) turns; None = one user turn
    # holding ``prompt`` (cl_runner/tasks/formats.py fills it for chat `messages` and Alpaca rows)
    messages: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True)
class Chat:
    """Format the task's examples with the tokenizer's chat template (cl_runner/tasks/chat.py)."""

    key: str  # the option that turned it on, named in errors (tasks.chat_template or tasks.tasks.<i>.chat_template)
    system_prompt: str | None = None  # a system turn before the conversation (unless it has its own)


@dataclass
class Task:
    name: str
    metric: str  # a registered task metric (cl_runner/scoring/metrics.py)
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    labels: list[str] | None = None  # candidate targets for label_accuracy
    stop: str = "\n"  # generation stops at EOS or this string
    max_new_tokens: int | None = None  # generation budget (null: eval.max_new_tokens, else target + 2)
    normalizer: str | None = None  # exact_match's normaliser (null: eval.normalizer; cl_runner/scoring/answers.py)
    answer_pattern: str | None = None  # answer extraction before a generation metric (null: eval.answer_pattern)
    eval_batch_size: int | None = None  # examples per evaluation batch (null: train.eval_batch_size)
    info: dict = field(default_factory=dict)  # provenance: source, sizes, path
    chat: Chat | None = None  # set: examples are encoded with the tokenizer's chat template

    @property
    def higher_is_better(self) -> bool:
        return metrics.higher_is_better(self.metric)

    def texts(self) -> list[str]:
        """All text of the task (for training a tokenizer on it)."""
        out: list[str] = []
        for split in (self.train, self.validation, self.test):
            out.extend(e.prompt + e.target for e in split)
        out.extend(self.labels or [])
        return out
