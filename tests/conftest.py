"""Shared pytest set-up: the helpers in helpers.py; GPU tests skip cleanly without CUDA."""

import os

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
