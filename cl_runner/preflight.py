"""Before anything runs: parse the overrides, compose and validate the config of every job they describe, and
turn Hydra's and OmegaConf's composition errors into one readable line each (``key: what was expected``)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


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
            key = re.search(r"Key '([^']+)'", str(cause))
            full = re.search(r"full_key: (\S+)", str(cause))
            name = full.group(1) if full else key.group(1) if key else "?"
            return f"{name}: unknown key (see docs/configuration.md)"
        return f"{first}: {detail}"
    if "Could not override" in text:
        key = re.search(r"Could not override '([^']+)'", text)
        return f"{key.group(1) if key else first}: unknown key (see docs/configuration.md)"
    return first


def checked(cfg):
    """schema.validate, with OmegaConf's errors on the way (a missing name, a null) as one-line ConfigErrors."""
    from omegaconf.errors import OmegaConfBaseException

    from cl_runner.errors import ConfigError
    from cl_runner.schema import validate

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


def preflight(overrides: list[str], multirun: bool = True) -> int:
    """Compose and validate the config of every job the overrides describe; raise on the first bad one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from cl_runner.schema import register_configs

    register_configs()
    jobs = 0
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())  # glob() sweeps
        parsed = [o for o in _parse(parser, overrides)
                  if not o.get_key_element().lstrip("+~").startswith("hydra")]
        for combo in itertools.product(*_job_choices(parsed, multirun)):
            try:
                cfg = compose("config", overrides=list(combo))
            except Exception as exc:
                raise ValueError(_catalogue_hint(one_line(exc), combo)) from None
            checked(cfg)
            jobs += 1
    return jobs
