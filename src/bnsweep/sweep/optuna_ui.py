"""``bnsweep optuna-ui`` (``make optuna-ui SWEEP=<name>``): optuna-dashboard over a sweep's Optuna storage.

The MLflow dashboard shows runs; this one shows the studies the runs came from: each cell's trials,
their LRs and states, optimization history, parameter importance. It reads the same storage the
driver and workers share (the journal file ``<store_dir>/optuna/<sweep>.journal`` or PostgreSQL),
so it works while a sweep runs. Bound to 127.0.0.1 only: from another machine, use an SSH tunnel.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from bnsweep.defaults import STORE_DIR
from bnsweep.errors import ConfigError, run_app
from bnsweep.sweep.storage import default_storage, open_storage

HOST = "127.0.0.1"


def storage_url(sweep: str, storage: str | None, store_dir: str | Path = STORE_DIR) -> str:
    """The sweep's storage: ``storage`` as given, else its journal file, which must exist."""
    if storage:
        return storage
    url = default_storage(store_dir, sweep)
    if not Path(url).exists():
        raise ConfigError(f"sweep={sweep}: no Optuna journal at {url}; run the sweep first (bnsweep sweep "
                          f"sweep={sweep}), or give --store-dir / --storage postgresql://...")
    return url


def serve(url: str, port: int, host: str = HOST) -> None:
    """optuna-dashboard over the storage at ``url`` until interrupted (blocks)."""
    import optuna_dashboard

    print(f"optuna-dashboard over {url}: http://{host}:{port}/dashboard   (Ctrl-C stops it)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        optuna_dashboard.run_server(open_storage(url), host=host, port=port)


def _run(args: argparse.Namespace) -> None:
    from bnsweep.tracking.server import preferred_port

    serve(storage_url(args.sweep, args.storage, args.store_dir), args.port or preferred_port(8080, HOST))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="bnsweep optuna-ui", description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", default="default", help="the sweep's name (its studies are '<name>/<cell>')")
    ap.add_argument("--storage", default=None, help="Optuna storage (default: the sweep's journal file; "
                    "or postgresql://...)")
    ap.add_argument("--store-dir", default=STORE_DIR, help=f"where the journal lives (default: {STORE_DIR})")
    ap.add_argument("--port", type=int, default=None, help="default: 8080, or a free port if taken")
    run_app(_run, ap.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
