"""The tracking store's schema: every tag name, run role and status that sparsebench writes.

The harness writes these and the readers (``reports``, figure plugins) read them, so both sides
import the names from here and agree by import, not by spelling (as MLflow's own
``mlflow_tags.py`` and ``RunStatus``). It lives in ``reports`` because the report must not import
the harness, while the harness may import this light module (no pandas, no MLflow); a store written
by any version of the runner keeps these names, so change one only with a migration in mind.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

__all__ = [
    "CELLS_FILTER",
    "END_STATE",
    "RESUME_TAGS",
    "RETRYABLE",
    "TERMINAL_STATES",
    "CellStatus",
    "Role",
    "RunState",
]

PREFIX: Final = "sparsebench."

# ---- what a run is: its role ---------------------------------------------------------------------
ROLE_TAG: Final = PREFIX + "role"
Role = Literal["matrix", "cell", "claim", "report"]  # a run invocation, one cell, a claim, a report
MATRIX: Final = "matrix"
CELL: Final = "cell"
CLAIM: Final = "claim"
REPORT: Final = "report"
CELLS_FILTER: Final = f"tags.`{ROLE_TAG}` = '{CELL}'"  # MLflow search filter for cell runs

# ---- a cell's status (the status tag) and MLflow's run state -------------------------------------
STATUS_TAG: Final = PREFIX + "status"
REASON_TAG: Final = PREFIX + "reason"  # why a cell is n/a, diverged, failed, or was taken over
CellStatus = Literal["running", "finished", "failed", "diverged", "killed", "n/a"]
RUNNING: Final = "running"
FINISHED: Final = "finished"
FAILED: Final = "failed"
DIVERGED: Final = "diverged"
KILLED: Final = "killed"
NA: Final = "n/a"
CELL_STATUSES: Final[tuple[CellStatus, ...]] = get_args(CellStatus)
RETRYABLE: Final[tuple[CellStatus, ...]] = (DIVERGED, FAILED, NA)  # what ``run --retry`` may rerun

RunState = Literal["RUNNING", "FINISHED", "FAILED", "KILLED"]  # MLflow's run status
TERMINAL_STATES: Final[tuple[RunState, ...]] = ("FINISHED", "FAILED", "KILLED")
#: The MLflow state a cell run ends in for each final status: diverged and n/a cells are results,
#: not errors to retry; a failed cell is an error; a killed one resumes.
END_STATE: Final[dict[CellStatus, RunState]] = {
    FINISHED: "FINISHED",
    NA: "FINISHED",
    DIVERGED: "FINISHED",
    FAILED: "FAILED",
    KILLED: "KILLED",
}

# ---- a cell run: what it is ----------------------------------------------------------------------
CELL_ID_TAG: Final = PREFIX + "cell_id"
TASK_TAG: Final = PREFIX + "task"
VARIANT_TAG: Final = PREFIX + "variant"
ESTIMATOR_TAG: Final = PREFIX + "estimator"
SEED_TAG: Final = PREFIX + "seed"
SWEEP_TAG: Final = PREFIX + "sweep"
#: A tuning trial (``[tuning]``): its index among its estimator's trials, its values as JSON
#: ({"task.lr": 0.003, ...}), and the ruleset it was drawn under as JSON (trials, method, seed, the
#: validation metric and direction that select among the trials). Absent on cells that are no trial.
TRIAL_TAG: Final = PREFIX + "trial"
TRIAL_VALUES_TAG: Final = PREFIX + "trial_values"
TUNING_TAG: Final = PREFIX + "tuning"
KIND_TAG: Final = PREFIX + "kind"
CODE_TAG_PREFIX: Final = PREFIX + "code."  # + "task" / "estimator": the plugin's distribution and version
CODE_SRC_TAG_PREFIX: Final = PREFIX + "code_src."  # + "task" / "estimator": its source hash, release or not
PRIMARY_METRIC_TAG: Final = PREFIX + "primary_metric"  # the test/ metric the report shows
SELECT_METRIC_TAG: Final = PREFIX + "select_metric"  # the val/ metric every selection reads
TARGET_TAG: Final = PREFIX + "target"  # the task's target on a val metric, e.g. "val/mse <= 0"
#: On a cell the stop rule ended early: why ("solved for K evaluations (val/mse <= 0)"); the
#: step is the metric ``summary/stopped_step``, the first step that met the target ``summary/target_step``.
STOPPED_TAG: Final = PREFIX + "stopped"
#: On a cell measured with ``[diagnostics]``: "every=E draws=R". Its metrics are ``grad/all/<stat>``
#: and ``grad/layer/<stat>`` (harness.run.diagnostics) and ``time/diagnostics_s``, at the measured steps.
DIAGNOSTICS_TAG: Final = PREFIX + "diagnostics"
GRAD_METRIC_PREFIX: Final = "grad/"
DIAGNOSTICS_COST: Final = "time/diagnostics_s"  # seconds per measurement; wall clock, so under time/
DATA_TAG_PREFIX: Final = "data."  # a task's data provenance (source, folder, sizes, sha256)

# ---- where and with what it ran ------------------------------------------------------------------
DEVICE_TAG: Final = PREFIX + "device"
TORCH_TAG: Final = PREFIX + "torch"
CUDA_TAG: Final = PREFIX + "cuda"
GPU_TAG: Final = PREFIX + "gpu"
CPU_TAG: Final = PREFIX + "cpu"  # the CPU model and the cores the process could use
PYTHON_TAG: Final = PREFIX + "python"
MLFLOW_TAG: Final = PREFIX + "mlflow"
GIT_SHA_TAG: Final = PREFIX + "git_sha"
THREADS_TAG: Final = PREFIX + "threads"
WORKER_TAG: Final = PREFIX + "worker"  # host:pid of the process that trained it
RESUME_TAGS: Final = (GIT_SHA_TAG, TORCH_TAG, DEVICE_TAG)  # a checkpoint resumes only where these agree

# ---- claims, heartbeat, resumes and checkpoints --------------------------------------------------
CLAIM_TAG: Final = PREFIX + "claim"  # on a cell run: the claim generation it runs under
CLAIM_RUN_PREFIX: Final = CLAIM_TAG  # claim runs are named <this>/<experiment>/<cell id>/<generation>
OWNER_TAG: Final = PREFIX + "owner"
HEARTBEAT_TAG: Final = PREFIX + "heartbeat"
LOST_TAG: Final = PREFIX + "worker_lost"  # set on a run whose worker died: failed, but resumable
RAY_ATTEMPT_TAG: Final = PREFIX + "ray_attempt"  # the claim generation a Ray task last started under
RESUMES_TAG: Final = PREFIX + "resumes"
CHECKPOINT_TAG: Final = PREFIX + "checkpoint"  # where the run's latest checkpoint is
CHECKPOINT_STEP_TAG: Final = PREFIX + "checkpoint_step"
CHECKPOINT_CORRUPT_TAG: Final = PREFIX + "checkpoint_corrupt"  # a checkpoint set aside as unreadable
CHECKPOINT_FORMAT: Final = PREFIX + "checkpoint/1"  # the format id inside every checkpoint file

# ---- the parent (matrix) and report runs ---------------------------------------------------------
PRESET_TAG: Final = PREFIX + "preset"
CELLS_TAG: Final = PREFIX + "cells"  # on a matrix run: how many cells it resolved
REPORT_EXPERIMENTS_TAG: Final = PREFIX + "report.experiments"
REPORT_CELLS_TAG: Final = PREFIX + "report.cells"
