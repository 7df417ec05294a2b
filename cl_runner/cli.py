"""``cl-run``: parse the command line, compose and validate the config once (every job of a sweep up front), hand
the validated Config to the engine (engine/run.py's ``run``, which tests call too), map errors to exit codes:
0 ok, 1 failed (unexpected error; in a sweep: some job failed), 2 bad input (config, data, model, paths),
3 training diverged (non-finite loss), 4 CUDA out of memory, 5 disk full, 130 / 143 stopped by SIGINT / SIGTERM
(handled from the first line of ``main``: inside the task loop after writing a checkpoint, before it at once).

A single run is run as Hydra's run mode runs one (callbacks, job directory, job logging), on the config composed
here; a sweep goes through Hydra's sweeper and launcher, each job finding the Config validated here for it.
Nothing is written into a run directory until the run is known to proceed: the config is validated, the directory
locked and its saved config compared (by run()) first; only then are Hydra's ``.hydra/*.yaml`` and the job log
written (``CliHooks.claimed``)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
from pathlib import Path

from cl_runner.config.preflight import CONF_DIR, checked, job_key, one_line, output_dir, preflight, split_args
from cl_runner.core import dist
from cl_runner.engine.claim import RunHooks, record_failure

EXIT_BAD_INPUT, EXIT_FAILED, EXIT_DIVERGED, EXIT_OOM, EXIT_INTERRUPTED = 2, 1, 3, 4, 130
CLAIMED: list[Path] = []  # run directories this process has locked and writes into
NEW_DIRS: list[Path] = []  # directories a single run's output path needed that did not exist before cl-run
PLANNED: dict[str, object] = {}  # a sweep's jobs, validated by preflight: job_key -> Config
FAILURES: list[str] = []  # jobs of this process's sweep that failed (a sweep goes on past them)
LAST_ERROR = [""]  # the last one-line error, for the failed job's metrics.json


class Stopped(BaseException):
    """SIGINT/SIGTERM outside a run's own handling (imports, composition, checks): stop at once, cleanly."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


STOP_SIGNAL: list[int] = []  # the signal that stopped cl-run outside a run's own handling


def _stop_now(signum, frame) -> None:
    STOP_SIGNAL.append(signum)  # kept: a library that turns the exception into another one cannot hide it
    raise Stopped(signum)


def _check_stop() -> None:
    """Stop now if a signal came while a library swallowed the exception it raised (e.g. during an import)."""
    if STOP_SIGNAL:
        raise Stopped(STOP_SIGNAL[0])


def _stopped(signum: int) -> None:
    name = signal.Signals(signum).name
    if not CLAIMED:
        _remove_new_dirs()  # Hydra creates the run directory before the run claims it
        if LAST_ERROR[0]:  # a refused start, stopped by its launcher: its one line already said why
            sys.exit(128 + signum)
    where = (f"; resume with: cl-run resume={CLAIMED[-1]}" if CLAIMED
             else " before any run started; nothing was written")
    print(f"cl-run: stopped by {name}{where}", file=sys.stderr)
    sys.exit(128 + signum)


