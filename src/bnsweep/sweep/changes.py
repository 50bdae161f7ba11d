"""A sweep's definition compared with the one its studies were run with: refuse what would mix trials.

Each cell study stores the definition it ran with (``SweepSpec.to_attrs`` as user attributes).
Running the same ``sweep.name`` again with another search space, sampler, pruner, epochs or target
would put trials of two different experiments into one table, so it is refused with the difference
shown. Only growth that leaves every finished trial valid is accepted, and said so in one line.
The comparison is generic over ``to_attrs()``: a spec key added later is compared too, without code here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from optuna.storages import BaseStorage

from bnsweep.errors import ConfigError, redact
from bnsweep.sweep.definition import SweepSpec
from bnsweep.sweep.storage import sweep_studies

log = logging.getLogger("bnsweep.sweep")

# Keys that may only grow between runs: more LR-search trials, more repeat seeds. The new slots are
# appended after the old ones (slot numbers n_trials.. are repeats), so finished trials stay valid.
GROWABLE = frozenset({"n_trials", "repeats"})
# Keys that say how a sweep runs, not what it measures: free to change (a command-line choice).
HOW_TO_RUN = frozenset({"population"})
# Samplers whose trial i depends on n_trials (evenly spread grid values): n_trials may not change.
SPREAD_BY_N_TRIALS = frozenset({"grid"})


def _shown(value: Any) -> Any:
    """A stored value as a researcher reads it: Optuna's JSON distributions decoded to their attributes."""
    if isinstance(value, str) and value.startswith("{"):
        try:
            value = json.loads(value)
        except ValueError:
            return value
    if isinstance(value, Mapping):
        if set(value) == {"name", "attributes"}:
            return {k: v for k, v in value["attributes"].items() if v is not None}
        return {k: _shown(v) for k, v in value.items()}
    return value


def _fmt(value: Any) -> str:
    return json.dumps(_shown(value), sort_keys=True, separators=(", ", ": "), default=str)


def differences(stored: Mapping[str, Any], now: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(refused changes, accepted growth) between a study's stored attributes and the definition now.

    A key the study does not store was added to the spec after it ran: nothing to compare against.
    """
    refused, grown = [], []
    for key, new in now.items():
        if key not in stored or key in HOW_TO_RUN or _shown(stored[key]) == _shown(new):
            continue
        old = stored[key]
        sampler = _shown(stored.get("sampler")) or {}
        may_grow = key in GROWABLE and not (key == "n_trials" and sampler.get("name") in SPREAD_BY_N_TRIALS)
        if may_grow and isinstance(old, int) and isinstance(new, int) and new > old:
            grown.append(f"{key} {old} -> {new}")
        else:
            refused.append(f"{key}={_fmt(old)}; now {key}={_fmt(new)}")
    return refused, grown


def check(storage: BaseStorage, spec: SweepSpec, storage_url: str) -> None:
    """Raise ConfigError if ``spec`` differs from what this sweep's studies ran with, beyond safe growth."""
    now = spec.to_attrs()
    grown: list[str] = []
    for study in sweep_studies(storage, spec.name):
        refused, more = differences(study.user_attrs, now)
        if refused:
            raise ConfigError(
                f"sweep {spec.name} was run with {refused[0]}"
                + (f" (and {len(refused) - 1} more change(s))" if len(refused) > 1 else "")
                + f": use a new sweep.name, or set the definition back, or delete its studies in "
                f"{redact(storage_url)} to start over")
        grown = grown or more
    if grown:
        log.info("sweep %s grows: %s (finished trials are kept; only the new slots run)",
                 spec.name, ", ".join(grown))
