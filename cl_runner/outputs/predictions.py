"""Per-example predictions on disk (``eval.save_predictions``) and the examples that flipped between two stages
(``cl-report RUN --flips A:B``).

Files: ``predictions/<stage>/<task>.jsonl`` in the run directory (``final``: the stage after the last task only;
``every``: every stage, init included; ``none``: nothing). One line per scored test example, in example order
(the same examples at every stage: ``eval.max_examples`` samples them once), with

- ``index``: the example's position among the scored examples; ``prompt``: its prompt as the model saw it,
  decoded, at most ``PROMPT_CHARS`` characters (longer ones keep their first ``HEAD_CHARS`` and their end, joined
  by `` … ``); ``target``: the reference (perplexity: the scored text, cut the same way);
- generation metrics (exact_match, rouge_l, bleu_1, ...): ``generated`` (the decoded continuation), ``prediction``
  (the answer as scored: cut at the stop string, extracted by ``answer_pattern``, trimmed; for exact_match also
  normalised) and the metric's own field: ``correct`` (exact_match) or the example's score under the metric's
  name (``rouge_l``, ``bleu_4``, ``sari``, ...);
- label_accuracy: ``prediction`` (the chosen label), ``label_scores`` (label -> log-probability, or its mean
  per token with ``eval.length_normalize``) and ``correct``;
- perplexity: ``nll`` (summed over the target tokens) and ``tokens``; no ``correct``.

The task's score is a function of the file (``score``: the metric's aggregate, cl_runner/scoring/metrics.py), equal
to the matrix cell. The records come from the
scoring itself (gathered from every rank in example order); only rank 0 writes, each file replaced whole, so a
stage scored again after a resume rewrites the same files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cl_runner.core.console import print_whole
from cl_runner.core.files import write_atomic
from cl_runner.outputs.results import stage_names
from cl_runner.scoring.metrics import PERPLEXITY, find, metric_named

SAVE_CHOICES = ("final", "every", "none")
FOLDER = "predictions"
PROMPT_CHARS = 300  # longest prompt (and perplexity target) kept in a record, in characters
HEAD_CHARS = 100  # of which the beginning (the instruction); the rest is the end (nearest the answer)


def cut(text: str, most: int = PROMPT_CHARS, head: int = HEAD_CHARS) -> str:
    """``text`` when at most ``most`` characters, else its first ``head`` and last ``most - head`` joined by …"""
    return text if len(text) <= most else f"{text[:head]} … {text[len(text) - (most - head):]}"


def safe(name: str) -> str:
    """A task or stage name as a file name (characters other than letters, digits and ``_.=-`` become ``_``)."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)


def stage_file(run_dir: Path, stage: str, task: str) -> Path:
    return Path(run_dir) / FOLDER / safe(stage) / f"{safe(task)}.jsonl"


def score(records: list[dict[str, Any]], metric: str) -> float:
    """The task's score from its records: the metric's aggregate, as scoring computes it."""
    return metric_named(metric).aggregate(records)


def graded(metric: str) -> bool:
    """Whether ``metric`` has a right or wrong answer per example (records with ``correct``)."""
    found = find(metric)
    return found is not None and found.graded


