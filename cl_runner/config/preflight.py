"""Before anything runs: parse the overrides, compose and validate the config of every job they describe (once:
cl-run runs a single job on the very config composed here), check that the run's directory can be created, and
turn Hydra's and OmegaConf's composition errors into one readable line each (``key: what was expected``)."""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
JOB_NAME = "cli"  # hydra.job.name, as hydra.main names a job after the task function's file: the log is cli.log


def option_key(full_key: str) -> str:
    """OmegaConf's ``tasks.tasks[0].name`` as the override key a user types: ``tasks.tasks.0.name``."""
    return re.sub(r"\[(\w+)\]", r".\1", full_key)


KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _null_value(cause: BaseException, prefix: str) -> str | None:
    """``key=null`` for a key that may not be null: name the key and what it expects."""
    import typing

    text = str(cause)
    if "is not Optional" not in text and "Incompatible value 'None'" not in text:
        return None
    key, owner = getattr(cause, "key", None), getattr(cause, "object_type", None)
    try:
        kind = typing.get_type_hints(owner)[key]
    except Exception:
        kind = None
    expected = KINDS.get(kind, "a value")
    full = option_key(str(getattr(cause, "full_key", None) or key))
    name = full if "." in full or not prefix or full == prefix else f"{prefix}: {full}"
    return f"{name}: expected {expected}, got null"


def _unknown_option(text: str) -> str | None:
    """Hydra's MissingConfigException text as ``group=value: unknown option; expected one of ...``."""
    found = re.search(r"Could not find '([^']+)'", text)
    options = re.search(r"Available options in '([^']+)':\n((?:\t.*\n?)+)", text)
    if not (found and options):
        return None
    group, choices = options.group(1), [c.strip() for c in options.group(2).splitlines() if c.strip()]
    return f"{group}={found.group(1).split('/')[-1]}: unknown option; expected one of {', '.join(choices)}"


