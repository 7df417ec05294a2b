"""Load a task sequence: rows from the bundled generator or from ``datasets.load_dataset``, then one formatting path.

A task whose ``path`` is a folder of O-LoRA's released ``CL_Benchmark`` (``train.json``, ``dev.json``, ``test.json``
of ``{"sentence", "label"}`` rows and ``labels.json``), or whose ``data_dir`` is that benchmark's root (the catalogue
sets it from ``CL_BENCHMARK_DIR``), reads those files through the same ``datasets`` path: each row's ``sentence``
takes the place of the template's body (see ``_sentence_template``), its ``label`` is the answer. A task whose
``path`` is ``trace`` reads TRACE's released folder the same way (cl_runner/tasks/trace.py).

Errors name the config key (``tasks.tasks.<i>.<key>``), the file and the row, and are raised before any model
is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import string
from pathlib import Path
from typing import Any

from cl_runner.config.schema import TaskConfig, TasksConfig
from cl_runner.core.errors import ConfigError, DataError
from cl_runner.tasks.base import Example, Task
from cl_runner.tasks.facts import RELATIONS, fact_rows
from cl_runner.tasks.files import check_files, check_utf8, local_files, not_text
from cl_runner.tasks.formats import chat_of, check_format_rows, format_examples, needed_columns, with_sequence_defaults
from cl_runner.tasks.offline import ensure_offline_data
from cl_runner.tasks.trace import is_trace, trace_task

log = logging.getLogger(__name__)
Rows = list[dict[str, Any]]
Source = tuple[TaskConfig, dict[str, Rows], list[str] | None, dict]  # task as read, rows per split, labels, provenance


def load_sequence(cfg: TasksConfig, seed: int, base_dir: Path | None = None,
                  max_train_examples: int | None = None) -> list[Task]:
    """Every task of the sequence, in order. Relative data paths resolve against ``base_dir`` (the launch dir).
    ``max_train_examples`` (``train.max_examples``): the cap of every task that sets no ``max_train_examples`` of
    its own (the same seeded sample as that task option would draw)."""
    base = Path(base_dir or Path.cwd())
    tasks = [with_sequence_defaults(task_cfg, cfg) for task_cfg in cfg.tasks]
    tasks = [t if t.max_train_examples is not None or max_train_examples is None
             else dataclasses.replace(t, max_train_examples=max_train_examples) for t in tasks]
    return [load_task(task_cfg, seed, base, f"tasks.tasks.{i}") for i, task_cfg in enumerate(tasks)]


def load_task(cfg: TaskConfig, seed: int, base_dir: Path, key: str) -> Task:
    cfg, splits, labels, info = _source_rows(cfg, seed, base_dir, key)
    rng = random.Random(f"subsample-{cfg.name}-{seed}")
    column = cfg.target_column if cfg.source == "datasets" else "target"
    train = _per_class(splits["train"], column, cfg.max_train_per_class, rng)
    validation = _per_class(splits["validation"], column, cfg.max_eval_per_class, rng)
    test = _per_class(splits["test"], column, cfg.max_eval_per_class, rng)
    train = _subsample(train, cfg.max_train_examples, rng)
    validation = _subsample(validation, cfg.max_eval_examples, rng)
    test = _subsample(test, cfg.max_eval_examples, rng)
    _warn_doubled_cue(cfg, [*train, *validation, *test], key)
    task = Task(
        name=cfg.name,
        metric=cfg.metric,
        train=_format(cfg, train, key, "train"),
        validation=_format(cfg, validation, key, "validation"),
        test=_format(cfg, test, key, "test"),
        labels=[_apply_target_template(cfg, label) for label in labels] if labels else None,
        stop=cfg.stop,
        max_new_tokens=cfg.max_new_tokens,
        normalizer=cfg.normalizer,
        answer_pattern=cfg.answer_pattern,
        eval_batch_size=cfg.eval_batch_size,
        info=info | {"sizes": {"train": len(train), "validation": len(validation), "test": len(test)}},
        chat=chat_of(cfg, key),
    )
    if task.metric == "label_accuracy" and not task.labels:
        raise ConfigError(f"{key}.labels: label_accuracy needs a label set (labels or verbalizer)")
    return task


def _source_rows(cfg: TaskConfig, seed: int, base_dir: Path, key: str) -> Source:
    """The task as it reads its rows (a CL_Benchmark or TRACE folder rewrites it), its rows per split, label set and
    provenance."""
    if cfg.source == "facts":
        if cfg.relation not in RELATIONS:
            raise ConfigError(f"{key}.relation: expected one of {', '.join(RELATIONS)}, got {cfg.relation!r}")
        rows, labels = fact_rows(cfg.relation, cfg.num_subjects, seed)
        # Knowledge injection: the facts are the test, so every split holds the same facts.
        info = {"source": "facts", "relation": cfg.relation}
        return cfg, {"train": rows, "validation": rows, "test": rows}, labels, info
    if is_trace(cfg):  # TRACE's released folder (cl_runner/tasks/trace.py)
        cfg, folder = trace_task(cfg, base_dir, key)
        info = {"source": "trace", "path": str(folder), "data_files": _plain(cfg.data_files)}
        return cfg, _dataset_splits(cfg, seed, base_dir, key), None, info
    found = _cl_benchmark_folder(cfg, base_dir, key)
    if found is not None:
        cfg, labels = _cl_benchmark_task(cfg, found[0], f"{key}.{found[1]}")
        info = {"source": "cl_benchmark", "path": str(found[0]), "data_files": _plain(cfg.data_files)}
        return cfg, _dataset_splits(cfg, seed, base_dir, key), labels, info
    labels = list(cfg.verbalizer.values()) if cfg.verbalizer else cfg.labels
    info = {"source": "datasets", "path": cfg.path, "data_files": _plain(cfg.data_files)}
    return cfg, _dataset_splits(cfg, seed, base_dir, key), labels, info


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _per_class(rows: Rows, column: str, limit: int | None, rng: random.Random) -> Rows:
    """At most ``limit`` rows per value of ``column`` (the label), seeded, in their original order."""
    if limit is None:
        return rows
    by_class: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_class.setdefault(str(row.get(column)), []).append(i)
    keep = [i for label in sorted(by_class) for i in (
        by_class[label] if len(by_class[label]) <= limit else rng.sample(by_class[label], limit))]
    return [rows[i] for i in sorted(keep)]


def _subsample(rows: Rows, limit: int | None, rng: random.Random) -> Rows:
    if limit is None or len(rows) <= limit:
        return rows
    return [rows[i] for i in sorted(rng.sample(range(len(rows)), limit))]


# ------------------------------------------------------------------------------------------- datasets source
def _resolve_files(value: Any, base_dir: Path, key: str) -> Any:
    """Resolve relative paths against the launch directory and check local files exist (globs excepted)."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {split: _resolve_files(v, base_dir, f"{key}.{split}") for split, v in value.items()}
    if isinstance(value, list | tuple):
        return [_resolve_files(v, base_dir, key) for v in value]
    text = str(value)
    if "://" in text or any(c in text for c in "*?["):
        return text
    path = Path(text).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.exists():
        raise DataError(f"{key}: file not found: {path}")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{key}: file is empty: {path}")
    return str(path)