class PredictionWriter:
    """Writes a stage's records (``write``) when ``eval.save_predictions`` wants that stage (``final``: the stage
    named ``final``); rank 0 only. ``tasks[j]`` (``name``, ``metric``) is the task scored as ``j``, ``items(j)``
    its scored test items (prompt ids, target), ``decode`` turns ids into text."""

    def __init__(self, run_dir: Path, when: str, final: str, tasks: list[Any], items: Callable[[int], list[Any]],
                 decode: Callable[[list[int]], str], main: bool = True) -> None:
        self.run_dir, self.when, self.final, self.tasks = Path(run_dir), when, final, tasks
        self.items, self.decode, self.main = items, decode, main
        self._texts: dict[int, list[tuple[str, str]]] = {}  # task -> (prompt, target) per item, decoded once

    def wanted(self, stage: str) -> bool:
        return self.main and (self.when == "every" or (self.when == "final" and stage == self.final))

    def write(self, stage: str, examples: dict[int, list[dict[str, Any]] | None]) -> None:
        """``examples``: task index -> its records from the scoring (None: a scoring that keeps none)."""
        if not self.wanted(stage):
            return
        for j, records in sorted(examples.items()):
            if records is not None:
                lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in self.records(j, records))
                write_atomic(stage_file(self.run_dir, stage, self.tasks[j].name), "".join(lines))

    def records(self, j: int, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if j not in self._texts:
            # perplexity: the target is the scored window, not the whole text
            plain = metric_named(self.tasks[j].metric).needs == PERPLEXITY
            self._texts[j] = [(cut(it.prompt_text if it.prompt_text is not None else self.decode(it.prompt_ids)),
                               cut(self.decode(it.target_ids)) if plain else it.target) for it in self.items(j)]
        return [{"index": i, "prompt": prompt, "target": target, **record}
                for i, ((prompt, target), record) in enumerate(zip(self._texts[j], examples, strict=True))]


# ------------------------------------------------------------------------------------------------------ flips
def read_records(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable predictions file ({exc})") from None


def flips(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> tuple[list[tuple[dict, dict]], ...]:
    """(right -> wrong, wrong -> right): pairs of records of the same example at two stages."""
    if [(r["index"], r["target"]) for r in before] != [(r["index"], r["target"]) for r in after]:
        raise ValueError("the two stages' prediction files hold different examples")
    pairs = list(zip(before, after, strict=True))
    return [p for p in pairs if p[0]["correct"] and not p[1]["correct"]], \
        [p for p in pairs if not p[0]["correct"] and p[1]["correct"]]


def _stage(name: str, metrics: dict[str, Any]) -> str:
    """A stage named as in the matrix (``init``, ``after_city``) or by its task (``city``)."""
    stages = stage_names(metrics["tasks"])
    if name in stages:
        return name
    if f"after_{name}" in stages:
        return f"after_{name}"
    raise ValueError(f"--flips: {name!r} is not a stage of this run; expected one of {', '.join(stages)}")


def _stage_records(run_dir: Path, stage: str, task: str, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    path = stage_file(run_dir, stage, task)
    if path.is_file():
        return read_records(path)
    row = next((s["scores"] for s in metrics.get("stages", []) if s["stage"] == stage), None)
    if row is not None and row.get(task, {}).get("score") is None:
        raise ValueError(f"{path}: task {task} was not scored at stage {stage} (eval.full_every skips it there)")
    saved = (metrics.get("config") or {}).get("eval", {}).get("save_predictions")
    setting = f"eval.save_predictions={saved}" if saved else "no eval.save_predictions (an older cl-run)"
    raise ValueError(f"{path}: no predictions on disk (the run had {setting}); run with "
                     "eval.save_predictions=every to keep every stage's")


@dataclass
class StagePair:
    """One task's records at two stages."""

    task: str
    metric: str
    stages: tuple[str, str]
    before: list[dict[str, Any]]
    after: list[dict[str, Any]]


def load_flips(run_dir: Path, spec: str, task: str | None) -> list[StagePair]:
    """The records of ``task`` (default: every task with right and wrong answers) at the two stages of ``spec``
    (``A:B``). Raises ValueError with one line for the user (bad stage or task, predictions not on disk)."""
    try:
        metrics = json.loads((Path(run_dir) / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{run_dir}/metrics.json: a run directory's metrics are needed ({exc})") from None
    if spec.count(":") != 1:
        raise ValueError(f"--flips: expected STAGE:STAGE (e.g. init:after_{metrics['tasks'][-1]}), got {spec!r}")
    first, second = (_stage(s, metrics) for s in spec.split(":"))
    kinds = dict(zip(metrics["tasks"], metrics["metric_per_task"], strict=True))
    if task is not None and task not in kinds:
        raise ValueError(f"--task: {task!r} is not a task of this run; expected one of {', '.join(kinds)}")
    if task is not None and not graded(kinds[task]):
        raise ValueError(f"--task: {task} is scored by {kinds[task]}, which has no right or wrong per example")
    names = [task] if task is not None else [t for t, kind in kinds.items() if graded(kind)]
    if not names:
        raise ValueError("--flips: no task of this run has a right or wrong answer per example (exact_match or "
                         "label_accuracy)")
    return [StagePair(name, kinds[name], (first, second), _stage_records(run_dir, first, name, metrics),
                      _stage_records(run_dir, second, name, metrics)) for name in names]


def _shown(record: dict[str, Any]) -> str:
    return escape(cut(record["prediction"], 80, 40) if record["prediction"] else "(blank)")


def print_flips(run_dir: Path, spec: str, task: str | None, limit: int, console: Console) -> None:
    """``cl-report RUN --flips A:B [--task NAME]``: per task, the counts, then up to ``limit`` examples of each
    direction (prompt, target, the prediction at A and at B)."""
    for pair in load_flips(run_dir, spec, task):
        lost, gained = flips(pair.before, pair.after)
        (first, second), name = pair.stages, escape(pair.task)
        console.print(f"[bold]{name}[/bold] {first} → {second}: score {score(pair.before, pair.metric):.3f} → "
                      f"{score(pair.after, pair.metric):.3f} · {len(lost)} right → wrong · {len(gained)} wrong → "
                      f"right (of {len(pair.before)} examples)", soft_wrap=True)
        for title, pairs in (("right → wrong", lost), ("wrong → right", gained)):
            if not pairs:
                continue
            table = Table(title=f"{name}: {title}", title_justify="left")
            for header in ("#", "prompt", "target", first, second):
                table.add_column(escape(header), overflow="fold")
            for a, b in pairs[:limit]:
                table.add_row(str(a["index"]), escape(cut(a["prompt"], 120, 40)), escape(str(a["target"])),
                              _shown(a), _shown(b))
            print_whole(console, table)
            if len(pairs) > limit:
                console.print(f"... and {len(pairs) - limit} more (--limit N shows more)")
