"""Where ``sweep=<value>`` finds a sweep file: a path, the current folder's ``sweeps/``, or the built-ins.

Hydra looks a config group's options up on its search path only (the package's ``conf/sweep/``; a
checkout's ``sweeps/`` links there). A researcher's own file, given by path (``sweep=studies/mine.yaml``)
or kept in ``./sweeps/<name>.yaml`` of the folder they run from, is offered to Hydra as an extra
search-path entry holding ``sweep/<name>.yaml``, so it composes exactly like a built-in one.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from bnsweep.defaults import SWEEP_DIR
from bnsweep.errors import ConfigError


def find(value: str) -> Path | None:
    """The user's sweep file that ``sweep=<value>`` names, or None for a built-in (or unknown) name."""
    if value.endswith((".yaml", ".yml")) or "/" in value:
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"sweep={value} is not allowed: no such file; give a sweep file's path or the name "
                              f"of one in ./sweeps/ or {SWEEP_DIR}")
        return path
    local = Path("sweeps") / f"{value}.yaml"
    builtin = Path(SWEEP_DIR) / f"{value}.yaml"
    if local.is_file() and not (builtin.is_file() and local.resolve() == builtin.resolve()):
        return local
    return None


@contextlib.contextmanager
def offered(argv: list[str]) -> Iterator[list[str]]:
    """``argv`` with ``sweep=<file>`` replaced by an option that Hydra finds (while the context lasts)."""
    args, tmp, first = list(argv), None, None
    try:
        for i, arg in enumerate(args):
            key, sep, value = arg.partition("=")
            path = find(value) if key == "sweep" and sep and value else None
            if path is None:
                continue
            tmp = tmp or Path(tempfile.mkdtemp(prefix="bnsweep-sweep-"))
            option = path.stem if not (Path(SWEEP_DIR) / path.name).exists() else f"{path.stem}_file"
            (tmp / "sweep").mkdir(exist_ok=True)
            shutil.copyfile(path, tmp / "sweep" / f"{option}.yaml")
            args[i] = f"sweep={option}"
            first = i if first is None else first
        if tmp is not None:  # beside the sweep= override: Hydra's flags (--cfg ...) may follow the overrides
            args.insert(first + 1, f"hydra.searchpath=[file://{tmp}]")
        yield args
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def finding_files(command: Callable[[], object]) -> Callable[[], None]:
    """A Hydra command (``bnsweep sweep``, ``bnsweep report``) that also finds the user's sweep files."""

    @functools.wraps(command)
    def main() -> None:
        with in_argv():
            command()

    return main


@contextlib.contextmanager
def in_argv() -> Iterator[None]:
    """``sys.argv`` with the user's sweep files offered to Hydra, for the duration of the command."""
    saved = sys.argv
    try:
        with offered(saved[1:]) as args:
            sys.argv = [saved[0], *args]
            yield
    except ConfigError as e:
        sys.exit(f"error: {e}")
    finally:
        sys.argv = saved