class RunLogFile(logging.FileHandler):
    """Hydra's job log file (conf/hydra/default.yaml), opened only once its directory is a run's own: a refused
    start, or a sweep job refused for its directory, leaves no log file behind."""

    def __init__(self, filename: str = os.devnull, mode: str = "a", encoding: str | None = None) -> None:
        # no filename: a job_logging config without this handler (hydra/job_logging=disabled) never uses it
        super().__init__(filename, mode, encoding, delay=True)

    def emit(self, record: logging.LogRecord) -> None:
        folder = Path(self.baseFilename).parent
        if folder in CLAIMED and (self.stream is not None or folder.is_dir()):  # rank 0 may have undone the start
            super().emit(record)


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """One line and exit: a bad input, found before anything runs. Under torchrun or srun every rank finds the same
    error, and only the first rank of each node prints it."""
    if dist.printing_rank():
        print(f"cl-run: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(code)


def _report(message: str, code: int) -> int:
    rank = "" if dist.world().main else f"[rank {dist.world().rank}] "
    print(f"cl-run: {rank}error: {' '.join(message.split())}", file=sys.stderr)
    LAST_ERROR[0] = " ".join(message.split())
    return code


def _world(config) -> dist.World:
    """This process's rank: the run's process group is joined here when ``distributed.kind`` asks for one (torchrun,
    srun, or a Slurm launcher job with several tasks), once, before the run directory is planned and claimed."""
    if config.distributed.kind == "none":
        return dist.world()
    from cl_runner.engine.runtime import join

    return join(config)


def _same_on_every_rank(path: Path) -> Path:
    """Under torchrun every rank takes rank 0's time-stamped directory (ranks start at slightly different times)."""
    return dist.broadcast_object(path) if dist.world().distributed else path


class CliHooks(RunHooks):
    """cl-run's side of one run (the engine calls it, engine/claim.py): Hydra's files and this rank's job log once
    the directory is claimed; when the run ends, its exit status (one line printed) and, while the directory is
    still locked, the clean-up of a single run refused for bad input or the failure record of a job that failed
    before its run wrote one. ``task_cfg``: the Hydra job's config (None for ``cl-run resume=``)."""

    def __init__(self, config, task_cfg=None, single: bool = False, before: set[str] | None = None) -> None:
        self.config, self.task_cfg, self.single, self.before = config, task_cfg, single, before or set()
        self.code: int | None = None  # None until the claimed run ended, or for what must propagate

    def claimed(self, run_dir: Path, resume: bool) -> None:
        if not dist.world().main:
            _rank_log(run_dir)
        elif self.task_cfg is not None:
            from cl_runner.config.hydra_job import write_hydra_files

            write_hydra_files(self.task_cfg, run_dir, resume)
        CLAIMED.append(run_dir)

    def ended(self, run_dir: Path, error: BaseException | None) -> None:
        self.code = 0 if error is None else _exit_code(error, self.config, run_dir)
        if self.code is None or self.task_cfg is None or not dist.world().main:
            return
        if self.code == EXIT_BAD_INPUT and self.single:
            _undo_start(run_dir, self.before)
        else:
            record_failure(run_dir, self.code, LAST_ERROR[0])


def _start(config, run_dir: Path, config_yaml: str, resume: bool | None, job: CliHooks) -> int:
    """Run one job through the engine; returns its exit status."""
    from cl_runner.core.errors import UserError
    from cl_runner.engine.run import run

    try:
        run(config, run_dir, config_yaml, base_dir=Path.cwd(), resume=resume, hooks=job)
    except BaseException as exc:
        if job.code is not None:  # the claimed run's end, mapped (and reported) by job.ended
            return job.code
        if isinstance(exc, UserError):  # refused before it was claimed: the directory is in use, or another run's
            return _report(str(exc), exc.exit_code)
        raise
    if job.code is None and dist.world().main:  # nothing to do (other ranks: rank 0 refused, and said why)
        print(f"cl-run: {run_dir} already finished; keeping its results")
    return job.code or 0


def _exit_code(exc: BaseException, config, run_dir: Path) -> int | None:
    """The exit status of a run that ``exc`` stopped, its one line printed; None for what must propagate (a stop
    outside the run's own handling; with debug=true an unexpected error, for its traceback)."""
    from cl_runner.core.errors import UserError
    from cl_runner.engine.runtime import RunInterrupted

    if isinstance(exc, RunInterrupted):
        saved = "checkpoint written" if exc.checkpointed else "no checkpoint yet (a resume starts from the beginning)"
        if dist.world().main:  # every rank stopped at the same step: one line for the job
            print(f"cl-run: {exc}; {saved}. Resume with: cl-run resume={exc.run_dir}", file=sys.stderr)
        return 128 + exc.signum
    if isinstance(exc, UserError) and getattr(exc, "agreed", False):  # every rank refused (engine/claim.py)
        CLAIMED.clear()  # the start is undone: a stop signal from the launcher now has nothing to resume
        LAST_ERROR[0] = " ".join(str(exc).split())
        return _report(str(exc), exc.exit_code) if dist.world().main else exc.exit_code  # rank 0 alone says why
    if isinstance(exc, UserError):
        return _report(str(exc), exc.exit_code)
    if isinstance(exc, FloatingPointError):
        return _report(f"{exc}; lower train.lr, or use bf16 instead of fp16", EXIT_DIVERGED)
    if isinstance(exc, torch_oom()):
        from cl_runner.engine.run import out_of_memory_line

        return _report(out_of_memory_line(config, exc), EXIT_OOM)
    if isinstance(exc, KeyboardInterrupt):
        return _report("interrupted at once (second Ctrl-C); resume from the last checkpoint with: "
                       f"cl-run resume={run_dir}", EXIT_INTERRUPTED)
    if not isinstance(exc, Exception) or config.debug or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return None
    return _report(f"{type(exc).__name__}: {exc} (run with debug=true for the traceback)", EXIT_FAILED)


def torch_oom() -> type[BaseException]:
    import torch

    return getattr(torch, "OutOfMemoryError", RuntimeError)


def _undo_start(run_dir: Path, before: set[str]) -> None:
    """A single run refused for bad input before it computed anything: remove what this start wrote, and the
    directories it created, so that the refused start leaves no trace."""
    if "metrics.json" not in before and (run_dir / "metrics.json").exists():
        return  # something was computed: keep it
    for name in set(os.listdir(run_dir)) - before:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    _remove_new_dirs()


def _remove_new_dirs() -> None:
    """The directories this single run's output path needed, where still empty."""
    for directory in NEW_DIRS:  # innermost first; one still in use by another start is not empty
        try:
            directory.rmdir()
        except OSError:
            break


def _task(cfg, config=None) -> float | None:
    """The Hydra task function: one job of a run or a sweep (``config``: a single run's, validated by preflight;
    a sweep job's is the one preflight validated for it, or, in a launcher's own process, validated here). In a
    sweep a failed job does not stop the rest."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    import cl_runner.engine.run  # noqa: F401 - the heavy imports (torch, transformers), before the directory is touched
    from cl_runner.config.schema import used_config
    from cl_runner.core.errors import UserError
    from cl_runner.engine.claim import read_metrics

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    _check_stop()
    try:
        config = config or PLANNED.pop(job_key(cfg), None) or checked(cfg)
        config_yaml = OmegaConf.to_yaml(used_config(cfg), resolve=True)
        job = CliHooks(config, cfg, single=not multirun, before=set(os.listdir(run_dir)))
        code = _start(config, run_dir, config_yaml, None, job)
    except UserError as exc:
        code = _report(str(exc), exc.exit_code)
    if code and multirun and code not in (EXIT_INTERRUPTED, 143):
        FAILURES.append(f"{run_dir}: exit {code}")
        return None
    if code:
        sys.exit(code)
    return read_metrics(run_dir).get("average_accuracy")  # for Hydra: sweepers such as Optuna maximise it


def _rank_log(run_dir: Path) -> None:
    """Point the job log of this rank (not 0) at ``logs/rank<r>.log`` in the run directory."""
    path = run_dir / "logs" / f"rank{dist.world().rank}.log"
    for handler in logging.getLogger().handlers:
        if isinstance(handler, RunLogFile):
            handler.close()
            path.parent.mkdir(exist_ok=True)
            handler.baseFilename = str(path)
            CLAIMED.append(path.parent)


def resume_run(path: str, other_overrides: list[str]) -> int:
    """``cl-run resume=PATH``: continue the run in PATH with the config saved there."""
    from omegaconf import OmegaConf

    from cl_runner.config.schema import Config
    from cl_runner.config.validate import register_configs
    from cl_runner.core.errors import UserError
    from cl_runner.engine import launch
    from cl_runner.engine.claim import neutral_overrides, run_is_finished

    if path.strip() in ("", "null", "None", "~"):
        return _report(f"resume: expected the path of a run directory, got {path.strip() or 'nothing'!r}",
                       EXIT_BAD_INPUT)
    run_dir = Path(path).expanduser().absolute()
    try:  # only options that cannot change a result (engine/claim.py's NEUTRAL_ON_RESUME)
        changes = neutral_overrides(other_overrides)
    except ValueError as exc:
        return _report(str(exc), EXIT_BAD_INPUT)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return _report(f"resume: {run_dir} is not a cl-run run directory (no config.yaml)", EXIT_BAD_INPUT)
    if run_is_finished(run_dir):
        print(f"cl-run: {run_dir} already finished; nothing to resume (results in {run_dir})")
        return 0
    if not os.access(run_dir, os.W_OK) or not run_dir.stat().st_mode & 0o222:
        return _report(f"resume: {run_dir} is read-only; make it writable (chmod u+w {run_dir}) to continue the run",
                       EXIT_BAD_INPUT)
    register_configs()
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(saved), changes)
        workers = launch.resume_processes(cfg, run_dir)  # a distributed run: resumed on cl-run's own workers
        config = checked(cfg)
        ended = launch.start([config], [f"resume={run_dir}", *other_overrides]) if workers else None
    except UserError as exc:
        return _report(str(exc) if str(exc).startswith("resume:") else f"resume: {saved}: {exc}", EXIT_BAD_INPUT)
    except Exception as exc:
        return _report(f"resume: {saved} is not a valid cl-run config ({one_line(exc)})", EXIT_BAD_INPUT)
    _check_stop()
    return ended if ended is not None else _start(config, run_dir, saved.read_text(), True, CliHooks(config))


def main(argv: list[str] | None = None) -> None:
    """``cl-run``. SIGINT/SIGTERM are handled from here on: one line and exit 130/143 at any moment."""
    from cl_runner.engine.threads import set_wait_policy

    set_wait_policy()  # OpenMP reads OMP_WAIT_POLICY once, when torch loads: idle threads sleep (threads.py)
    previous = {s: signal.signal(s, _stop_now) for s in (signal.SIGINT, signal.SIGTERM)}
    for found in (CLAIMED, NEW_DIRS, FAILURES, STOP_SIGNAL, PLANNED):  # main() may run more than once (tests)
        found.clear()
    LAST_ERROR[0] = ""
    try:
        ended = _main_until_exit(list(sys.argv[1:] if argv is None else argv))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    # the program itself (not a test calling main(argv)), when it succeeded or is a rank of a distributed run,
    # whose teardown can wait on (or abort over) its process group's threads
    if argv is None and (ended is None or dist.world().distributed):
        _exit_without_teardown(None if ended is None else ended.code)
    if ended is not None:
        raise ended


def _main_until_exit(argv: list[str]) -> SystemExit | None:
    """Run ``_main``; returns how it asked to exit (None: it finished). A stop signal becomes one line."""
    try:
        try:
            _main(argv)
        except BaseException:
            if not STOP_SIGNAL:
                raise
            _stopped(STOP_SIGNAL[0])
    except SystemExit as ended:
        return ended
    return None


def _exit_without_teardown(code: int | str | None = 0) -> None:
    """Exit with ``code`` now, without the interpreter's teardown: once torch and transformers are loaded it frees
    every module and object one by one (1 s and more), and nothing a finished run wrote depends on it; a rank of a
    distributed run can even hang or abort there, its process group's threads still waiting on the others. First,
    what the teardown would have done that matters: other threads finish, exit handlers run (logging flushes),
    output. ``code`` as ``sys.exit`` takes it (None: 0; a string: printed, then 1)."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
    code = code if isinstance(code, int) else (0 if code is None else 1)
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _help(overrides: list[str]) -> int:
    """``cl-run --help``: cl_runner/config/help.py's page (Hydra's own takes seconds; --hydra-help is still Hydra's)."""
    from cl_runner.config.help import help_text

    try:
        print(help_text(overrides))
    except Exception as exc:
        _fail(one_line(exc))
    return 0


def _main(argv: list[str]) -> None:
    from cl_runner.config.preflight import flag_error, search_path_args, with_overrides
    from cl_runner.core.errors import UserError
    from cl_runner.engine.launch import start as start_workers

    given = list(argv)  # the workers cl-run starts itself (distributed.nproc_per_node) get the same arguments
    try:  # --config-dir DIR, hydra.searchpath, ./cl-conf, $CL_RUNNER_CONFIG_PATH: one hydra.searchpath override
        argv, search = search_path_args(argv)
    except ValueError as exc:
        _fail(str(exc))
    plan_only = "--plan" in argv
    overrides, multirun, introspect = split_args([a for a in argv if a != "--plan"])
    resume = [o for o in overrides if o.split("=", 1)[0] == "resume"]
    if resume:  # the saved config is complete: config directories do not matter
        sys.exit(resume_run(resume[0].split("=", 1)[1], [o for o in argv if o != resume[0]]))
    overrides, argv = [*overrides, *search], with_overrides(argv, search)
    if "--help" in argv or "-h" in argv:
        sys.exit(_help(overrides))
    if introspect:  # --cfg job, --info, --hydra-help, ...: Hydra's own
        if flag_error(argv):
            _fail(flag_error(argv))
        _hydra_main(argv)
        return
    try:
        plan = preflight(overrides, multirun)  # glob() sweeps written out over the whole search path
        if plan_only:  # each job's memory plan, nothing loaded; a job that cannot fit: its one line, exit 2
            from cl_runner.engine.memory_plan import print_plans

            sys.exit(print_plans(plan.jobs))
        path = output_dir(plan.jobs[0].composed, multirun)
        ended = start_workers([job.config for job in plan.jobs], given)  # distributed.nproc_per_node=N
        if ended is None:
            _world(plan.jobs[0].config)  # under torchrun: the process group, before the ranks agree on the directory
    except (ValueError, UserError) as exc:
        _fail(str(exc))
    if ended is not None:  # the workers ran the job (and said why, if it failed)
        sys.exit(ended)
    if multirun:
        _sweep(plan, [a for a in argv if a.startswith("-")], _same_on_every_rank(path))
    else:
        _single(plan.jobs[0], plan.loader)


def _single(job, loader) -> None:
    """One run, on the config composed and validated once; its directory noted (a refused start removes the ones
    it created) and, when time-stamped, pinned (rank 0's under torchrun, and what .hydra/hydra.yaml says)."""
    from functools import partial

    from omegaconf import OmegaConf

    from cl_runner.config.hydra_job import pin, run_single_job

    composed = job.composed
    if "${now:" in OmegaConf.to_container(composed.hydra.run, resolve=False)["dir"]:
        pin(composed, "hydra.run.dir", str(_same_on_every_rank(str(OmegaConf.select(composed, "hydra.run.dir")))))
    path = Path(str(OmegaConf.select(composed, "hydra.run.dir"))).absolute()
    NEW_DIRS[:] = [p for p in [path, *path.parents] if not p.exists()]
    run_single_job(composed, loader, partial(_task, config=job.config))


def _sweep(plan, flags: list[str], path: Path) -> None:
    """A sweep through Hydra's sweeper and launcher, on the jobs preflight checked (``PLANNED``), into ``path``."""
    PLANNED.update({job.key: job.config for job in plan.jobs})
    _hydra_main([*flags, *plan.overrides, f"hydra.sweep.dir={path}"])
    if FAILURES:
        print(f"cl-run: {len(FAILURES)} job(s) of the sweep failed: {'; '.join(FAILURES)}", file=sys.stderr)
        sys.exit(EXIT_FAILED)


def _hydra_main(argv: list[str]) -> None:
    """Hydra's own command line (``hydra.main``) on ``argv``, with ``_task`` as the task function."""
    import hydra

    from cl_runner.config.validate import register_configs

    register_configs()
    sys.argv = [sys.argv[0], *argv]
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
