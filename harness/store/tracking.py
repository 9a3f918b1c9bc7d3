"""MLflow tracking in the layout of the design notes: experiment per preset, parent run per
invocation, child run per cell. Uses ``MlflowClient`` with explicit run ids (no fluent global
state), so a parent and its children can be written from one process or from several workers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.store.claims import Claim, Owner
from harness.store.client import open_client, sqlite_path
from harness.store.dashboard import CELLS_VIEW_TAG, cells_view_tag
from reports import schema
from reports.schema import (
    CELL_ID_TAG,
    CELLS_FILTER,
    CLAIM_TAG,
    END_STATE,
    HEARTBEAT_TAG,
    LOST_TAG,
    OWNER_TAG,
    REASON_TAG,
    RUNNING,
    STATUS_TAG,
    CellStatus,
    RunState,
)

if TYPE_CHECKING:
    from mlflow.entities import Experiment, Run
    from mlflow.tracking import MlflowClient

    from harness.matrix import Cell
    from harness.store.checkpoint import Checkpoints

__all__ = ["Tracker", "default_home", "home_uri", "resolve_tracking_uri"]

HOME_ENV = "SPARSEBENCH_HOME"
EXPERIMENT_PREFIX = "sparsebench-"


def default_home() -> Path:
    return Path(os.environ.get(HOME_ENV, "sparsebench-runs")).resolve()


def home_uri(home: Path) -> str:
    """The sqlite store a sparsebench home holds."""
    return f"sqlite:///{home / 'mlflow.db'}"


def resolve_tracking_uri(cli_uri: str | None) -> str:
    """``--tracking-uri`` > ``MLFLOW_TRACKING_URI`` > sqlite store under the sparsebench home."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return home_uri(default_home())


def _git_sha() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return "none"
    return out.stdout.strip() if out.returncode == 0 else "none"


