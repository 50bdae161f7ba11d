"""The ``bnsweep`` command: one front door to every stage of the pipeline.

Each subcommand is the stage's own entry point, imported only when it runs (``bnsweep ui`` never
loads torch). The Hydra ones take the same overrides as their configs in ``conf/``
(``bnsweep train --help`` lists them); ``python -m bnsweep.<old name>`` still works.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


def _train(args: Sequence[str]) -> None:
    from bnsweep.training.run import main

    _hydra(main, "train", args)


def _sweep(args: Sequence[str]) -> None:
    from bnsweep.sweep.launch_local import start_preloading

    if not any((a.startswith("action=") and a != "action=run") or a == "launcher=slurm" for a in args):
        start_preloading()  # the workers' imports (~7 s) now overlap the driver's own; status/stop start no
        # worker, and SLURM's workers are jobs
    from bnsweep.sweep.driver import main

    _hydra(main, "sweep", args)


def _report(args: Sequence[str]) -> None:
    from bnsweep.report.build import main

    _hydra(main, "report", args)


def _claims(args: Sequence[str]) -> None:
    from bnsweep.sweep.launch_local import start_preloading

    start_preloading()
    from bnsweep.claims import main

    main(args)


def _export(args: Sequence[str]) -> None:
    from bnsweep.deploy.export import main

    _hydra(main, "export", args)


def _worker(args: Sequence[str]) -> None:
    from bnsweep.sweep.worker import main

    main(list(args))


def _ui(args: Sequence[str]) -> None:
    from bnsweep.tracking.server import main

    main(list(args), action="start")


def _down(args: Sequence[str]) -> None:
    from bnsweep.tracking.server import main

    main(list(args), action="stop")


def _optuna_ui(args: Sequence[str]) -> None:
    from bnsweep.sweep.optuna_ui import main

    main(list(args))


def _bench(args: Sequence[str]) -> None:
    from bnsweep.bench.main import main

    main(list(args))


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], None], str, str]] = {  # name: (run, what, example)
    "train": (_train, "one training run, tracked in MLflow", "bnsweep train experiment=seed001_bn"),
    "sweep": (_sweep, "a study: grid x LR search, resumable", "bnsweep sweep sweep=default workers=2"),
    "report": (_report, "the study report of a sweep (never trains)", "bnsweep report sweep=default"),
    "claims": (_claims, "the seeds' claims: run their sweeps, test them", "bnsweep claims workers=2"),
    "export": (_export, "fold a trained model's BN away", "bnsweep export run_id=<MLflow run id>"),
    "worker": (_worker, "a sweep worker (what cluster jobs run)", "bnsweep worker --storage ... --sweep ..."),
    "ui": (_ui, "the MLflow dashboard over mlruns/", "bnsweep ui [--port 5000]"),
    "down": (_down, "stop the dashboard's server", "bnsweep down"),
    "optuna-ui": (_optuna_ui, "optuna-dashboard over a sweep's studies", "bnsweep optuna-ui --sweep default"),
    "bench": (_bench, "speed ratios measured side by side", "bnsweep bench [--only training]"),
}


def _hydra(main: Callable[[], object], name: str, args: Sequence[str]) -> None:
    """Run a Hydra app as ``bnsweep <name> <args>``: Hydra reads its overrides from sys.argv."""
    sys.argv = [f"bnsweep {name}", *args]
    main()


def usage() -> str:
    rows = "\n".join(f"  {name:<9} {what:<44} {example}" for name, (_, what, example) in COMMANDS.items())
    return ("usage: bnsweep <command> [overrides or options]\n\n"
            "Batch Normalization studies: measured, tracked, reproducible.\n\n"
            f"commands:\n{rows}\n\n"
            "Hydra commands take key=value overrides (bnsweep train --help lists every key). Docs: README.md, docs/.")


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        if "=" in name:  # `python -m bnsweep key=value ...` once meant a training run
            name, rest = "train", args
        else:
            sys.exit(f"error: bnsweep {name!r} is not a command; choose one of: {', '.join(COMMANDS)} "
                     "(bnsweep --help says what each does)")
    COMMANDS[name][0](rest)


if __name__ == "__main__":
    main()
