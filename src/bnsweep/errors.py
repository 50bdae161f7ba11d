"""Errors a researcher can act on: one line naming the key, the value and what is allowed."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


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


def check_int(key: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """An integer (``32.5`` is refused, never truncated), optionally within [low, high]."""
    if not isinstance(value, int) or isinstance(value, bool):
        where = "" if low is None else f" >= {low}" + ("" if high is None else f" and <= {high}")
        raise ConfigError(f"{key}={value!r} is not allowed; it must be an integer{where}")
    return check_range(key, value, low, high)


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_name(key: str, value: Any) -> str:
    """A name that becomes a file or folder (a sweep's journal, reports/<name>/): no path, nothing hidden."""
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ConfigError(f"{key}={value!r} is not allowed; use 1-100 letters, digits, '.', '_' or '-', starting "
                          "with a letter or digit (it names files under the store and reports/)")
    return value


def check_bool(key: str, value: Any) -> bool:
    """A boolean: ``no``, ``yes``, ``0`` or ``"false"`` are refused, not guessed."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} is not allowed; it must be true or false")
    return value


_SECRET_IN_URL = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")
_SECRET_IN_QUERY = re.compile(r"(?i)(?P<key>password|passwd|pwd|secret|token)=(?P<pw>[^&\s]+)")


def redact(text: Any) -> str:
    """``text`` with the passwords of any URLs in it (``scheme://user:pw@host``, ``?password=``) as ``***``."""
    text = _SECRET_IN_URL.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))
    return _SECRET_IN_QUERY.sub(lambda m: f"{m['key']}=***", text)


def run_app(app: Callable[[Any], T], cfg: Any) -> T:
    """The body of every command: plain log lines, quiet MLflow clients, errors as one line (exit 1)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return app(cfg)
    except BnsweepError as e:
        stop_preloading()
        sys.exit(f"error: {redact(e)}")


def stop_preloading() -> None:
    """End a fork server still importing the sweep's workers (``sweep.launch_local.start_preloading``): after an
    error nothing will use it, and it holds the command's output open until its ~8 s of imports are done."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    if pid:
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
