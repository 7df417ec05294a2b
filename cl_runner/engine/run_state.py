"""RunState: what a run has done so far; it is the contents of metrics.json and the run part of a checkpoint."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

SAVED = ("info", "stages", "history", "next_task", "wall_time_per_task_s", "checkpoints", "checkpoint_seq",
         "elapsed_s")  # the fields a checkpoint holds (the rest belong to this process or to the finished run)


@dataclass
class RunState:
    """The run's progress and results. ``info`` says what the run is (tasks, device, config, versions...): it
    is fixed when the run first starts and kept across resumes."""

    info: dict[str, Any]
    started: float = field(default_factory=time.perf_counter)  # when this process started the run
    stages: list[dict] = field(default_factory=list)  # one per matrix row: {"stage", "scores": {task: result}}
    history: list[dict] = field(default_factory=list)  # epoch records of the finished tasks
    next_task: int = 0
    wall_time_per_task_s: dict[str, float] = field(default_factory=dict)
    checkpoints: dict[str, Any] = field(default_factory=lambda: {"count": 0})  # count: written over the run's life
    checkpoint_seq: int = 0  # number of the newest checkpoint written (ckpt-<seq>; numbers only grow)
    elapsed_s: float | None = None  # wall time of the run when its newest checkpoint was written
    elapsed_before: float = 0.0  # wall time of the run's earlier lives (before a resume)
    status: str = "running"  # running | interrupted | failed | completed
    error: str | None = None
    results: dict[str, Any] = field(default_factory=dict)  # summary metrics and totals, once completed

    @property
    def task_names(self) -> list[str]:
        return self.info["tasks"]

    def elapsed(self) -> float:
        """Wall time of the whole run so far, earlier lives included."""
        return self.elapsed_before + time.perf_counter() - self.started

    def rows(self) -> list[list[float]]:
        """The score matrix: one row per stage (init, then after each task), one column per task."""
        return [[stage["scores"][n]["score"] for n in self.task_names] for stage in self.stages]

    def add_stage(self, stage: str, results: list[dict]) -> None:
        self.stages.append({"stage": stage, "scores": dict(zip(self.task_names, results, strict=True))})

    def to_metrics(self) -> dict[str, Any]:
        """The contents of metrics.json (its keys in the order users have always seen them)."""
        metrics = {"status": self.status, **self.info, "stages": self.stages,
                   "wall_time_per_task_s": self.wall_time_per_task_s, "checkpoints": self.checkpoints}
        if self.elapsed_s is not None:
            metrics["elapsed_s"] = self.elapsed_s
        if self.error is not None:
            metrics["error"] = self.error
        return metrics | self.results

    def to_checkpoint(self) -> dict[str, Any]:
        """Plain data (loadable with ``torch.load(weights_only=True)``) to continue the run from."""
        return {name: getattr(self, name) for name in SAVED}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any], started: float) -> RunState:
        return cls(**{name: saved[name] for name in SAVED}, started=started, elapsed_before=saved["elapsed_s"])
