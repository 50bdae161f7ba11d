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

import yaml

from bnsweep.defaults import SWEEP_DIR
from bnsweep.errors import ConfigError

MAX_BYTES = 1_000_000  # a sweep file is a page of YAML; anything this big is a wrong file (or a YAML bomb)


def find(value: str) -> Path | None:
    """The user's sweep file that ``sweep=<value>`` names, or None for a built-in (or unknown) name."""
    if value.endswith((".yaml", ".yml")) or "/" in value:
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"sweep={value} is not allowed: no such file; give a sweep file's path or the name "
                              f"of one in ./sweeps/ or {SWEEP_DIR}")
        return checked(path, value)
    local = Path("sweeps") / f"{value}.yaml"
    builtin = Path(SWEEP_DIR) / f"{value}.yaml"
    if local.is_file() and not (builtin.is_file() and local.resolve() == builtin.resolve()):
        return checked(local, value)
    return None


def checked(path: Path, value: str) -> Path:
    """``path`` if it reads as a sweep definition (a YAML mapping of modest size); else one error line."""
    refused = f"sweep={value} is not allowed: {path}"
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ConfigError(f"{refused} is {path.stat().st_size:,} bytes; a sweep file is a short YAML mapping")
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{refused} is not valid YAML{where} ({getattr(e, 'problem', None) or e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{refused} cannot be read ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{refused} holds {type(raw).__name__}, not a mapping of sweep keys (name, grid, "
                          "search, ...)")
    return path


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