def _load_error(exc: Exception) -> str:
    """The first line of a ``datasets`` error, with the first line of its cause when it only says that
    something went wrong."""
    lines = [str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
             for e in (exc, exc.__cause__) if e is not None]
    return lines[0] if len(lines) == 1 else f"{lines[0]} ({type(exc.__cause__).__name__}: {lines[1]})"


def _loads(builder: str, file: Path) -> bool:
    """Whether ``datasets`` reads ``file`` alone (after a load of several files failed: which one was it)."""
    import datasets

    try:
        datasets.load_dataset(builder, data_files=str(file))
    except Exception:
        return False
    return True


def _text_columns(cfg: TaskConfig) -> dict[str, str]:
    """The columns whose values become prompt or target text, each with the key that names it."""
    fields = [name for _, name, _, _ in string.Formatter().parse(cfg.template) if name and name != "input"]
    named: dict[str, str] = {}
    for column, by in ((cfg.input_column, "input_column"), (cfg.target_column, "target_column"),
                       *((f, "template") for f in fields)):
        if column is not None:
            named.setdefault(column, by)
    return named


def _check_text(rows: Rows, columns: dict[str, str], key: str, where: str) -> None:
    """Refuse a list or mapping where text belongs (``str()`` would train on its Python repr): the rows of a JSON
    document or a hub dataset, which the line checks (cl_runner/tasks/files.py) do not see."""
    for number, row in enumerate(rows, 1):
        for column, by in columns.items():
            kind = not_text(row.get(column))
            if kind:
                raise DataError(f"{key}.{by}: {where} row {number}: column {column!r} holds {kind}, not text (a "
                                "string or number); give it the text to train on")


