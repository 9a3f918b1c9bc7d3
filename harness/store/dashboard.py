"""What the MLflow dashboard opens on. MLflow 3's runs table folds child runs under their parent
until the parent row is expanded, and its chart view plots only the rows on show, so a matrix's
charts start empty. The table lists runs flat when they are filtered and sorted by anything but
start time; the URL we print and the saved view we store ask for exactly that: the cell runs, by
name (the chart view plots the first ten, MLflow's default)."""

from __future__ import annotations

import json
from urllib.parse import urlencode

from reports.schema import CELLS_FILTER

__all__ = ["CELLS_VIEW_TAG", "cells_view_tag", "experiment_url", "ui_url"]

CELLS_ORDER = "tags.`mlflow.runName`"  # MLflow's key for "Sort: Run Name"
# A saved view is an experiment tag under MLflow's share prefix; the UI lists it under "Views".
CELLS_VIEW_ID = "sparsebench-cells"
CELLS_VIEW_TAG = f"mlflow.sharedViewState.{CELLS_VIEW_ID}"
CELLS_VIEW_NAME = "sparsebench: cells"
_FACETS = {"searchFilter": CELLS_FILTER, "orderByKey": CELLS_ORDER, "orderByAsc": True}


def ui_url(port: int, experiment_id: str | None = None, host: str = "127.0.0.1") -> str:
    """The URL of ``sparsebench ui`` (its own ``mlflow server``); see ``experiment_url``."""
    base = f"http://{host}:{port}/"
    return base if experiment_id is None else experiment_url(base, experiment_id)


def experiment_url(server: str, experiment_id: str) -> str:
    """An experiment's cells in the chart view of the dashboard at ``server``. ``workflowType``:
    MLflow 3's UI opens on GenAI views unless told ``machine_learning``."""
    query = urlencode({"workflowType": "machine_learning", "searchFilter": CELLS_FILTER,
                       "orderByKey": CELLS_ORDER, "orderByAsc": "true", "compareRunsMode": "CHART"})
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def cells_view_tag(created_ms: int) -> str:
    """The saved view's tag value, in the envelope MLflow's "Save view" writes (name and times in
    plain JSON, the view state as a JSON string the UI also reads uncompressed)."""
    envelope = {"name": CELLS_VIEW_NAME, "createdAt": created_ms, "updatedAt": created_ms,
                "state": json.dumps(_FACETS)}
    return json.dumps(envelope)
