"""TRACE's released benchmark folder (Wang et al. 2023, arXiv:2310.06762; github.com/BeyonderXX/TRACE): a task
whose ``path`` is ``trace`` reads ``<data_dir>/<subset>/train.json``, ``eval.json`` and ``test.json``, each a JSON
list of ``{"prompt", "answer"}`` rows (TRACE's utils/data/raw_datasets.py ``LocalJsonFileDataset``, lines 92-100).
``data_dir`` is the download's ``LLM-CL_Benchmark`` folder (the catalogue sets it from ``TRACE_BENCHMARK_DIR``),
``subset`` the task's folder in it (``C-STANCE``, ``FOMC``, ...).

The rows then take the ordinary ``datasets`` json path (cl_runner/tasks/load.py): the prompt is the row's
``prompt`` as it stands and the target its ``answer``, nothing between them, as TRACE's data collator joins them
(utils/data/data_collator.py:79, ``instruction + label``). ``eval.json`` is the validation split (used only with
``train.keep_best``); a folder without one holds out ``validation_fraction`` of the training rows.

Errors name the key and the setting (``TRACE_BENCHMARK_DIR``) and the missing folder or file, before any model
is loaded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cl_runner.config.schema import TaskConfig
from cl_runner.core.errors import DataError

TRACE_PATH = "trace"  # a task's `path` that reads TRACE's folder
SETTING = "TRACE_BENCHMARK_DIR"
FILES = {"train": "train.json", "validation": "eval.json", "test": "test.json"}  # split -> TRACE's file
TASK_FOLDERS = ("C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten")


def is_trace(cfg: TaskConfig) -> bool:
    return cfg.path == TRACE_PATH


def trace_task(cfg: TaskConfig, base_dir: Path, key: str) -> tuple[TaskConfig, Path]:
    """The task reading its folder of TRACE's benchmark through the json builder, and that folder."""
    if not cfg.data_dir:
        raise DataError(f"{key}.data_dir: not set; TRACE's tasks read its released LLM-CL_Benchmark folder: set "
                        f"{SETTING}=<folder holding {', '.join(TASK_FOLDERS[:2])}, ...> or {key}.data_dir")
    if not cfg.subset:
        raise DataError(f"{key}.subset: not set; name the task's folder in TRACE's benchmark, e.g. "
                        f"{TASK_FOLDERS[1]}")
    root = Path(cfg.data_dir).expanduser()
    root = root if root.is_absolute() else base_dir / root
    if not root.is_dir():  # the one setting, named as such: a typo there is the usual cause
        raise DataError(f"{key}.data_dir: {root} is not a folder ({SETTING} or data_dir must name TRACE's "
                        "LLM-CL_Benchmark folder)")
    folder = root / cfg.subset
    for split in ("train", "test"):
        if not (folder / FILES[split]).is_file():
            raise DataError(f"{key}.data_dir: {folder / FILES[split]} not found (TRACE's layout, from {SETTING}: "
                            f"<folder>/{cfg.subset}/train.json, eval.json, test.json)")
    files = {split: str(folder / name) for split, name in FILES.items() if (folder / name).is_file()}
    return dataclasses.replace(
        cfg, path="json", subset=None, revision=None, data_dir=None, data_files=files, train_split="train",
        test_split="test", validation_split="validation" if "validation" in files else None,
        input_column="prompt", target_column="answer", template="{input}", format="columns",
        verbalizer=None, labels=None), folder
