"""cl-runner: continual learning experiments for causal language models."""

from cl_runner.core.lazy import defer

__version__ = "0.1.0"

defer("torch")  # imported at its first use: `cl-run --help` and config errors answer without it (lazy.py)
