"""Checks shared by every typed config (the run's groups and each strategy's options): each names its key.

Option lists that the code and the checks both need are defined once, here or beside the code that uses them,
and imported by both.
"""

from __future__ import annotations

import difflib
import inspect
import math
from typing import Any

WEIGHT_DTYPES = ("float32", "bfloat16", "float16")  # model.dtype; models.py maps each to its torch dtype
# Every seeded stream draws from ``seed * 1_000_003 + ...`` (strategies/base.py derived_seed), which torch's
# generators take only below 2**64; 32 bits leave that room and match numpy's seeds.
SEED_MAX = 2**32 - 1


def _not_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def check_choice(errors: list[str], key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        errors.append(f"{key}: expected one of {', '.join(allowed)}, got {value!r}")


def check_positive(errors: list[str], key: str, value: Any, allow_zero: bool = False) -> None:
    """``value`` > 0 (>= 0 with ``allow_zero``) and finite; None passes (an option left unset)."""
    if value is None:
        return
    if _not_finite(value) or ((value < 0) if allow_zero else (value <= 0)):
        errors.append(f"{key}: expected a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


def check_fraction(errors: list[str], key: str, value: Any, closed_right: bool = True) -> None:
    if value is not None and not (0 <= value <= 1 if closed_right else 0 <= value < 1):  # nan fails both
        errors.append(f"{key}: expected a value in [0, 1{']' if closed_right else ')'}, got {value!r}")


def close_match(word: str, options: Any) -> str:
    """``; did you mean 'x'?`` for the option nearest ``word``, or nothing."""
    found = difflib.get_close_matches(word, [str(o) for o in options], n=1, cutoff=0.6)
    return f"; did you mean {found[0]!r}?" if found else ""


# ------------------------------------------------------------------------------------------- model.arch
def arch_errors(arch: dict[str, Any], key: str) -> list[str]:
    """``model.arch`` checked against its architecture's config class: every key is an option of that class,
    its value has the option's type, and sizes and counts (options whose default is a positive integer) are
    positive. Imports the transformers config class (and so torch): see docs/errors.md."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = arch.get("model_type")
    if model_type not in CONFIG_MAPPING:
        return [f"{key}.model_type: unknown architecture {model_type!r}{close_match(str(model_type), CONFIG_MAPPING)}"]
    cls = CONFIG_MAPPING[model_type]
    settings = {k: v for k, v in arch.items() if k != "model_type"}
    defaults = cls()
    known = set(inspect.signature(cls.__init__).parameters) | set(cls.attribute_map) | set(vars(defaults))
    unknown = [f"{key}.{name}: not an option of {cls.__name__} ({model_type}){close_match(name, known)}"
               for name in settings if name not in known or name in ("self", "kwargs")]
    if unknown:
        return unknown
    errs = [f"{key}.{name}: expected a positive integer (a size or count), got {value!r}"
            for name, value in settings.items() if _is_count(getattr(defaults, name, None), name) and _below_one(value)]
    errs += [f"{key}.{name}: expected a finite number, got {value!r}" for name, value in settings.items()
             if _not_finite(value)]
    if not errs:
        try:
            cls(**settings)
        except Exception as exc:  # transformers' (strict) config classes check types and some combinations
            errs.append(f"{key}: {cls.__name__} rejects these values ({' '.join(str(exc).split())})")
    return errs


def _is_count(default: Any, name: str) -> bool:
    return isinstance(default, int) and not isinstance(default, bool) and default > 0 and not name.endswith("_id")


def _below_one(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value < 1


def parse_threads(value: Any) -> int | None:
    """``device.threads``: ``auto`` -> None, a positive integer (or its string) -> the integer; anything else
    raises ValueError."""
    if str(value).strip().lower() == "auto":
        return None
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"expected auto or a positive integer, got {value!r}")
    return int(text)
