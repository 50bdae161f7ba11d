"""Links into the MLflow dashboard that open on the answer: a sweep's runs table with its metric columns.

MLflow 3.17's UI opens an experiment on the GenAI overview (traces, token usage) unless told otherwise,
and shows no metric columns until someone picks them. Two things fix the first screen, both MLflow's own:
the query parameter ``workflowType=machine_learning`` (the UI's "Model training" switch, which decides
over the experiment's ``mlflow.experimentKind`` tag) and a shared view: an experiment tag
``mlflow.sharedViewState.<key>`` holding the columns and the sort, opened by ``viewStateShareKey=<key>``.
Imports no torch (``bnsweep ui`` uses it); MLflow's client is imported only where a server is asked.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

VIEW_KEY = "bnsweep"  # the shared view every sweep experiment carries
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"


def runs_table_url(uri: str, experiment_id: str, view: bool = True) -> str:
    """The runs table of an experiment (route ``#/experiments/<id>/runs``), in the model-training UI.

    ``view``: open the experiment's bnsweep view (metric columns, sorted); only where ``set_view`` ran,
    else the UI says the share key does not exist.
    """
    query = "workflowType=machine_learning" + (f"&viewStateShareKey={VIEW_KEY}" if view else "")
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def view_state(metrics: Sequence[str], sort_by: str | None = None, search: str = "") -> str:
    """The runs table's state as MLflow's UI stores it: column ids ``metrics.`<key>```, sort descending,
    ``search`` in the search box (an MLflow filter such as ``tags.`x` != 'y'``)."""
    state: dict[str, Any] = {"selectedColumns": [f"metrics.`{m}`" for m in metrics], "searchFilter": search}
    if sort_by:
        state |= {"orderByKey": f"metrics.`{sort_by}`", "orderByAsc": False}
    return json.dumps(state)


def set_view(client: Any, experiment_id: str, metrics: Sequence[str], sort_by: str | None = None,
             search: str = "") -> None:
    """Store the runs table's view (these metric columns, sorted on ``sort_by``) as the experiment's tag."""
    value = view_state(metrics, sort_by, search)
    if client.get_experiment(experiment_id).tags.get(VIEW_TAG) != value:
        client.set_experiment_tag(experiment_id, VIEW_TAG, value)


def sweep_links(uri: str) -> list[str]:
    """One line per sweep experiment on the server: its name and the link to its runs table."""
    from mlflow.tracking import MlflowClient

    exps = MlflowClient(uri).search_experiments(filter_string="name LIKE 'sweep-%'", max_results=100)
    return [f"  {e.name:<32} {runs_table_url(uri, e.experiment_id, VIEW_TAG in e.tags)}" for e in exps]
