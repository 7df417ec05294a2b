"""``cl-run``: compose the Hydra config, validate every job of a (multi)run up front, call run(), map errors
to exit codes (0 ok, 1 failed run, 2 bad input, 130 interrupted)."""

from __future__ import annotations

import itertools
import os
import re
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


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
            return f"{name}: unknown key (see the README's configuration reference)"
        return f"{first}: {detail}"
    if "Could not override" in text:
        key = re.search(r"Could not override '([^']+)'", text)
        return f"{key.group(1) if key else first}: unknown key (see the README's configuration reference)"
    return first


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
        parsed = parser.parse_overrides([o for o in overrides if not o.lstrip("+~").startswith("hydra")])
    except Exception as exc:
        raise ValueError(one_line(exc)) from None
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
                raise ValueError(one_line(exc)) from None
            validate(cfg)
            jobs += 1
    return jobs


def _task(cfg) -> None:
    """The Hydra task function: one job of a run or a sweep."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from cl_runner.errors import UserError
    from cl_runner.run import run
    from cl_runner.schema import validate

    try:
        config = validate(cfg)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        run(config, run_dir, OmegaConf.to_yaml(cfg, resolve=True), base_dir=Path.cwd())
    except UserError as exc:
        _fail(str(exc), exc.exit_code)
    except FloatingPointError as exc:
        _fail(f"{exc}; lower train.lr or check the data", EXIT_FAILED)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED)
    except Exception as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _fail(f"{type(exc).__name__}: {exc} (set HYDRA_FULL_ERROR=1 for the traceback)", EXIT_FAILED)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, _, introspect = _split_args(argv)
    if not introspect:
        from cl_runner.errors import UserError

        try:
            preflight(overrides)
        except (ValueError, UserError) as exc:
            _fail(str(exc))
    import hydra

    from cl_runner.schema import register_configs

    register_configs()
    sys.argv = [sys.argv[0], *argv]
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
