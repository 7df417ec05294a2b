"""``cl-run``: compose the Hydra config, validate every job of a (multi)run up front, call run(), map errors
to exit codes: 0 ok, 1 failed (unexpected error; in a sweep: some job failed), 2 bad input (config, data,
model, paths), 3 training diverged (non-finite loss), 4 CUDA out of memory, 5 disk full, 130 / 143 stopped by SIGINT /
SIGTERM (handled from the first line of ``main``: inside the task loop after writing a checkpoint, before it at once).

Nothing is written into a run directory until the run is known to proceed: the config is validated, the directory
locked and its saved config compared first; only then are Hydra's ``.hydra/*.yaml`` and the job log written."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import sys
from pathlib import Path

from cl_runner.config.preflight import CONF_DIR, checked, one_line, preflight, split_args
from cl_runner.core import dist

EXIT_BAD_INPUT, EXIT_FAILED, EXIT_DIVERGED, EXIT_OOM, EXIT_INTERRUPTED = 2, 1, 3, 4, 130
CLAIMED: list[Path] = []  # run directories this process has locked and writes into
NEW_DIRS: list[Path] = []  # directories a single run's output path needed that did not exist before cl-run


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
    """One line and exit: a bad input, found before anything runs. Under torchrun every rank finds the same
    error, and only the first rank of each node prints it."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"cl-run: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(code)


def _plan_output(overrides: list[str], multirun: bool) -> list[str]:
    """Fail before any model is loaded when the run (or sweep) directory cannot be created. For a single run,
    note the directories cl-run will create (a refused start removes them again) and pin a time-stamped run
    directory, so that Hydra uses the very path checked here; returns the override that pins it."""
    import tempfile

    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    plain = [o.input_line for o in OverridesParser.create().parse_overrides(
        [o for o in overrides if "glob(" not in o]) if not o.is_sweep_override()]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=plain, return_hydra_config=True)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    path = Path(str(OmegaConf.select(cfg, key))).absolute()
    existing = next(p for p in [path, *path.parents] if p.exists())
    try:
        if not existing.is_dir():
            raise OSError(f"{existing} is not a directory")
        Path(tempfile.mkdtemp(dir=existing, prefix=".cl-run-probe-")).rmdir()
    except OSError as exc:
        raise ValueError(f"{key}: cannot write to {path} ({exc})") from None
    if multirun:
        return _same_output(cfg, [f"hydra.sweep.dir={path}"])
    NEW_DIRS[:] = [p for p in [path, *path.parents] if not p.exists()]
    raw, pinned = OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"], str(OmegaConf.select(cfg, key))
    if "${now:" in raw and re.fullmatch(r"[\w./-]+", pinned):
        return _same_output(cfg, [f"hydra.run.dir={pinned}"])
    return _same_output(cfg, [])


def _same_output(cfg, pins: list[str]) -> list[str]:
    """Under torchrun every rank takes rank 0's time-stamped directory (ranks start at slightly different
    times); in one process, ``pins`` as they are."""
    return dist.broadcast_object(pins) if _join(cfg).distributed else pins


def _join(cfg) -> dist.World:
    """Join the run's process group when ``distributed.kind`` asks for one (once per process; torchrun, srun or
    a Slurm launcher job with several tasks), before the run directory is claimed."""
    if cfg.distributed.kind == "none":
        return dist.world()
    import torch

    use_cuda = cfg.device.type == "cuda" or (cfg.device.type == "auto" and torch.cuda.is_available())
    return dist.join(cfg.distributed.kind, use_cuda, cfg.distributed.timeout_s)


FAILURES: list[str] = []  # jobs of this process's sweep that failed (a sweep goes on past them)


def _execute(config, run_dir: Path, config_yaml: str, resume: bool) -> int:
    """Run one job and map its outcome to an exit status (printing one line for every failure)."""
    from cl_runner.core.errors import UserError
    from cl_runner.engine.run import run
    from cl_runner.engine.runtime import RunInterrupted

    try:
        run(config, run_dir, config_yaml, base_dir=Path.cwd(), resume=resume)
        return 0
    except RunInterrupted as exc:
        saved = "checkpoint written" if exc.checkpointed else "no checkpoint yet (a resume starts from the beginning)"
        print(f"cl-run: {exc}; {saved}. Resume with: cl-run resume={exc.run_dir}", file=sys.stderr)
        return 128 + exc.signum
    except UserError as exc:
        return _report(str(exc), exc.exit_code)
    except FloatingPointError as exc:
        return _report(f"{exc}; lower train.lr, or use bf16 instead of fp16", EXIT_DIVERGED)
    except torch_oom() as exc:  # noqa: B030 - the class is resolved at call time
        t = config.train
        return _report(f"CUDA out of memory training {config.model.name_or_path or 'the model'} with "
                       f"batch_size={t.batch_size} (grad_accum={t.grad_accum}) and max_length={t.max_length}: "
                       f"raise train.grad_accum (same batch, less memory) or lower train.eval_batch_size "
                       f"({str(exc).splitlines()[0][:80]})", EXIT_OOM)
    except KeyboardInterrupt:
        return _report("interrupted at once (second Ctrl-C); resume from the last checkpoint with: "
                       f"cl-run resume={run_dir}", EXIT_INTERRUPTED)
    except Exception as exc:
        if config.debug or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        return _report(f"{type(exc).__name__}: {exc} (run with debug=true for the traceback)", EXIT_FAILED)