def _dataset_splits(cfg: TaskConfig, seed: int, base_dir: Path, key: str) -> dict[str, Rows]:
    import datasets

    ensure_offline_data(_plain(cfg.data_files), base_dir, f"{key}.data_files")  # bundled offline texts: build once
    data_files = _resolve_files(_plain(cfg.data_files), base_dir, f"{key}.data_files")
    check_files(data_files, cfg.path, f"{key}.data_files", _text_columns(cfg) if cfg.format == "columns" else ())
    check_format_rows(cfg, local_files(data_files), f"{key}.data_files")  # messages / alpaca rows
    data_dir = cfg.data_dir
    if data_dir and not Path(data_dir).is_absolute():
        data_dir = str(base_dir / data_dir)
    path = cfg.path
    local = Path(path).expanduser() if path else None
    if local is not None and not local.is_absolute() and (base_dir / local).exists():
        path = str(base_dir / local)
    datasets.disable_progress_bars()
    # its own report of a file it failed to read ("Failed to read file ...") would be a second line: the error
    # below names the file
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        loaded = datasets.load_dataset(
            path, name=cfg.subset, data_files=data_files, data_dir=data_dir, revision=cfg.revision
        )
    except Exception as exc:  # datasets raises many types; the user needs the first line, the key and the file
        files = local_files(data_files)
        culprit = next((f for f in files if len(files) > 1 and not _loads(path, f)), None) or (
            files[0] if len(files) == 1 else None)
        where = f" from {culprit}" if culprit else ""
        raise DataError(f"{key}.path: could not load dataset {cfg.path!r}{where}: {_load_error(exc)}") from None
    finally:
        datasets.logging.set_verbosity_error()
    available = list(loaded.keys())

    def split(name: str, split_key: str) -> Rows:
        if name not in loaded:
            raise DataError(f"{key}.{split_key}: split {name!r} not in {cfg.path} (splits: {', '.join(available)})")
        rows = [dict(row) for row in loaded[name]]
        source = data_files.get(name, data_files) if isinstance(data_files, dict) else data_files or cfg.path
        _check_text(rows, _text_columns(cfg), key, f"split {name!r} of {source},")
        return rows

    train = split(cfg.train_split, "train_split")
    test = split(cfg.test_split, "test_split")
    if cfg.validation_split is not None:
        validation = split(cfg.validation_split, "validation_split")
    else:
        train, validation = _hold_out(train, cfg, seed)
    for name, rows in (("train", train), ("test", test)):
        if not rows:
            raise DataError(f"{key}.{name}_split: split {getattr(cfg, name + '_split')!r} of {cfg.path} is empty")
    columns = list(train[0].keys())
    needed = [("target_column", cfg.target_column)]
    if cfg.input_column is not None:
        needed.append(("input_column", cfg.input_column))
    for col_key, column in needed if cfg.format == "columns" else needed_columns(cfg):
        if column not in columns:
            files = _plain(cfg.data_files)
            source = files.get(cfg.train_split, files) if isinstance(files, dict) else files or cfg.path
            raise DataError(f"{key}.{col_key}: column {column!r} not in {source} (columns: {', '.join(columns)})")
    return {"train": train, "validation": validation, "test": test}


def _hold_out(train: Rows, cfg: TaskConfig, seed: int) -> tuple[Rows, Rows]:
    """``validation_fraction`` of the training rows (seeded) as validation; the rest stays training data."""
    rng = random.Random(f"validation-{cfg.name}-{seed}")
    order = list(range(len(train)))
    rng.shuffle(order)
    n_val = max(1, round(len(train) * cfg.validation_fraction)) if len(train) > 1 else 0
    held = set(order[:n_val])
    validation = [train[i] for i in sorted(held)] if held else list(train)
    return [row for i, row in enumerate(train) if i not in held] or train, validation


