"""Errors a researcher can act on: one line naming the key, the value and what is allowed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class BnsweepError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class ConfigError(BnsweepError, ValueError):
    """A config value is not allowed."""


class DataError(BnsweepError):
    """A dataset could not be found, fetched or decoded."""


class TrackingError(BnsweepError):
    """The MLflow tracking store cannot be reached."""


def check_choice(key: str, value: Any, allowed: Iterable[str]) -> str:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")
    return value


def check_range(
    key: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Any:
    """Check low <(=) value <(=) high; the message spells out the allowed interval."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ConfigError(f"{key}={value!r} is not allowed; it must be a number in {interval}")
    return value