def torch_oom() -> type[BaseException]:
    import torch

    return getattr(torch, "OutOfMemoryError", RuntimeError)


def _report(message: str, code: int) -> int:
    rank = "" if dist.world().main else f"[rank {dist.world().rank}] "
    print(f"cl-run: {rank}error: {' '.join(message.split())}", file=sys.stderr)
    LAST_ERROR[0] = " ".join(message.split())
    return code


LAST_ERROR = [""]  # the last one-line error, for the failed job's metrics.json


def _record_failure(run_dir: Path, code: int, message: str) -> None:
    """A job that failed before its run wrote anything still leaves a metrics.json saying why (for cl-report)."""
    import json

    from cl_runner.core.errors import UserError
    from cl_runner.core.files import write_atomic

    metrics = run_dir / "metrics.json"
    if code and code not in (EXIT_INTERRUPTED, 143) and run_dir.is_dir() and not metrics.exists():
        try:
            write_atomic(metrics, json.dumps({"status": "failed", "exit_code": code, "error": message}, indent=2)
                         + "\n")
        except (UserError, OSError):  # a full disk: the one-line error already said why
            pass


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


def _objective(run_dir: Path) -> float | None:
    """The job's average accuracy, returned to Hydra (sweepers such as Optuna maximise it)."""
    import json

    try:
        return json.loads((run_dir / "metrics.json").read_text()).get("average_accuracy")
    except (OSError, ValueError):
        return None


def _task(cfg) -> float | None:
    """The Hydra task function: one job of a run or a sweep. In a sweep a failed job does not stop the rest."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    import cl_runner.engine.run  # noqa: F401 - the heavy imports (torch, transformers), before the directory is touched
    from cl_runner.core.errors import UserError

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    _check_stop()
    try:
        code = _claim_and_run(cfg, checked(cfg), run_dir, multirun)
    except UserError as exc:
        code = _report(str(exc), exc.exit_code)
    if code and multirun and code not in (EXIT_INTERRUPTED, 143):
        FAILURES.append(f"{run_dir}: exit {code}")
        return None
    if code:
        sys.exit(code)
    return _objective(run_dir)


def _claim_and_run(cfg, config, run_dir: Path, multirun: bool) -> int:
    """Lock the job's directory and compare its saved config (a refusal raises UserError having written nothing),
    then write Hydra's files and run the job; a single run refused for bad input is undone."""
    from omegaconf import OmegaConf

    from cl_runner.config.schema import used_config
    from cl_runner.engine.run import run_is_finished
    from cl_runner.engine.runtime import run_lock

    config_yaml = OmegaConf.to_yaml(used_config(cfg), resolve=True)
    if not _join(config).main:
        return _follow_rank0(config, run_dir, config_yaml)
    before, told = set(os.listdir(run_dir)), False
    try:
        with run_lock(run_dir):  # refused when in use
            resume = _existing_run(run_dir, config_yaml)  # refused when it holds another experiment
            if resume and run_is_finished(run_dir):
                print(f"cl-run: {run_dir} already finished; keeping its results")
                return 0
            _write_hydra_files(cfg, run_dir, resume)
            CLAIMED.append(run_dir)
            told = _tell_ranks({"resume": resume})
            code = _execute(config, run_dir, config_yaml, resume)
            if code == EXIT_BAD_INPUT and not multirun:
                _undo_start(run_dir, before)
            else:
                _record_failure(run_dir, code, LAST_ERROR[0])
    finally:
        if not told:
            _tell_ranks({})
    return code


def _tell_ranks(told: dict) -> bool:
    """Rank 0's claim of the run directory, for the other ranks (``{"resume": bool}`` to go on, ``{}`` when rank 0
    refused or found the run finished): they wait for it before loading anything."""
    if dist.world().distributed:
        dist.broadcast_object(told)
    return True


def _follow_rank0(config, run_dir: Path, config_yaml: str) -> int:
    """A rank other than 0: run the job rank 0 claimed (it holds the lock and writes the files); its log lines
    go to ``<run_dir>/logs/rank<r>.log``."""
    told = dist.broadcast_object(None)
    if "resume" not in told:
        return 0  # rank 0 refused (and said why) or found the run finished
    _rank_log(run_dir)
    CLAIMED.append(run_dir)
    return _execute(config, run_dir, config_yaml, told["resume"])


def _rank_log(run_dir: Path) -> None:
    """Point the job log of this rank (not 0) at ``logs/rank<r>.log`` in the run directory."""
    path = run_dir / "logs" / f"rank{dist.world().rank}.log"
    for handler in logging.getLogger().handlers:
        if isinstance(handler, RunLogFile):
            handler.close()
            path.parent.mkdir(exist_ok=True)
            handler.baseFilename = str(path)
            CLAIMED.append(path.parent)


