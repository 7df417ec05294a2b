"""Claiming a run directory before a run writes into it: rank 0, holding the directory's lock, decides whether the
run starts afresh, continues, or has nothing to do, and tells the other ranks, which wait for its word before
loading anything; the caller's hooks run once the directory is claimed and when the run ends. Once loaded, the
ranks agree that every one of them accepted the inputs (``agreed``) before any of them goes on or gives up, so that
a start one rank refuses is undone by rank 0 while every rank still lives. A resume continues the saved config;
only the options in ``NEUTRAL_ON_RESUME`` (which cannot change a result) may be given with it.

No torch here: cl-run (cli.py) subclasses ``RunHooks`` and reads ``run_is_finished`` before the engine loads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cl_runner.core import dist
from cl_runner.core.errors import UserError

T = TypeVar("T")


class Refused(UserError):
    """A start that some rank refused (bad data, model, option), raised on every rank with the first refusing
    rank's line and exit status; ``agreed``: every rank knows, so only rank 0 prints it."""

    agreed = True

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def agreed(load: Callable[[], T]) -> T:
    """``load()`` on every rank, then the ranks compare: when any rank refused its inputs (a UserError), or failed,
    every rank raises Refused with the lowest such rank's line, so that none leaves before the others know (under
    torchrun a rank that exits first gets the others killed, rank 0 among them, in the middle of its clean-up).
    One process: ``load()`` as it is. ``load`` must run no collective before the point where it can fail."""
    if not dist.world().distributed:
        return load()
    try:
        result, mine = load(), None
    except UserError as exc:
        result, mine, error = None, (str(exc), exc.exit_code), exc
    except Exception as exc:  # noqa: BLE001 - an unexpected error on one rank: every rank must still leave in order
        result, mine, error = None, (f"{type(exc).__name__}: {exc}", 1), exc
    found = [(rank, told) for rank, told in enumerate(dist.all_gather_objects(mine)) if told is not None]
    if not found:
        return result
    rank, (message, code) = found[0]
    if mine is not None and not isinstance(error, UserError) and rank == dist.world().rank:
        raise error  # this rank's own unexpected error, with its traceback under debug=true
    raise Refused(message if rank == 0 else f"rank {rank}: {message}", code)


class RunHooks:
    """What the caller of ``run`` (engine/run.py) does at two moments only run() knows of; no-ops here. cl-run's
    writes Hydra's files and points its job log at the directory once it is claimed; when the run ends it maps
    how to its exit status and, while the directory is still locked, cleans up after a refused start."""

    def claimed(self, run_dir: Path, resume: bool) -> None:
        """``run_dir`` is this run's (rank 0 holds its lock; every rank is told): before the run writes into it."""

    def ended(self, run_dir: Path, error: BaseException | None) -> None:
        """The claimed run ended: ``error`` stopped it (and is raised again after this), or it finished (None).
        Rank 0 still holds the lock."""


def claim(run_dir: Path, config_yaml: str, resume: bool | None, hooks: RunHooks) -> bool | None:
    """Rank 0, holding the lock: whether the run continues (True) or starts afresh (False), or None when it has
    already finished. ``resume=None``: continue when ``run_dir`` holds this experiment (its config.yaml is
    ``config_yaml``; another experiment's is refused with UserError, having written nothing), and leave a finished
    run as it is. The other ranks wait for rank 0's word (None for them: rank 0 refused the start or found the run
    finished, and says why). ``hooks.claimed`` then runs on every rank."""
    world = dist.world()
    if not world.main:
        told = dist.broadcast_object(None)
        if "resume" in told:
            hooks.claimed(run_dir, told["resume"])
        return told.get("resume")
    told: dict[str, bool] = {}
    try:
        finished = False
        if resume is None:
            resume = _holds_this_run(run_dir, config_yaml)
            finished = resume and run_is_finished(run_dir)
        if not finished:
            hooks.claimed(run_dir, resume)
            told = {"resume": resume}
    finally:  # after a refusal too: the other ranks must not wait for ever
        if world.distributed:
            dist.broadcast_object(told)
    return told.get("resume")


