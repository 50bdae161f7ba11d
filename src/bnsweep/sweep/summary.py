"""The driver's summary: the per-cell table on each parent run, in reports/<sweep>/ and on the ``summary`` run."""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
from mlflow.exceptions import MlflowException
from optuna.trial import TrialState

from bnsweep.errors import TrackingError
from bnsweep.sweep import table
from bnsweep.sweep.storage import sweep_studies
from bnsweep.tracking.runs import RunTracker, mark_killed, summary_run


class Summary:
    """Part of ``state.Sweep``: its results, written at the end or read while another driver runs."""

    def finish(self) -> list[dict]:
        """Summaries on each cell's parent run, the table as CSV/Markdown artifacts and files."""
        try:
            return self._finish()
        except (OSError, MlflowException) as e:  # requests' errors are OSErrors
            raise TrackingError(
                f"tracking.uri={self.uri}: MLflow does not answer ({type(e).__name__}); every trial's result "
                f"is safe in {self.storage_url}: run the same command again once MLflow is back") from None

    def _finish(self) -> list[dict]:
        self.complete_runs()
        rows = []
        for study in sorted(self.studies, key=lambda s: s.user_attrs.get("order", 0)):
            row = table.cell_row(study, self.spec.target_acc)
            rows.append(row)
            parent = study.user_attrs["mlflow_parent_run_id"]
            self.log_cell(study, row)
            self.client.set_terminated(parent, "FINISHED" if row["running"] == 0 else "KILLED")
            failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if failed and row["running"] == 0:  # a worker killed mid-trial may not have ended its run
                mark_killed(self.client, self.experiment_id, study.study_name, failed)
        md, csv = table.to_markdown(rows, self.spec.target_acc), table.to_csv(rows)
        out = Path("reports") / self.spec.name
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.md").write_text(md)
        (out / "summary.csv").write_text(csv)
        run_id = summary_run(self.client, self.experiment_id, self.spec.name)
        self.client.log_text(run_id, md, "summary.md")
        self.client.log_text(run_id, csv, "summary.csv")
        self.client.set_terminated(run_id, "FINISHED")
        return rows

    def log_cell(self, study: optuna.Study, row: dict) -> None:
        """A cell's table row as metrics of its parent run: sortable columns of the runs table."""
        # NaN is logged too: "no trial got there" (e.g. no LR basin) is an answer, not a gap.
        metrics = {k: v for k, v in row.items() if k != "cell" and isinstance(v, (int, float))}
        RunTracker.for_run(self.client, study.user_attrs["mlflow_parent_run_id"]).log(metrics)

    def snapshot(self, who: str) -> list[dict]:
        """``action=status`` while a driver runs: the table read from the storage; nothing written."""
        studies = sorted(sweep_studies(self.storage, self.spec.name), key=lambda s: s.user_attrs.get("order", 0))
        rows = [table.cell_row(study, self.spec.target_acc) for study in studies]
        print("\n" + table.to_markdown(rows, self.spec.target_acc))
        print(f"sweep {self.spec.name} is being run by {who}: this is a snapshot.", file=sys.stderr)
        return rows