# ------------------------------------------------------------------------------------------- O-LoRA's CL_Benchmark
CL_BENCHMARK_FILES = {"train": "train.json", "validation": "dev.json", "test": "test.json"}  # split -> file
ANSWER_CUE = "\nAnswer:"  # O-LoRA's prompt ends with the row and this (src/uie_dataset_lora.py:283)


def _cl_benchmark_folder(cfg: TaskConfig, base_dir: Path, key: str) -> tuple[Path, str] | None:
    """The task's folder of O-LoRA's CL_Benchmark, or None: ``path`` itself when it holds ``labels.json``, or, when
    ``data_dir`` is a local folder, ``<data_dir>/<Task>/<Dataset>`` as named by the template's first two lines
    (``Task:TC`` and ``Dataset:dbpedia``: O-LoRA's prompt prefix is its folder layout); with the key that named it."""
    def local(value: str | None) -> Path | None:
        if not value:
            return None
        folder = Path(value).expanduser()
        return folder if folder.is_absolute() else base_dir / folder

    path, root = local(cfg.path), local(cfg.data_dir)
    if path is not None and (path / "labels.json").is_file():
        return path, "path"
    prefix = re.match(r"Task:([^\n/]+)\nDataset:([^\n/]+)\n", cfg.template)
    if root is None or prefix is None:
        return None
    if not root.is_dir():  # a typo in CL_BENCHMARK_DIR must not fall back to the hub's data
        raise DataError(f"{key}.data_dir: {root} is not a folder (a task whose template starts Task:/Dataset: reads "
                        "O-LoRA's CL_Benchmark folder from data_dir)")
    folder = root / prefix[1] / prefix[2]
    if not (folder / "labels.json").is_file():
        raise DataError(f"{key}.data_dir: {root} is a folder but has no {prefix[1]}/{prefix[2]}/labels.json (O-LoRA's "
                        "CL_Benchmark layout, which the template's Task:/Dataset: lines name)")
    return folder, "data_dir"


def _cl_benchmark_task(cfg: TaskConfig, folder: Path, key: str) -> tuple[TaskConfig, list[str]]:
    """The task reading ``folder``'s json files: ``sentence`` fills the template's body, ``label`` is the answer
    text (no verbalizer); and the label set of ``labels.json``, which must be the verbalizer's words."""
    labels = _read_labels(folder / "labels.json", key)
    if cfg.verbalizer and set(labels) != set(cfg.verbalizer.values()):
        raise DataError(f"{key}: {folder / 'labels.json'} lists {', '.join(labels)}; the task's verbalizer "
                        f"answers {', '.join(cfg.verbalizer.values())} (is it the folder of another task?)")
    for split in ("train", "test"):
        if not (folder / CL_BENCHMARK_FILES[split]).is_file():
            raise DataError(f"{key}: {folder} has labels.json but no {CL_BENCHMARK_FILES[split]} (O-LoRA's "
                            "CL_Benchmark folders hold train.json, dev.json, test.json and labels.json)")
    files = {split: str(folder / name) for split, name in CL_BENCHMARK_FILES.items() if (folder / name).is_file()}
    return dataclasses.replace(
        cfg, path="json", subset=None, revision=None, data_dir=None, data_files=files, train_split="train",
        test_split="test", validation_split="validation" if "validation" in files else None,
        input_column="sentence", target_column="label", verbalizer=None, labels=None,
        template=_sentence_template(cfg.template, f"{key.rsplit('.', 1)[0]}.template")), labels


def _read_labels(path: Path, key: str) -> list[str]:
    check_utf8(path, key, max_bytes=None)
    try:
        labels = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{key}: {path} is not valid JSON ({exc.msg})") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x.strip() for x in labels):
        raise DataError(f"{key}: {path} must hold a JSON list of label words, e.g. [\"True\", \"False\"]")
    return labels