def _cpu() -> str:
    """The CPU model and how many cores this process may use: a wall time means little without it."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} ({cores} cores)"


def environment_tags(device: str) -> dict[str, str]:
    """Versions and device, logged on every cell so a number can be traced to its software."""
    import mlflow
    import torch

    return {
        schema.DEVICE_TAG: device,
        schema.TORCH_TAG: torch.__version__,
        schema.CUDA_TAG: torch.version.cuda or "none",
        schema.GPU_TAG: torch.cuda.get_device_name() if device.startswith("cuda") else "none",
        schema.CPU_TAG: _cpu(),
        schema.PYTHON_TAG: platform.python_version(),
        schema.MLFLOW_TAG: mlflow.__version__,
        schema.GIT_SHA_TAG: _git_sha(),
    }


def _cells_view() -> str:
    return cells_view_tag(int(time.time() * 1000))


def _lease_tags(owner: Owner) -> dict[str, str]:
    return {OWNER_TAG: owner.token, HEARTBEAT_TAG: f"{time.time():.3f}"}


class Tracker:
    """The store a matrix run writes into; opened (and checked) only after the config has been
    validated, so a bad config never touches it."""

    def __init__(self, uri: str, *, create: bool = True, artifact_root: str | None = None) -> None:
        """``artifact_root``: where a local store keeps artifacts, for a tracker that reaches that
        store through a server (``harness.store.server``); by default found beside a sqlite file."""
        self.client: MlflowClient = open_client(uri, create=create, write=True)
        self.uri = uri
        db = sqlite_path(uri)
        if artifact_root is None and db is not None:
            artifact_root = (db.resolve().parent / "artifacts").as_uri()
        self.artifact_root = artifact_root

    def experiment(self, preset: str) -> str:
        """The experiment for a preset, created as a model-training experiment on first use."""
        from mlflow.exceptions import MlflowException

        name = EXPERIMENT_PREFIX + preset
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            self.offer_cells_view(found)
            return found.experiment_id
        try:
            return self.client.create_experiment(
                name,
                artifact_location=f"{self.artifact_root}/{name}" if self.artifact_root else None,
                tags={
                    "mlflow.experimentKind": "custom_model_development",
                    schema.PRESET_TAG: preset,
                    CELLS_VIEW_TAG: _cells_view(),  # the dashboard's "Views" menu offers the cells
                },
            )
        except MlflowException:  # another launcher created it a moment ago
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def offer_cells_view(self, experiment: Experiment) -> None:
        """Add the saved view of the cells to an experiment from before it (``harness.store.dashboard``)."""
        if CELLS_VIEW_TAG not in experiment.tags:
            self.client.set_experiment_tag(experiment.experiment_id, CELLS_VIEW_TAG, _cells_view())

    def start_parent(self, experiment_id: str, preset: str, n_cells: int, owner: Owner) -> str:
        run = self.client.create_run(
            experiment_id,
            run_name=f"{preset} {time.strftime('%Y-%m-%d %H:%M:%S')}",
            tags={
                schema.ROLE_TAG: schema.MATRIX,
                schema.PRESET_TAG: preset,
                schema.CELLS_TAG: str(n_cells),
                **_lease_tags(owner),
            },
        )
        return run.info.run_id

    def finished_cells(self, experiment_id: str, retry: Collection[str] = ()) -> set[str]:
        """Cell ids whose latest run ended FINISHED, except those whose status tag is in ``retry``
        (``diverged``, ``n/a``); the rest are skipped unless ``--force``."""
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=CELLS_FILTER,
            order_by=["attributes.start_time DESC"],
            max_results=50000,
        )
        latest: dict[str, tuple[str, str]] = {}
        for run in runs:
            cell_id = run.data.tags.get(CELL_ID_TAG)
            if cell_id and cell_id not in latest:
                latest[cell_id] = (run.info.status, run.data.tags.get(STATUS_TAG, ""))
        return {
            cid for cid, (status, tag) in latest.items() if status == "FINISHED" and tag not in retry
        }

    def stored_sources(self, experiment_id: str, cell_ids: Collection[str]) -> dict[str, dict[str, str]]:
        """Cell id -> ``{"task"/"estimator": source hash}`` recorded by the latest run of each of
        ``cell_ids`` (runs from before source hashes were recorded give none)."""
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=CELLS_FILTER,
            order_by=["attributes.start_time DESC"],
            max_results=50000,
        )
        found: dict[str, dict[str, str]] = {}
        for run in runs:
            cell_id = run.data.tags.get(CELL_ID_TAG)
            if cell_id in cell_ids and cell_id not in found:
                found[cell_id] = {
                    key.removeprefix(schema.CODE_SRC_TAG_PREFIX): value
                    for key, value in run.data.tags.items()
                    if key.startswith(schema.CODE_SRC_TAG_PREFIX)
                }
        return found

    def start_cell(
        self, experiment_id: str, parent_id: str, cell: Cell, tags: Mapping[str, str], claim: Claim
    ) -> str:
        run = self.client.create_run(
            experiment_id,
            run_name=cell.name,
            tags={
                "mlflow.parentRunId": parent_id,
                OWNER_TAG: claim.owner,
                CLAIM_TAG: str(claim.generation),
                HEARTBEAT_TAG: f"{time.time():.3f}",
                schema.ROLE_TAG: schema.CELL,
                CELL_ID_TAG: cell.cell_id,
                schema.TASK_TAG: cell.task,
                schema.VARIANT_TAG: cell.variant,
                schema.ESTIMATOR_TAG: cell.estimator,
                schema.SEED_TAG: str(cell.seed),
                schema.SWEEP_TAG: cell.sweep,
                **_trial_tags(cell),
                schema.KIND_TAG: cell.kind or schema.NA,
                **{schema.CODE_TAG_PREFIX + role: version for role, version in cell.code.items()},
                **{schema.CODE_SRC_TAG_PREFIX + role: src for role, src in cell.sources.items()},
                STATUS_TAG: RUNNING,
                **tags,
            },
        )
        run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(f"task.{k}", _short(v)) for k, v in cell.task_params.items()]
        params += [Param(f"estimator.{k}", _short(v)) for k, v in cell.estimator_params.items()]
        params.append(Param("seed", str(cell.seed)))
        self.client.log_batch(run_id, params=params)
        self.log_json(run_id, "config.json", {"name": cell.name, "cell_id": cell.cell_id, **cell.resolved()})
        return run_id

    def adopt_cell(self, run: Run, parent_id: str, tags: Mapping[str, str], claim: Claim) -> str:
        """Take an unfinished cell run over for a resume: new owner, claim and parent, RUNNING."""
        run_id = run.info.run_id
        resumes = int(run.data.tags.get(schema.RESUMES_TAG, "0")) + 1
        self.set_tags(
            run_id,
            {
                **tags,
                "mlflow.parentRunId": parent_id,
                OWNER_TAG: claim.owner,
                CLAIM_TAG: str(claim.generation),
                HEARTBEAT_TAG: f"{time.time():.3f}",
                STATUS_TAG: RUNNING,
                schema.RESUMES_TAG: str(resumes),
            },
        )
        if LOST_TAG in run.data.tags:  # resumed: a later failure is the cell's own again
            self.client.delete_tag(run_id, LOST_TAG)
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def logged_metrics(self, run_id: str) -> dict[str, dict[int, float]]:
        """key -> step -> value of everything a run has logged (for a resume not to log twice)."""
        keys = self.client.get_run(run_id).data.metrics
        return {key: {m.step: m.value for m in self.client.get_metric_history(run_id, key)} for key in keys}

    def log_metrics(self, run_id: str, rows: list[tuple[int, dict[str, float]]]) -> None:
        """One ``log_batch`` for many steps' worth of metrics."""
        if not rows:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for step, values in rows for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's per-batch metric limit
            self.client.log_batch(run_id, metrics=metrics[i : i + 1000])

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_dataset(self, run_id: str, provenance: Mapping[str, str]) -> None:
        """The cell's data as an MLflow dataset input (the dashboard's Dataset column).

        Built from the task's ``data.*`` provenance: name ``data.name`` (else ``data.source``),
        digest a hash of every ``data.*`` tag (so the same name over other digits differs),
        source the folder read, profile the sizes. Nothing is logged without ``data.source``.
        """
        if "data.source" not in provenance:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        data = {k: v for k, v in sorted(provenance.items()) if k.startswith("data.")}
        digest = hashlib.sha256(json.dumps(data).encode()).hexdigest()[:12]
        profile = {k.removeprefix("data."): v for k, v in data.items() if k.endswith("_size")}
        dataset = Dataset(
            name=data.get("data.name", data["data.source"]),
            digest=digest,
            source_type="local",
            source=json.dumps({"uri": data.get("data.root", data["data.source"])}),
            profile=json.dumps(profile),
        )
        context = InputTag(key="mlflow.data.context", value="training")
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[context])])

    def log_json(self, run_id: str, name: str, payload: Any) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
            self.client.log_artifact(run_id, str(path))

    def log_text(self, run_id: str, name: str, text: str) -> None:
        self.client.log_text(run_id, text, name)

    def log_dir(self, run_id: str, local_dir: Path, artifact_path: str) -> None:
        if any(local_dir.iterdir()):
            self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def end(self, run_id: str, status: RunState) -> None:
        """``status`` is MLflow's: FINISHED, FAILED or KILLED."""
        self.client.set_terminated(run_id, status=status)

    def end_run(
        self,
        run_id: str,
        status: CellStatus,
        reason: str = "",
        *,
        lost: bool = False,
        checkpoints: Checkpoints | None = None,
    ) -> None:
        """End a cell (or matrix) run, the one way: its status (and why), the MLflow state that status maps
        to, then its checkpoint pruned (``checkpoints``) or kept for a resume (``None``).
        ``lost``: its worker died under it, so it ends failed yet resumable."""
        tags: dict[str, str] = {STATUS_TAG: status}
        if reason:
            tags[REASON_TAG] = reason
        if lost:
            tags[LOST_TAG] = "1"
        self.set_tags(run_id, tags)
        self.end(run_id, END_STATE[status])
        if checkpoints is not None:
            checkpoints.prune(run_id)


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:6000]


def _trial_tags(cell: Cell) -> dict[str, str]:
    """A tuning trial's tags (``reports.schema.TRIAL_TAG`` and kin); none for other cells."""
    if cell.trial is None:
        return {}
    return {
        schema.TRIAL_TAG: str(cell.trial),
        schema.TRIAL_VALUES_TAG: json.dumps(cell.trial_values, sort_keys=True),
        schema.TUNING_TAG: cell.tuning,
    }