def one_line(exc: BaseException) -> str:
    """A Hydra/OmegaConf composition error as one readable line."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import MissingMandatoryValue

    text = str(exc)
    if isinstance(exc, MissingMandatoryValue):
        return (f"{option_key(str(exc.full_key))}: required, and not set "
                "(e.g. every task and task sequence needs a name)")
    if isinstance(exc, MissingConfigException) and _unknown_option(text):
        return _unknown_option(text)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    in_file = re.match(r"In '([^']+)': \w+ raised while composing config", text)
    if in_file and exc.__context__ is not None:  # a bad value in a config file: Hydra keeps the detail as context
        context = exc.__context__
        key = option_key(str(getattr(context, "full_key", None) or getattr(context, "key", None) or "?"))
        detail = str(context).strip().splitlines()[0]
        value = re.search(r"Value '([^']*)' of type '\w+' could not be converted to (\w+)", detail)
        if value:
            kind = value.group(2).lower()
            detail = f"expected {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {value.group(1)!r}"
        return f"{in_file.group(1)}.yaml: {_null_value(context, '') or f'{key}: {detail}'}"
    cause = exc.__cause__
    if cause is not None:
        override = re.search(r"Error merging override ([^=\s]+)=", text)
        null = _null_value(cause, override.group(1) if override else "")
        if null:
            return null
        detail = str(cause).strip().splitlines()[0]
        full = re.search(r"full_key: (\S+)", str(cause))
        if full and "could not be converted" in detail:
            value = re.search(r"Value '([^']*)'", detail)
            kind = detail.rsplit(" ", 1)[-1].lower()
            return f"{full.group(1)}: expected {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {value.group(1)!r}"
        if full and "not in struct" not in str(cause) and "Key '" not in str(cause):
            return f"{full.group(1)}: {detail}"
        if "not in struct" in str(cause) or "Key '" in str(cause):
            from cl_runner.config.validate import unknown_key

            key = re.search(r"Key '([^']+)'", str(cause))
            full = re.search(r"full_key: (\S+)", str(cause))
            name = full.group(1) if full else key.group(1) if key else "?"
            return unknown_key(option_key(name), getattr(cause, "object_type", None))
        return f"{first}: {detail}"
    if "Could not override" in text:
        key = re.search(r"Could not override '([^']+)'", text)
        return f"{key.group(1) if key else first}: unknown key (see docs/configuration.md)"
    return first


def checked(cfg):
    """validate.validate, with OmegaConf's errors on the way (a missing name, a null) as one-line ConfigErrors."""
    from omegaconf.errors import OmegaConfBaseException

    from cl_runner.config.validate import validate
    from cl_runner.core.errors import ConfigError

    try:
        return validate(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(one_line(exc)) from None


def _catalogue_hint(message: str, overrides: tuple[str, ...]) -> str:
    """``tasks.tasks.N.key=`` cannot reach a sequence whose list comes from the task catalogue: say what can."""
    by_index = [o.split("=", 1)[0] for o in overrides if o.startswith("tasks.tasks.")]
    if not (by_index and message.startswith("tasks.[")):
        return message
    return (f"{by_index[0]}: this sequence's tasks come from conf/tasks/catalogue and cannot be changed by position; "
            "change one by name: tasks.catalogue.<task>.<key>=... (e.g. tasks.catalogue.dbpedia.max_eval_examples=16)")


# ------------------------------------------------------------------------- the user's config directories
SEARCHPATH = "hydra.searchpath"
ENV_VAR = "CL_RUNNER_CONFIG_PATH"  # os.pathsep-separated config directories
LOCAL_DIR = "cl-conf"  # a config directory in the directory cl-run is started from, used when it exists


def search_path_args(argv: list[str], cwd: Path | None = None, env: dict | None = None) -> tuple[list[str], list[str]]:
    """``argv`` without ``--config-dir DIR`` (``-cd DIR``, ``--config-dir=DIR``) and ``hydra.searchpath=[...]``,
    and the one ``hydra.searchpath`` override that replaces them (``[]`` when there is no user directory): those
    directories, then ``./cl-conf`` and ``$CL_RUNNER_CONFIG_PATH``'s, in that order (the first that has a name wins).
    cl-run's own conf/ stays Hydra's primary directory, searched before them all; a user file with a built-in's
    name is refused (Hydra would use the built-in). Every composition (preflight, output plan, --help, the run)
    gets the same override, so a user's configs are checked as the built-in ones are."""
    cwd, env = Path(cwd or Path.cwd()), os.environ if env is None else env
    rest, given = _take_search_args(argv)
    local = cwd / LOCAL_DIR
    given += [("./" + LOCAL_DIR, str(local))] if local.exists() else []
    given += [(ENV_VAR, d) for d in env.get(ENV_VAR, "").split(os.pathsep) if d.strip()]
    builtin = f"file://{CONF_DIR.resolve()}"  # named again (e.g. copied from a Hydra example): already searched
    entries = [e for e in dict.fromkeys(_entry(key, text, cwd) for key, text in given) if e != builtin]
    if not entries:
        return rest, []
    return rest, [f"{SEARCHPATH}=[{','.join(_quoted(e) for e in entries)}]"]


def with_overrides(argv: list[str], extra: list[str]) -> list[str]:
    """``argv`` with ``extra`` overrides placed beside the others: Hydra's parser takes them as one group (after
    ``--cfg job``, say, a lone override is an unrecognized argument)."""
    at = next((i for i, a in enumerate(argv) if "=" in a and not a.startswith("-")), len(argv))
    return [*argv[:at], *extra, *argv[at:]]


def _take_search_args(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(the other arguments, [(where it came from, directory or search path entry), ...]): the --config-dir
    directories, then the hydra.searchpath entries, each in the order given."""
    rest, dirs, entries, args = [], [], [], iter(argv)
    for arg in args:
        if arg in ("--config-dir", "-cd"):
            value = next(args, None)
            if value is None or value.startswith("-") or "=" in value:
                raise ValueError(f"{arg}: expected a directory after it (cl-run {arg} DIR ...)")
            dirs.append((arg, value))
        elif arg.startswith("--config-dir="):
            dirs.append(("--config-dir", arg.split("=", 1)[1]))
        elif arg.split("=", 1)[0] == SEARCHPATH:
            entries += [(SEARCHPATH, entry) for entry in _searchpath_value(arg)]
        else:
            rest.append(arg)
    return rest, dirs + entries


def _searchpath_value(arg: str) -> list[str]:
    """The entries of a ``hydra.searchpath=[...]`` override, parsed by Hydra's own override parser."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        value = OverridesParser.create().parse_override(arg).value()
    except Exception as exc:
        raise ValueError(f"{SEARCHPATH}: {one_line(exc)}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{SEARCHPATH}: expected a list of directories, e.g. {SEARCHPATH}=[file:///path/to/conf]"
                         f" or [pkg://package.conf], got {arg.split('=', 1)[1]}")
    return value


def _entry(key: str, text: str, cwd: Path) -> str:
    """A search path entry: ``pkg://`` kept (the package must be importable), a directory as an absolute
    ``file://`` one; a missing directory, or a file that a built-in of the same name would hide, is refused."""
    import importlib.util

    scheme, _, rest = text.partition("://") if "://" in text else ("file", "", text)
    if scheme == "pkg":
        try:
            found = importlib.util.find_spec(rest)
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise ValueError(f"{key}: package not found: {rest} (in {text})")
        return text
    if scheme != "file":
        raise ValueError(f"{key}: expected a directory, file://DIR or pkg://PACKAGE, got {text}")
    path = Path(rest).expanduser()
    path = (path if path.is_absolute() else cwd / path).resolve()
    if not path.is_dir():
        raise ValueError(f"{key}: {'not a directory' if path.exists() else 'directory not found'}: {path}")
    if path != CONF_DIR.resolve():
        _check_no_builtin_names(path)
    return f"file://{path}"


def _check_no_builtin_names(directory: Path) -> None:
    """Hydra looks a name up in cl-run's conf/ first: a user file with a built-in's name would be ignored."""
    for builtin in sorted(CONF_DIR.rglob("*.yaml")):
        name = builtin.relative_to(CONF_DIR)
        if not (directory / name).exists():
            continue
        if name == Path("config.yaml"):
            raise ValueError(f"{directory / name}: the root config is always cl-run's own; put the settings of a "
                             "whole run in experiment/NAME.yaml ('# @package _global_'), chosen by experiment=NAME")
        raise ValueError(f"{directory / name}: cl-run has a built-in {name}, which Hydra would use instead; give "
                         f"yours another name (e.g. {name.parent}/my_{name.name})")


def _quoted(entry: str) -> str:
    """A search path entry as a quoted item of Hydra's override grammar (paths may hold spaces, commas, ...)."""
    # Hydra's rule: backslashes are escapes only before a quote or the closing quote
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), entry) + "'"


