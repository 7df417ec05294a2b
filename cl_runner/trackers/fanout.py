"""The trackers of one run behind one object: run.py calls it in one line at each point of the run (step event,
epoch, stage, end), and it hands the values to every configured tracker. A tracker that raises is dropped with
one warning line; the run goes on. Only rank 0 opens trackers; with no ``logger`` configured every method is a
no-op.

All values share one x axis, the run's global optimizer step (steps of the finished tasks plus the current
task's), so curves of successive tasks follow each other. The tracker run ids are kept in ``trackers.json`` in
the run directory: a continued run (``cl-run resume=DIR``) logs into the same tracker runs."""

from __future__ import annotations

import json
import logging
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from cl_runner.core.files import write_atomic
from cl_runner.core.logs import quiet_logger
from cl_runner.trackers.backends import BACKENDS, Matrix, TrackedRun, Tracker

log = logging.getLogger(__name__)
TRACKERS_FILE = "trackers.json"
HTTP_RETRIES = "urllib3.connectionpool"  # logs a line per HTTP retry (MLflow's client): kept quiet
NOT_LOGGED = {"checkpoints", "tensorboard", "wandb", "mlruns", "superseded"}  # folders kept out of the artifacts


def brief(exc: BaseException, most: int = 300) -> str:
    """An exception on one line of at most ``most`` characters: its start and its end (where the cause is)."""
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return text if len(text) <= most else f"{text[:most // 2]} ... {text[-most // 2:]}"


