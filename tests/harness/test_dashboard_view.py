"""What ``sparsebench run`` writes for the dashboard: a saved view of the cells (an experiment tag
in the envelope MLflow's "Save view" writes) whose filter and sort, run through MLflow's own
search, list exactly the cell runs, by name; the URL the summary prints asks for the same. The
browser side is tests/reports/test_dashboard.py."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

from harness.cli import main
from harness.store.dashboard import CELLS_VIEW_NAME, CELLS_VIEW_TAG, ui_url

RUN = [
    "run", "--task", "identity", "--estimator", "dense,sparse", "--seeds", "0,1",
    "--set", "tasks.identity.variants=[{n = 4}]",
    "--set", "tuning.trials=0",  # one cell per configuration, no tuning trials
    "--set", "tasks.identity.steps=10",
    "--set", "tasks.identity.eval_every=10",
    "--set", "tasks.identity.eval_samples=50",
    "--set", "tasks.identity.snapshots=[]",
    "--threads", "1", "--no-progress",
]  # fmt: skip


def test_run_stores_a_saved_view_that_lists_the_cells_by_name(store_home, store, capsys):
    assert main(RUN) == 0
    out = capsys.readouterr().out
    experiment = store.client.get_experiment_by_name(store.experiment)
    assert ui_url(5000, experiment.experiment_id) in out  # the summary's link opens the cells' charts

    envelope = json.loads(experiment.tags[CELLS_VIEW_TAG])
    assert envelope["name"] == CELLS_VIEW_NAME
    assert isinstance(envelope["createdAt"], int) and envelope["createdAt"] > 0
    state = json.loads(envelope["state"])
    order = "ASC" if state["orderByAsc"] else "DESC"
    runs = store.client.search_runs(
        [experiment.experiment_id], state["searchFilter"], order_by=[f"{state['orderByKey']} {order}"]
    )
    names = [r.info.run_name for r in runs]
    assert names == sorted(r.info.run_name for r in store.runs("cell")) and len(names) == 4
    assert store.runs("matrix")  # the parent exists, and the view leaves it out

    query = parse_qs(urlsplit(urlsplit(ui_url(5000, experiment.experiment_id)).fragment).query)
    assert query["searchFilter"] == [state["searchFilter"]] and query["orderByKey"] == [state["orderByKey"]]
    assert query["compareRunsMode"] == ["CHART"] and query["workflowType"] == ["machine_learning"]

    assert main(RUN) == 0  # a second run keeps the one view (resumed cells: nothing new to run)
    tags = store.client.get_experiment_by_name(store.experiment).tags
    assert [k for k in tags if k.startswith("mlflow.sharedViewState.")] == [CELLS_VIEW_TAG]


def test_a_tracking_server_is_its_own_dashboard():
    from rich.console import Console

    from harness.run.summary import print_where
    from harness.store.dashboard import experiment_url

    console = Console(record=True, width=80)
    print_where(console, "http://10.0.0.5:5000", "3")
    out = console.export_text()
    assert experiment_url("http://10.0.0.5:5000", "3") in out.splitlines()  # whole, on one line
    assert experiment_url("http://10.0.0.5:5000", "3").startswith("http://10.0.0.5:5000/#/experiments/3/runs?")
    assert "sparsebench ui" not in out
