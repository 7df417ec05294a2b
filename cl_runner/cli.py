"""``cl-run``: compose the Hydra config, validate every job of a (multi)run up front, call run(), map errors
to exit codes: 0 ok, 1 failed (unexpected error; in a sweep: some job failed), 2 bad input (config, data,
model, paths), 3 training diverged (non-finite loss), 4 CUDA out of memory, 130 / 143 stopped by SIGINT /
SIGTERM after writing a checkpoint."""

from __future__ import annotations

import itertools
import os
import re
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
EXIT_BAD_INPUT, EXIT_FAILED, EXIT_DIVERGED, EXIT_OOM, EXIT_INTERRUPTED = 2, 1, 3, 4, 130


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    print(f"cl-run: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(code)


def one_line(exc: BaseException) -> str:
    """A Hydra/OmegaConf composition error as one readable line."""
    from hydra.errors import MissingConfigException

    text = str(exc)
    if isinstance(exc, MissingConfigException):
        found = re.search(r"Could not find '([^']+)'", text)
        options = re.search(r"Available options in '([^']+)':\n((?:\t.*\n?)+)", text)
        if found and options:
            group, choices = options.group(1), [c.strip() for c in options.group(2).splitlines() if c.strip()]
            value = found.group(1).split("/")[-1]
            return f"{group}={value}: unknown option; expected one of {', '.join(choices)}"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    cause = exc.__cause__
    if cause is not None:
        detail = str(cause).strip().splitlines()[0]
        full = re.search(r"full_key: (\S+)", str(cause))
        if full and "could not be converted" in detail:
            value = re.search(r"Value '([^']*)'", detail)
            kind = detail.rsplit(" ", 1)[-1].lower()
            return f"{full.group(1)}: expected {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {value.group(1)!r}"
        if full and "not in struct" not in str(cause) and "Key '" not in str(cause):
            return f"{full.group(1)}: {detail}"
        if "not in struct" in str(cause) or "Key '" in str(cause):
            key = re.search(r"Key '([^']+)'", str(cause))
            full = re.search(r"full_key: (\S+)", str(cause))
            name = full.group(1) if full else key.group(1) if key else "?"
            return f"{name}: unknown key (see docs/configuration.md)"
        return f"{first}: {detail}"
    if "Could not override" in text:
        key = re.search(r"Could not override '([^']+)'", text)
        return f"{key.group(1) if key else first}: unknown key (see docs/configuration.md)"
    return first


def _catalogue_hint(message: str, overrides: tuple[str, ...]) -> str:
    """``tasks.tasks.N.key=`` cannot reach a sequence whose list comes from the task catalogue: say what can."""
    by_index = [o.split("=", 1)[0] for o in overrides if o.startswith("tasks.tasks.")]
    if not (by_index and message.startswith("tasks.[")):
        return message
    return (f"{by_index[0]}: this sequence's tasks come from conf/tasks/catalogue and cannot be changed by position; "
            "change one by name: tasks.catalogue.<task>.<key>=... (e.g. tasks.catalogue.dbpedia.max_eval_examples=16)")


def _split_args(argv: list[str]) -> tuple[list[str], bool, bool]:
    """(overrides, multirun, introspection): introspection flags (--cfg, --help, ...) skip the preflight."""
    overrides, multirun, introspect = [], False, False
    for arg in argv:
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg.startswith("-"):
            introspect = True
        else:
            overrides.append(arg)
    return overrides, multirun, introspect


def preflight(overrides: list[str]) -> int:
    """Compose and validate the config of every job the overrides describe; raise on the first bad one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from cl_runner.schema import register_configs, validate

    register_configs()
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)  # grammar errors of every override, hydra.* included
    except Exception as exc:
        raise ValueError(one_line(exc)) from None
    parsed = [o for o in parsed if not o.get_key_element().lstrip("+~").startswith("hydra")]
    choices = []
    for override in parsed:
        if override.is_sweep_override():
            values = list(override.sweep_string_iterator())
            prefix = override.get_key_element()
            choices.append([f"{prefix}={v}" for v in values])
        else:
            choices.append([override.input_line])
    jobs = 0
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for combo in itertools.product(*choices):
            try:
                cfg = compose("config", overrides=list(combo))
            except Exception as exc:
                raise ValueError(_catalogue_hint(one_line(exc), combo)) from None
            validate(cfg)
            jobs += 1
    return jobs


def _check_writable(overrides: list[str], multirun: bool) -> None:
    """Fail before any model is loaded when the run (or sweep) directory cannot be created."""
    import tempfile

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[o for o in overrides if "," not in o], return_hydra_config=True)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    path = Path(str(OmegaConf.select(cfg, key))).absolute()
    existing = next(p for p in [path, *path.parents] if p.exists())
    try:
        if not existing.is_dir():
            raise OSError(f"{existing} is not a directory")
        Path(tempfile.mkdtemp(dir=existing, prefix=".cl-run-probe-")).rmdir()
    except OSError as exc:
        raise ValueError(f"{key}: cannot write to {path} ({exc})") from None


FAILURES: list[str] = []  # jobs of this process's sweep that failed (a sweep goes on past them)


def _execute(config, run_dir: Path, config_yaml: str, resume: bool) -> int:
    """Run one job and map its outcome to an exit status (printing one line for every failure)."""
    from cl_runner.errors import UserError
    from cl_runner.run import run
    from cl_runner.runtime import RunInterrupted

    try:
        run(config, run_dir, config_yaml, base_dir=Path.cwd(), resume=resume)
        return 0
    except RunInterrupted as exc:
        print(f"cl-run: {exc}; checkpoint written. Resume with: cl-run resume={exc.run_dir}", file=sys.stderr)
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
    print(f"cl-run: error: {' '.join(message.split())}", file=sys.stderr)
    LAST_ERROR[0] = " ".join(message.split())
    return code


LAST_ERROR = [""]  # the last one-line error, for the failed job's metrics.json


def _record_failure(run_dir: Path, code: int, message: str) -> None:
    """A job that failed before its run wrote anything still leaves a metrics.json saying why (for cl-report)."""
    import json

    from cl_runner.results import write_atomic

    metrics = run_dir / "metrics.json"
    if code and code not in (EXIT_INTERRUPTED, 143) and run_dir.is_dir() and not metrics.exists():
        write_atomic(metrics, json.dumps({"status": "failed", "exit_code": code, "error": message}, indent=2) + "\n")


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
    from omegaconf import OmegaConf

    from cl_runner.errors import UserError
    from cl_runner.run import run_is_finished
    from cl_runner.schema import validate

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    try:
        config = validate(cfg)
        resume = _existing_run(run_dir, config_yaml)
    except UserError as exc:
        code = _report(str(exc), exc.exit_code)
        _record_failure(run_dir, code, str(exc))
    else:
        if resume and run_is_finished(run_dir):
            print(f"cl-run: {run_dir} already finished; keeping its results")
            return _objective(run_dir)
        code = _execute(config, run_dir, config_yaml, resume)
        _record_failure(run_dir, code, LAST_ERROR[0])
    if code and multirun and code not in (EXIT_INTERRUPTED, 143):
        FAILURES.append(f"{run_dir}: exit {code}")
        return None
    if code:
        sys.exit(code)
    return _objective(run_dir)


def _existing_run(run_dir: Path, config_yaml: str) -> bool:
    """True when ``run_dir`` already holds this experiment (a re-run sweep resumes it); a different one is an error."""
    from cl_runner.errors import UserError

    saved = run_dir / "config.yaml"
    if not saved.exists():
        return False
    if saved.read_text() != config_yaml:
        raise UserError(f"{run_dir} already holds a different experiment (its config.yaml differs); "
                        "choose another hydra.run.dir / hydra.sweep.dir")
    return True


def resume_run(path: str, other_overrides: list[str]) -> int:
    """``cl-run resume=PATH``: continue the run in PATH with the config saved there."""
    import logging

    from omegaconf import OmegaConf

    from cl_runner.errors import UserError
    from cl_runner.run import run_is_finished
    from cl_runner.schema import Config, register_configs, validate

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
    register_configs()
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(saved))
        config = validate(cfg)
    except UserError as exc:
        return _report(f"resume: {run_dir / 'config.yaml'}: {exc}", EXIT_BAD_INPUT)
    except Exception as exc:
        return _report(f"resume: {saved} is not a valid cl-run config ({one_line(exc)})", EXIT_BAD_INPUT)
    return _execute(config, run_dir, saved.read_text(), resume=True)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, multirun, introspect = _split_args(argv)
    resume = [o for o in overrides if o.startswith("resume=")]
    if resume:
        sys.exit(resume_run(resume[0].split("=", 1)[1], [o for o in argv if o != resume[0]]))
    if not introspect:
        from cl_runner.errors import UserError

        try:
            preflight(overrides)
            _check_writable(overrides, multirun)
        except (ValueError, UserError) as exc:
            _fail(str(exc))
    import hydra

    from cl_runner.schema import register_configs

    register_configs()
    sys.argv = [sys.argv[0], *argv]
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task)()
    if FAILURES:
        print(f"cl-run: {len(FAILURES)} job(s) of the sweep failed: {'; '.join(FAILURES)}", file=sys.stderr)
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
