"""The driver's cells: one Optuna study ``<sweep>/<cell>`` and one MLflow parent run per cell, made or checked."""

from __future__ import annotations

import optuna

from bnsweep.errors import ConfigError
from bnsweep.sweep import changes
from bnsweep.sweep.definition import cell_labels
from bnsweep.tracking.names import cell_run_name
from bnsweep.tracking.runs import RunTracker


class Cells:
    """Part of ``state.Sweep``: its studies and parent runs."""

    def prepare(self) -> None:
        """Create or check each cell's study and parent run; enqueue every missing trial."""
        changes.check(self.storage, self.spec, self.storage_url)
        studies = []
        for i, cell in enumerate(self.spec.cells()):
            study = optuna.create_study(storage=self.storage, study_name=self.spec.study_name(cell),
                                        direction="maximize", load_if_exists=True)
            old = study.user_attrs.get("overrides")
            if old is not None and old != cell.overrides:
                raise ConfigError(
                    f"sweep {self.spec.name!r} changed since its studies were created (cell {cell.name}: "
                    f"{old} -> {cell.overrides}); give it a new name (sweep.name=...) or delete "
                    f"{self.storage_url}")
            parent = study.user_attrs.get("mlflow_parent_run_id")
            if parent is None:
                run = self.client.create_run(self.experiment_id, run_name=cell_run_name(
                    cell_labels(cell.values).values()), tags={
                    "bnsweep.sweep": self.spec.name, "bnsweep.cell": cell.name, "bnsweep.role": "cell",
                    "optuna.study": study.study_name})
                parent = run.info.run_id
                RunTracker.for_run(self.client, parent).log(
                    params={**{k: v for k, v in cell.values.items()}, "overrides": " ".join(cell.overrides)})
            else:
                self.client.update_run(parent, status="RUNNING")
            attrs = {**self.spec.to_attrs(), "cell": cell.name, "grid": cell.values, "order": i,
                     "overrides": cell.overrides, "mlflow_parent_run_id": parent,
                     "mlflow_experiment": self.experiment, "store_dir": str(self.store_dir)}
            for k, v in attrs.items():
                if study.user_attrs.get(k) != v:
                    study.set_user_attr(k, v)
            studies.append(study)
        self._studies = studies
        self.recover()