def _sentence_template(template: str, key: str) -> str:
    """The template with its body replaced by ``{sentence}``: the lines before the first line that holds a
    placeholder are kept (task/dataset prefix, instruction, ``Option:`` line), then the row, then the answer cue,
    which is how O-LoRA assembles a prompt from a ``CL_Benchmark`` row (src/uie_dataset_lora.py:283)."""
    lines = template.split("\n")
    with_field = [i for i, line in enumerate(lines) if any(f for _, f, _, _ in string.Formatter().parse(line))]
    if not with_field or not template.endswith(ANSWER_CUE):
        raise ConfigError(f"{key}: a CL_Benchmark task needs a template whose body (from its first line with a "
                          f"placeholder) is followed by {ANSWER_CUE!r} at its end")
    head = "".join(line + "\n" for line in lines[: with_field[0]])
    return head + "{sentence}" + ANSWER_CUE


# ------------------------------------------------------------------------------------------- formatting
def _apply_target_template(cfg: TaskConfig, target: str) -> str:
    return cfg.target_template.replace("{target}", target)


def _text(value: Any) -> Any:
    """A row's value as the prompt uses it: null as nothing; a byte-order mark that ``datasets`` keeps at the start
    of a text file's first row dropped (docs/tasks.md: a BOM is accepted)."""
    return "" if value is None else value.removeprefix("\ufeff") if isinstance(value, str) else value


def doubled_cue(template: str, rows: Rows, input_column: str | None = None) -> tuple[str, int]:
    """(the cue, the rows that already end with it): the text a ``columns`` template appends after its last
    placeholder (``"{input}\\nAnswer:"`` appends ``Answer:``), and how many rows' value for that placeholder already
    ends with it, so that the prompt would read ``...Answer:\\nAnswer:``. ("", 0) when the template ends with a
    placeholder."""
    parts = [(literal, name) for literal, name, _, _ in string.Formatter().parse(template)]
    if len(parts) < 2 or parts[-1][1] is not None or parts[-2][1] is None or not parts[-1][0].strip():
        return "", 0
    cue, field = parts[-1][0].strip(), parts[-2][1]
    column = input_column if field == "input" and input_column is not None else field
    ends = sum(isinstance(row.get(column), str) and row[column].rstrip().endswith(cue) for row in rows)
    return cue, ends


def _warn_doubled_cue(cfg: TaskConfig, rows: Rows, key: str) -> None:
    """One warning per task whose template repeats a cue its inputs already end with (nothing is changed: a
    template that wants it twice keeps it)."""
    if cfg.format != "columns" or cfg.source != "datasets":
        return
    cue, ends = doubled_cue(cfg.template, rows, cfg.input_column)
    if ends:
        log.warning("task %s: %d of %d examples already end with %r, which %s.template appends again "
                    "(the prompt reads ...%s\\n%s); drop it from the template or from the data",
                    cfg.name, ends, len(rows), cue, key, cue, cue)


def _format(cfg: TaskConfig, rows: Rows, key: str, split: str) -> list[Example]:
    if cfg.format != "columns":  # chat messages or Alpaca rows (formats.py)
        return format_examples(cfg, rows, key, split)
    fields = {name for _, name, _, _ in string.Formatter().parse(cfg.template) if name}
    examples: list[Example] = []
    for index, row in enumerate(rows):
        values = {k: _text(v) for k, v in row.items()}
        if cfg.input_column is not None:
            values["input"] = values.get(cfg.input_column, "")
        missing = sorted(fields - values.keys())
        if missing:
            raise DataError(f"{key}.template: placeholder {{{missing[0]}}} is not a column (columns: "
                            f"{', '.join(k for k in row)})")
        prompt = cfg.template.format(**values) if cfg.input_column is not None or fields else ""
        raw = row.get(cfg.target_column)
        if cfg.verbalizer is not None:
            label = str(raw)
            if label not in cfg.verbalizer:
                raise DataError(
                    f"{key}.verbalizer: {split} row {index} has label {label!r}, not one of "
                    f"{', '.join(map(str, cfg.verbalizer))}"
                )
            target = cfg.verbalizer[label]
        else:
            target = str(_text(raw))
        if not target.strip():
            raise DataError(f"{key}.target_column: {split} row {index} has an empty target ({cfg.target_column!r})")
        if cfg.labels is not None and cfg.verbalizer is None and target not in cfg.labels:
            raise DataError(f"{key}.labels: {split} row {index} has target {target!r}, not one of "
                            f"{', '.join(cfg.labels)}")
        examples.append(Example(prompt=prompt, target=_apply_target_template(cfg, target)))
    return examples