def _holds_this_run(run_dir: Path, config_yaml: str) -> bool:
    """True when ``run_dir`` already holds this experiment (a re-run sweep resumes it); a different one is an error."""
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return False
    if saved.read_text() != config_yaml:
        raise UserError(f"{run_dir} already holds a different experiment (its config.yaml differs); "
                        "choose another hydra.run.dir / hydra.sweep.dir")
    return True


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """``run_dir``'s metrics.json ({} when there is none, or it does not read back)."""
    import json  # here: cl-run imports this module before anything else, json included, is needed

    try:
        metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def record_failure(run_dir: Path, code: int, message: str) -> None:
    """A job that failed before its run wrote anything still leaves a metrics.json saying why (for cl-report);
    not for a stop by SIGINT/SIGTERM (exit status 130/143), which a resume continues."""
    import json

    from cl_runner.core.files import write_atomic

    metrics = run_dir / "metrics.json"
    if code and code not in (130, 143) and run_dir.is_dir() and not metrics.exists():
        try:
            write_atomic(metrics, json.dumps({"status": "failed", "exit_code": code, "error": message}, indent=2)
                         + "\n")
        except (UserError, OSError):  # a full disk: the one-line error already said why
            pass


def run_is_finished(run_dir: Path) -> bool:
    """Whether ``run_dir``'s metrics.json says the run completed."""
    return read_metrics(run_dir).get("status") == "completed"


# Options a resume may change (``cl-run resume=DIR key=value``): each changes how a run computes or reports, never
# what it computes. Every other key is refused: the checkpoint continues the saved config. One place, with why:
NEUTRAL_ON_RESUME = {
    # scoring: each example is scored with its own mask and positions (docs/evaluation.md#batches, tested in
    # tests/scoring/test_evaluate.py): the same accuracies, perplexities equal up to float rounding
    "train.eval_batch_size": "evaluation batching",
    "train.eval_batch_tokens": "evaluation batching",
    # estimation passes: each example's gradient is its own; the batch only regroups the sum (equal up to float
    # rounding; tests/strategies/test_memory.py)
    "strategy.fisher_batch_size": "Fisher batching",
    "strategy.mas_batch_size": "MAS importance batching",
    # losses are added to the epoch's sums in step order wherever the reads fall (engine/loop.py)
    "train.log_every": "how often the loss is read",
    # CPU threads: the same operations (float sums may be ordered differently: equal up to rounding)
    "device.threads": "CPU threads",
    # when checkpoints are written and how many are kept: a resume from any of them is exact (tests/e2e)
    "checkpoint.every_n_steps": "checkpoint timing",
    "checkpoint.keep_last": "checkpoints kept",
    "checkpoint.mid_task": "checkpoint timing",
    # what is reported where, not what is computed
    "logger": "experiment trackers",
    "debug": "tracebacks",
    "eval.save_predictions": "prediction files",
}


def neutral_overrides(overrides: list[str]) -> dict[str, Any]:
    """``key=value`` overrides a resume may apply (``NEUTRAL_ON_RESUME``: a key, or one under a listed group), as
    a nested dict to merge into the saved config. ValueError (one line) names the first key that could change the
    results, or an override that is not ``key=value``."""
    from omegaconf import OmegaConf

    for override in overrides:
        key = override.split("=", 1)[0]
        if "=" not in override or not key or key[0] in "+~":
            raise ValueError(f"resume: expected key=value overrides, got {override!r}")
        if not any(key == k or key.startswith(k + ".") for k in NEUTRAL_ON_RESUME):
            raise ValueError(f"resume: {key} cannot change on resume (it can change the results; the run continues "
                             f"with its saved config); a resume may change only {', '.join(NEUTRAL_ON_RESUME)}")
    return OmegaConf.to_container(OmegaConf.from_dotlist(overrides))
