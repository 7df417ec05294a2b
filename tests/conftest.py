"""Shared pytest set-up: the helper modules in this folder (helpers.py, tiny_lm.py, tiny_loop.py, resume_runs.py,
strategy_runs.py, olora_cases.py, bad_files.py) importable from every test folder; GPU tests skip cleanly without
CUDA. The folders mirror the package (tests/engine/ tests cl_runner/engine/, ...); tests/e2e/ holds the whole-run
tests. A test module imports helpers, never another test module (tests/test_architecture.py checks it)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper modules, by their plain names

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads cost more than they give (and subprocesses
import pytest  # noqa: E402  inherit it), which keeps the suite fast on a loaded 2-core machine
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject.toml): a worker per core, at most 4 (each holds torch and its test's runs in memory;
    more rarely pays on the few long modules that each stay on one worker)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