def split_args(argv: list[str]) -> tuple[list[str], bool, bool]:
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


def flag_error(argv: list[str]) -> str | None:
    """Why Hydra's command line would refuse these flags (its 8-line usage), as one line naming the flag, or None."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def refuse(message: str) -> None:
        raise ValueError(message)

    parser.error = refuse  # argparse prints its usage and exits; one line is enough
    try:
        _, unknown = parser.parse_known_args(argv)
    except ValueError as exc:  # e.g. --cfg without a value or with a wrong one
        return f"{exc}; see cl-run --help"
    flags = [a for a in unknown if a.startswith("-")]
    return f"{flags[0]}: unknown option; see cl-run --help (options are key=value, without dashes)" if flags else None


def _parse(parser, overrides: list[str]) -> list:
    """Parse every override (hydra.* included); a value the grammar rejects gets a hint to quote it."""
    parsed = []
    for text in overrides:
        try:
            parsed.extend(parser.parse_overrides([text]))
        except Exception as exc:
            key, _, value = text.partition("=")
            quote = '"' if "'" in value else "'"
            if not value:
                raise ValueError(f"{text}: not an override (expected key=value): {one_line(exc)}") from None
            raise ValueError(f"{key}: cannot parse the value {value!r} (spaces and characters such as # ! & ; ( ) "
                             f"need quotes); quote it: {key}={quote}{value}{quote}") from None
        if not parsed[-1].key_or_group:  # "=5": Hydra would take it for a config group named ""
            raise ValueError(f"{text}: not an override: the key before '=' is missing (expected key=value, "
                             "e.g. strategy=ewc)")
    return parsed


def _job_choices(parsed: list, multirun: bool) -> list[list[str]]:
    """Each override's values as ``key=value`` strings: several for a sweep (comma list, range, glob)."""
    choices = []
    for override in parsed:
        if not override.is_sweep_override():
            choices.append([override.input_line])
            continue
        if not multirun:
            raise ValueError(f"{override.input_line}: a comma list (or range, glob) is a sweep over several runs; "
                             f"run it with -m (cl-run -m {override.input_line}), or quote a value that has a comma")
        prefix = override.get_key_element()
        values = list(override.sweep_string_iterator())
        if not values:
            raise ValueError(f"{override.input_line}: the sweep has no values (a glob that matches no option?)")
        choices.append([f"{prefix}={v}" for v in values])
    return choices


class GroupOptions:
    """Hydra's config loader, asked for a group's options over the whole search path: what a glob() sweep matches.
    (Hydra's own loader answers from its base search path, which hydra.searchpath does not reach.)"""

    def __init__(self, overrides: list[str]) -> None:
        from hydra.core.global_hydra import GlobalHydra

        self.loader = GlobalHydra.instance().config_loader()
        self.search = [o for o in overrides if o.split("=", 1)[0] == SEARCHPATH]

    def get_group_options(self, group: str, results_filter=None) -> list[str]:
        from hydra.core.object_type import ObjectType

        return self.loader.get_group_options(group, results_filter or ObjectType.CONFIG, None, self.search)