def _existing_run(run_dir: Path, config_yaml: str) -> bool:
    """True when ``run_dir`` already holds this experiment (a re-run sweep resumes it); a different one is an error."""
    from cl_runner.core.errors import UserError

    saved = run_dir / "config.yaml"
    if not saved.exists():
        return False
    if saved.read_text() != config_yaml:
        raise UserError(f"{run_dir} already holds a different experiment (its config.yaml differs); "
                        "choose another hydra.run.dir / hydra.sweep.dir")
    return True


def _write_hydra_files(task_cfg, run_dir: Path, resume: bool) -> None:
    """Hydra's ``.hydra/{config,hydra,overrides}.yaml``, as Hydra writes them, once the run is known to proceed
    (conf/hydra/default.yaml sets ``hydra.output_subdir: null`` so that Hydra does not write them before). A
    continued run keeps those of its first start."""
    import copy

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, read_write

    from cl_runner.core.files import write_atomic

    out = run_dir / ".hydra"
    if resume and (out / "overrides.yaml").exists():
        return
    hydra_cfg = copy.deepcopy(HydraConfig.instance().cfg)
    with read_write(hydra_cfg.hydra):
        hydra_cfg.hydra.output_subdir = ".hydra"  # where they are, as in a plain Hydra run
    for name, node in (("config.yaml", task_cfg), ("hydra.yaml", hydra_cfg),
                       ("overrides.yaml", hydra_cfg.hydra.overrides.task)):
        write_atomic(out / name, OmegaConf.to_yaml(node))


def resume_run(path: str, other_overrides: list[str]) -> int:
    """``cl-run resume=PATH``: continue the run in PATH with the config saved there."""
    from omegaconf import OmegaConf

    from cl_runner.config.schema import Config, register_configs
    from cl_runner.core.errors import UserError
    from cl_runner.engine.run import run_is_finished

    if path.strip() in ("", "null", "None", "~"):
        return _report(f"resume: expected the path of a run directory, got {path.strip() or 'nothing'!r}",
                       EXIT_BAD_INPUT)
    run_dir = Path(path).expanduser().absolute()
    if other_overrides:
        return _report(f"resume: cannot be combined with overrides ({' '.join(other_overrides)}); the run continues "
                       f"with the config saved in {run_dir}", EXIT_BAD_INPUT)
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
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(saved))
        config = checked(cfg)
    except UserError as exc:
        return _report(f"resume: {run_dir / 'config.yaml'}: {exc}", EXIT_BAD_INPUT)
    except Exception as exc:
        return _report(f"resume: {saved} is not a valid cl-run config ({one_line(exc)})", EXIT_BAD_INPUT)
    _check_stop()
    CLAIMED.append(run_dir)
    return _execute(config, run_dir, saved.read_text(), resume=True)


def main(argv: list[str] | None = None) -> None:
    """``cl-run``. SIGINT/SIGTERM are handled from here on: one line and exit 130/143 at any moment."""
    from cl_runner.engine.threads import set_wait_policy

    set_wait_policy()  # OpenMP reads OMP_WAIT_POLICY once, when torch loads: idle threads sleep (threads.py)
    previous = {s: signal.signal(s, _stop_now) for s in (signal.SIGINT, signal.SIGTERM)}
    for found in (CLAIMED, NEW_DIRS, FAILURES, STOP_SIGNAL):  # main() may run more than once in a process (tests)
        found.clear()
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
    from cl_runner.config.preflight import search_path_args, with_overrides

    try:  # --config-dir DIR, hydra.searchpath, ./cl-conf, $CL_RUNNER_CONFIG_PATH: one hydra.searchpath override
        argv, search = search_path_args(argv)
    except ValueError as exc:
        _fail(str(exc))
    overrides, multirun, introspect = split_args(argv)
    resume = [o for o in overrides if o.split("=", 1)[0] == "resume"]
    if resume:  # the saved config is complete: config directories do not matter
        sys.exit(resume_run(resume[0].split("=", 1)[1], [o for o in argv if o != resume[0]]))
    overrides, argv = [*overrides, *search], with_overrides(argv, search)
    if "--help" in argv or "-h" in argv:
        sys.exit(_help(overrides))
    if not introspect:
        from cl_runner.core.errors import UserError

        try:
            overrides = preflight(overrides, multirun)  # glob() sweeps written out over the whole search path
            argv = [*(a for a in argv if a.startswith("-")), *overrides, *_plan_output(overrides, multirun)]
        except (ValueError, UserError) as exc:
            _fail(str(exc))
    import hydra

    from cl_runner.config.schema import register_configs

    register_configs()
    sys.argv = [sys.argv[0], *argv]
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task)()
    if FAILURES:
        print(f"cl-run: {len(FAILURES)} job(s) of the sweep failed: {'; '.join(FAILURES)}", file=sys.stderr)
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
