"""Checks shared by every typed config (the run's groups and each strategy's options): each names its key.

Option lists that the code and the checks both need are defined once, here or beside the code that uses them,
and imported by both.
"""

from __future__ import annotations

from typing import Any

WEIGHT_DTYPES = ("float32", "bfloat16", "float16")  # model.dtype; models.py maps each to its torch dtype


def check_choice(errors: list[str], key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        errors.append(f"{key}: expected one of {', '.join(allowed)}, got {value!r}")


def check_positive(errors: list[str], key: str, value: Any, allow_zero: bool = False) -> None:
    if value is None:
        return
    if (value < 0) if allow_zero else (value <= 0):
        errors.append(f"{key}: expected a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


def check_fraction(errors: list[str], key: str, value: Any, closed_right: bool = True) -> None:
    if value is not None and not (0 <= value <= 1 if closed_right else 0 <= value < 1):
        errors.append(f"{key}: expected a value in [0, 1{']' if closed_right else ')'}, got {value!r}")
