"""What a run cost: the ``cost`` block of metrics.json, recomputed after every stage from what the run already
records, and its rows in the summary tables (the console table at the end of a run, ``cl-report``'s table).

- ``trainable_parameters``: the most parameters one task's optimizer updated (``parameters.trainable_per_task``);
  ``extra_parameters``: parameters the strategy added to the model (adapters, columns, vocabulary rows), i.e. the
  model's size now less ``parameters.total``. Copies a strategy holds outside the model (an LwF teacher, EWC's
  anchors) are in ``strategy_accounting`` (``*_bytes``).
- ``peak_cpu_rss_bytes``: the process's resident-memory high-water mark (``getrusage`` ``ru_maxrss``, KiB on
  Linux, bytes on macOS), since the process started; ``peak_cuda_allocated_bytes``: ``torch.cuda``'s
  ``max_memory_allocated`` since the run started (None without CUDA). Both the largest over ranks and over the
  run's lives (a resumed run keeps the earlier peak when it was higher).
- ``train_seconds``: the epochs' training time (history.jsonl ``seconds``: no validation, no checkpoints);
  ``eval_seconds`` and ``validation_seconds``: the sums of ``eval_seconds_per_stage``.
- ``tokens_seen`` and ``target_tokens_seen``: the tokens of every batch trained on (prompt and target, replayed
  and pseudo-examples included; no padding) and the target tokens among them, over all epochs and ranks.

This module imports no torch at load time: ``cl-report`` formats cost columns with it.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

from cl_runner.core import dist

# key -> (label in the tables, kind of number: count | bytes | seconds)
COST_FIELDS: dict[str, tuple[str, str]] = {
    "trainable_parameters": ("trainable parameters", "count"),
    "extra_parameters": ("extra parameters", "count"),
    "peak_cpu_rss_bytes": ("peak memory (CPU RSS)", "bytes"),
    "peak_cuda_allocated_bytes": ("peak memory (CUDA allocated)", "bytes"),
    "train_seconds": ("training time (s)", "seconds"),
    "eval_seconds": ("evaluation time (s)", "seconds"),
    "validation_seconds": ("validation time (s)", "seconds"),
    "tokens_seen": ("tokens trained on", "count"),
    "target_tokens_seen": ("target tokens trained on", "count"),
}
PEAKS = ("peak_cpu_rss_bytes", "peak_cuda_allocated_bytes")


def peak_rss_bytes() -> int:
    """The process's peak resident memory in bytes (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def start(device: Any) -> None:
    """The run starts: CUDA's peak-memory counter restarts, so a sweep's jobs in one process each get their own."""
    if getattr(device, "type", None) == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def peaks(device: Any, earlier: dict[str, Any]) -> dict[str, int | None]:
    """Peak CPU RSS and CUDA allocated bytes: the largest over ranks (a collective: every rank calls it) and over
    ``earlier`` (the cost block of the run's earlier lives)."""
    cuda = None
    if getattr(device, "type", None) == "cuda":
        import torch

        cuda = torch.cuda.max_memory_allocated(device)
    rss, top_cuda = dist.all_reduce_max([peak_rss_bytes(), cuda or 0])
    values = {"peak_cpu_rss_bytes": int(rss), "peak_cuda_allocated_bytes": None if cuda is None else int(top_cuda)}
    return {k: max(v, earlier[k]) if v is not None and earlier.get(k) is not None else v for k, v in values.items()}


def epoch_tokens(record: dict[str, Any]) -> tuple[int, int]:
    """(tokens, target tokens) of one history record (older records: from their per-second rates)."""
    if record.get("tokens") is not None:
        return int(record["tokens"]), int(record["target_tokens"])
    rate = record.get("target_tokens_per_s") or 0.0
    return round(record["tokens_per_s"] * record["seconds"]), round(rate * record["seconds"])


def run_cost(info: dict[str, Any], history: list[dict[str, Any]], parameters_now: int, device: Any) -> dict:
    """The cost block from the run's ``info`` (parameters, eval_seconds_per_stage, the earlier cost block), its
    epoch records and the model's parameter count now."""
    parameters, timing = info["parameters"], info.get("eval_seconds_per_stage", {})
    tokens = [epoch_tokens(r) for r in history]
    return {
        "trainable_parameters": max(parameters.get("trainable_per_task", {}).values(), default=0),
        "extra_parameters": parameters_now - parameters["total"],
        **peaks(device, info.get("cost") or {}),
        "train_seconds": round(sum(r["seconds"] for r in history), 3),
        "eval_seconds": round(sum(t["eval"] for t in timing.values()), 3),
        "validation_seconds": round(sum(t["validation"] for t in timing.values()), 3),
        "tokens_seen": sum(t for t, _ in tokens),
        "target_tokens_seen": sum(t for _, t in tokens),
    }


def compact(n: float) -> str:
    """A count for a table: 529,280 -> 529.3k; 1.2M; 3.4B."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def format_value(key: str, value: float | None) -> str:
    """One cost number as a table shows it: counts compact, bytes in kB/MB/GB, seconds to 0.1 s."""
    if value is None:
        return "-"
    kind = COST_FIELDS[key][1]
    if kind == "bytes":
        from cl_runner.core.files import human_bytes

        return human_bytes(value)
    return f"{value:.1f}" if kind == "seconds" else compact(value)


def cost_rows(cost: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of a cost block for a summary table; fields the run has no value for are left out."""
    return [(label, format_value(key, cost[key])) for key, (label, _) in COST_FIELDS.items()
            if cost.get(key) is not None]