def sweep_group() -> str | None:
    """The sweep directory (relative to the launch directory when inside it) when this job is part of a Hydra
    multirun: its jobs are grouped by it. None for a single run."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
            return None
        path = Path(str(HydraConfig.get().sweep.dir)).absolute()
    except Exception:  # no Hydra context (run() called directly)
        return None
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def finished_steps(history: list[dict[str, Any]]) -> int:
    """Optimizer steps of the finished tasks (their epoch records' last step)."""
    last: dict[int, int] = {}
    for record in history:
        last[record["task_index"]] = max(last.get(record["task_index"], 0), record["step"])
    return sum(last.values())


def numbers(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of nested summary data, keyed ``prefix/key/...`` (per-task rows by task name)."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float):
            out[f"{prefix}{key}"] = float(value)
        elif isinstance(value, dict):
            out |= numbers(value, f"{prefix}{key}/")
        elif isinstance(value, list) and all(isinstance(v, dict) and "task" in v for v in value):
            out |= numbers({v["task"]: {k: x for k, x in v.items() if k != "task"} for v in value}, f"{prefix}")
    return out


def result_files(run_dir: Path) -> list[Path]:
    """The run's result files (config, metrics, matrix, history, plots, logs, .hydra); never checkpoints."""
    files = []
    for path in sorted(run_dir.rglob("*")):
        parts = path.relative_to(run_dir).parts
        if path.is_file() and not NOT_LOGGED & set(parts) and not path.name.startswith(".") and ".lock" not in parts:
            files.append(path)
    return files


class Trackers:
    """Every configured tracker behind one object; ``Trackers([])`` is the no-op used without a logger."""

    def __init__(self, trackers: list[Tracker], task_names: list[str] | None = None,
                 metric_names: list[str] | None = None, done: int = 0, current: int = 0,
                 run_dir: Path | None = None) -> None:
        self.trackers, self.task_names, self.metric_names = trackers, task_names or [], metric_names or []
        self.done, self.current, self.offset = done, current, done  # steps: finished tasks, this task, its offset
        self.run_dir, self.stage_names = run_dir, []

    def _call(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                with quiet_logger(HTTP_RETRIES):
                    getattr(tracker, method)(*args)
            except Exception as exc:  # a dashboard never costs the run
                log.warning("logger %s failed and is switched off for this run (%s)", tracker.name, brief(exc))
                self.trackers.remove(tracker)

    def on_step(self, event: dict[str, Any], ctx: Any) -> None:
        """A loop ``step`` event: loss, learning rate, tokens/s, MFU, what the strategy logged."""
        if not self.trackers:
            return
        if event["event"] == "task_start":
            self.offset, self.current = self.done, event["step"]
            return
        self.current = event["step"]
        values = {"train/loss": event["loss"], "train/tokens_per_s": event["tokens_per_s"],
                  "train/epoch": event["epoch"], "train/task": ctx.task_index}
        if ctx.optimizer is not None:
            values["train/lr"] = ctx.optimizer.param_groups[0]["lr"]
        if event["mfu"] is not None:
            values["train/mfu"] = event["mfu"]
        values |= numbers(event["extras"], "strategy/")
        self._call("scalars", values, self.offset + self.current)

    def on_epoch(self, record: Any) -> None:
        """An epoch's line of history.jsonl: its mean loss, the learning rate, and the validation score if any."""
        if not self.trackers:
            return
        self.current = record.step
        values = {"epoch/train_loss": record.train_loss, "epoch/lr": record.lr,
                  "epoch/tokens_per_s": record.tokens_per_s, "epoch/seconds": record.seconds}
        if record.validation_score is not None:
            values[f"validation/{record.task}"] = record.validation_score
        self._call("scalars", values, self.offset + self.current)

    def on_stage(self, stage: str, rows: list[list[float | None]]) -> None:
        """The matrix after a stage: one scalar per task, a table, and the heatmap where a tracker takes images."""
        if stage != "init":
            self.done, self.current = self.done + self.current, 0
        self.stage_names.append(stage)
        if not self.trackers:
            return
        step = self.done
        self._call("scalars", {f"score/{name}": v for name, v in zip(self.task_names, rows[-1], strict=True)
                               if v is not None}, step)
        images = any(t.takes_images for t in self.trackers)
        with tempfile.TemporaryDirectory() if images else nullcontext() as folder:
            png = self._heatmap(Path(folder) / f"{stage}.png", rows) if folder else None
            self._call("matrix", Matrix(stage, self.task_names, list(self.stage_names), rows, png), step)

    def _heatmap(self, path: Path, rows: list[list[float | None]]) -> Path | None:
        from cl_runner.outputs.plots import score_matrix

        nan = float("nan")
        try:
            return score_matrix(path, self.task_names, [[nan if v is None else v for v in r] for r in rows],
                                self.metric_names, title=f"score matrix after {len(rows) - 1} task(s)")
        except Exception as exc:  # the table and scalars still go out
            log.warning("score matrix image for the trackers not drawn: %s: %s", type(exc).__name__, exc)
            return None

    def close(self, state: Any) -> None:
        """The run's end (``state.status``: completed, failed or interrupted): summary metrics, result files as
        artifacts, the status. Closes every tracker; calling it again does nothing."""
        if not self.trackers:
            return
        if state.status == "completed":  # with the cost block (metrics.json "cost": summary/cost/...)
            self._call("summary", numbers({**state.results, "cost": state.info.get("cost") or {}}, "summary/"),
                       self.done)
        if self.run_dir is not None:
            self._call("artifacts", result_files(self.run_dir), self.run_dir)
        self._call("close", state.status, state.error)
        self.trackers = []


def read_saved(path: Path) -> dict[str, Any] | None:
    """trackers.json of an earlier life of the run; None when there is none (or it cannot be read: new runs)."""
    if not path.exists():
        return None
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        log.warning("%s unreadable (%s): the trackers start new runs", path, brief(exc))
        return None


def open_trackers(parts: Any, state: Any, task_resume: dict[str, Any] | None) -> Trackers:
    """The run's trackers (rank 0; none without a ``logger``), continuing the tracker runs of trackers.json.
    A tracker that cannot start (package broken, server down) costs one warning line."""
    chosen = parts.cfg.logger.chosen()
    if not chosen or not parts.world.main:
        return Trackers([])
    path = parts.run_dir / TRACKERS_FILE
    saved = read_saved(path)
    done = finished_steps(state.history)
    current = task_resume["loop"]["step"] if task_resume else 0
    run = TrackedRun(parts.run_dir, parts.run_dir.name, (saved or {}).get("group", sweep_group()),
                     parts.cfg.experiment_name, state.info["config"],
                     None if saved is None else (done + current + 1 if state.stages else 0))
    trackers = []
    for name in chosen:
        try:
            with quiet_logger(HTTP_RETRIES):
                trackers.append(BACKENDS[name](getattr(parts.cfg.logger, name), run, (saved or {}).get(name, {})))
        except Exception as exc:
            log.warning("logger %s could not start and is off for this run (%s)", name, brief(exc))
    write_atomic(path, json.dumps({"group": run.group, **(saved or {}), **{t.name: t.ids() for t in trackers}},
                                  indent=2) + "\n")
    fanout = Trackers(trackers, parts.names, [t.metric for t in parts.tasks], done, current, parts.run_dir)
    fanout.stage_names = [s["stage"] for s in state.stages]
    return fanout