def _written_out(override) -> str:
    """A glob() sweep as the comma list of options it matches (over the whole search path); others as typed."""
    from hydra.core.override_parser.types import Glob

    if not isinstance(override.value(), Glob):
        return override.input_line
    return f"{override.get_key_element()}={','.join(override.sweep_string_iterator())}"


@dataclass
class PlannedJob:
    """One job of the plan: its config composed once, and validated."""

    composed: Any  # DictConfig: the job's config with its ``hydra`` node, as Hydra's run mode composes it
    config: Any  # Config: the job's own config (without ``hydra``), validated
    key: str  # the job's own config as YAML: how a sweep job finds its validated Config (``job_key``)


@dataclass
class Plan:
    """What ``preflight`` found: the overrides to hand Hydra's sweeper (glob() sweeps written out, so that it runs
    the very jobs checked here) and every job, composed once (Hydra's own node included) and validated."""

    overrides: list[str]
    jobs: list[PlannedJob]
    loader: Any  # Hydra's config loader, for running a single job as Hydra's run mode does


def preflight(overrides: list[str], multirun: bool = True) -> Plan:
    """Compose and validate the config of every job the overrides describe; raise on the first bad one."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    from cl_runner.config.validate import register_configs

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name=JOB_NAME):
        parser = OverridesParser.create(config_loader=GroupOptions(overrides))  # glob() sweeps
        parsed = _parse(parser, overrides)
        jobs = [o for o in parsed if o.get_key_element() == SEARCHPATH
                or not o.get_key_element().lstrip("+~").startswith("hydra")]
        hydra = [o.input_line for o in parsed if o not in jobs and not o.is_sweep_override()]  # hydra.run.dir=...
        hydra += [] if multirun else ["hydra.mode=RUN"]  # what Hydra's run mode adds last
        planned = []
        for combo in itertools.product(*_job_choices(jobs, multirun)):
            try:
                composed = GlobalHydra.instance().hydra.compose_config(
                    "config", [*combo, *hydra], run_mode=RunMode.RUN, from_shell=False)
            except Exception as exc:
                raise ValueError(_group_value(exc, jobs) or _catalogue_hint(one_line(exc), combo)) from None
            own = job_config(composed)
            planned.append(PlannedJob(composed, checked(own), job_key(own)))
        written = [_written_out(o) if o in jobs else o.input_line for o in parsed]
        return Plan(written, planned, GlobalHydra.instance().config_loader())


def _group_value(exc: BaseException, parsed: list) -> str | None:
    """Hydra's "Config group override must be a string or a list. Got int" as one line naming the group."""
    if "Config group override must be" not in str(exc):
        return None
    groups = _groups()
    for override in parsed:
        group, value = override.get_key_element().lstrip("+~"), override.value()
        if group in groups and not isinstance(value, str | list):
            return (f"{group}: expected the name of a {group} option (a file of conf/{group}/, e.g. "
                    f"{group}={groups[group][0]}), got {value!r}")
    return None


def _groups() -> dict[str, list[str]]:
    """The top-level config groups of the search path (hydra's own apart) and their options, for messages."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    return {name: loader.get_group_options(name) or ["..."] for name in loader.list_groups("") if name != "hydra"}


def job_config(composed):
    """A composed config without its ``hydra`` node: the job's own config, as Hydra hands it to the task."""
    import copy

    from omegaconf import open_dict, read_write

    own = copy.deepcopy(composed)
    with read_write(own), open_dict(own):
        del own["hydra"]
    return own


def job_key(own) -> str:
    """A job's own config as YAML (interpolations as written): the same for preflight's and the launcher's."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(own)


def output_dir(composed, multirun: bool) -> Path:
    """The run's (``hydra.run.dir``) or the sweep's (``hydra.sweep.dir``) directory; raises ValueError when it
    cannot be created (before any model is loaded)."""
    import tempfile

    from omegaconf import OmegaConf

    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    path = Path(str(OmegaConf.select(composed, key))).absolute()
    existing = next(p for p in [path, *path.parents] if p.exists())
    try:
        if not existing.is_dir():
            raise OSError(f"{existing} is not a directory")
        Path(tempfile.mkdtemp(dir=existing, prefix=".cl-run-probe-")).rmdir()
    except OSError as exc:
        raise ValueError(f"{key}: cannot write to {path} ({exc})") from None
    return path
