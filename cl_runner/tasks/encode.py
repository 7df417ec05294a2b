"""Token ids for one task: training examples (prompt masked) and evaluation items (prompt, target, labels).

Length rule: the target is never cut. When prompt + target exceed ``max_length``, the *prompt* loses tokens
from its middle, keeping its head (the instruction) and its tail (the text nearest the answer cue); such
examples are counted in ``EncodedTask.cut``. Plain-text tasks (empty prompt, perplexity) are split into
windows of ``max_length`` tokens instead. A target that alone does not fit is an error.

A chat-templated task (``Task.chat``) is encoded as its tokenizer's chat template renders it (cl_runner/tasks/chat.py):
the prompt ends with the generation prompt, the target is the assistant's turn through its end-of-turn token (which
also ends generation: ``EncodedTask.stop_ids``), and the labels are whole assistant answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cl_runner.core.errors import DataError
from cl_runner.models.lm import IGNORE_INDEX, Encoded
from cl_runner.tasks.base import Example, Task
from cl_runner.tasks.chat import ChatFormat

HEAD_SHARE = 0.25  # share of a cut prompt's budget kept from its beginning


@dataclass
class EvalItem:
    prompt_ids: list[int]
    target_ids: list[int]  # target tokens + EOS (scored by perplexity)
    target: str  # reference text for the generation metrics
    prompt_text: str | None = None  # chat templates: the prompt with its special tokens (predictions files)
    source: str = ""  # the example's prompt text as formatted, uncut (SARI's source)


@dataclass
class EncodedTask:
    name: str
    train: list[Encoded]
    validation: list[EvalItem]
    test: list[EvalItem]
    label_ids: list[list[int]] | None  # token ids of each candidate label (label_accuracy)
    cut: dict[str, int] = field(default_factory=dict)  # examples whose prompt was shortened, per split
    stop_ids: list[int] = field(default_factory=list)  # token ids besides EOS that end a generation (end-of-turn)


def _cut_prompt(prompt: list[int], budget: int) -> list[int]:
    if len(prompt) <= budget:
        return prompt
    head = int(budget * HEAD_SHARE)
    return prompt[:head] + prompt[len(prompt) - (budget - head):]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _start_ids(tokenizer) -> list[int]:
    """A start token so the first target token of an empty prompt is predicted from something."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [start]


def encode_task(task: Task, task_id: int, tokenizer, max_length: int) -> EncodedTask:
    eos = tokenizer.eos_token_id
    cut = {"train": 0, "validation": 0, "test": 0}
    chat = ChatFormat(tokenizer, task.chat, task.name) if task.chat is not None else None

    def pair(example: Example, split: str, index: int) -> list[tuple[list[int], list[int]]]:
        if chat is not None:
            return [fit(*chat.encode(example, f"{split} example {index}"), split)]
        prompt = _ids(tokenizer, example.prompt) or _start_ids(tokenizer)
        target = _ids(tokenizer, example.target) + [eos]
        if not example.prompt:  # plain text: windows of max_length tokens, each conditioned on the previous
            body = target
            windows = []
            step = max_length - 1
            for start in range(0, len(body), step):
                context = prompt if start == 0 else body[start - 1 : start]
                windows.append((context, body[start : start + step]))
            if len(windows) > 1:
                cut[split] += 1
            return windows
        return [fit(prompt, target, split)]

    def fit(prompt: list[int], target: list[int], split: str) -> tuple[list[int], list[int]]:
        budget = max_length - len(target)
        if budget < 1:
            raise DataError(
                f"train.max_length: task {task.name!r} has a {split} target of {len(target)} tokens (with EOS), "
                f"which leaves no room for its prompt in {max_length}; targets are never cut, raise train.max_length"
            )
        if len(prompt) > budget:
            cut[split] += 1
            prompt = _cut_prompt(prompt, budget)
        return prompt, target

    train: list[Encoded] = []
    for index, example in enumerate(task.train):
        for prompt, target in pair(example, "train", index):
            train.append(
                {"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target, "task_id": task_id}
            )

    def items(examples: list[Example], split: str) -> list[EvalItem]:
        out = []
        for index, example in enumerate(examples):
            for prompt, target in pair(example, split, index):
                out.append(EvalItem(prompt_ids=prompt, target_ids=target, target=example.target,
                                    prompt_text=chat.readable(prompt) if chat is not None else None,
                                    source=example.prompt))
        return out

    label_ids = None
    if task.labels:
        label_ids = [chat.label_ids(label) if chat is not None else _ids(tokenizer, label) for label in task.labels]
    if label_ids is not None and any(not ids for ids in label_ids):
        raise DataError(f"tasks: task {task.name!r} has an empty label in its label set")
    return EncodedTask(
        name=task.name,
        train=train,
        validation=items(task.validation, "validation"),
        test=items(task.test, "test"),
        label_ids=label_ids,
        cut=cut,
        stop_ids=chat.stop_ids if chat is not None else [],
    )
