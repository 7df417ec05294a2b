"""cl-runner: continual learning experiments for causal language models."""

__version__ = "0.1.0"
