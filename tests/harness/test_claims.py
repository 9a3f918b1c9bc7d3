"""Claims, leases and reconciliation on a real sqlite store: who may run a cell, and when a run's
owner counts as gone."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from harness.cli import main
from harness.matrix import Cell
from harness.store import claims
from harness.store.claims import Owner
from harness.store.lease import Heartbeat
from harness.store.tracking import Tracker, environment_tags
from reports.schema import HEARTBEAT_TAG

ENV = environment_tags("cpu")
CELL = Cell("identity", "n=4", "dense", 0, {"n": 4, "steps": 5, "lr": 0.01}, {})


@pytest.fixture
def tracker(store_home) -> Tracker:
    return Tracker(f"sqlite:///{store_home / 'mlflow.db'}")


@pytest.fixture
def exited() -> Owner:
    """An owner on this host whose process has exited."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return Owner(socket.gethostname(), proc.pid, "gone")


def _acquire(tracker: Tracker, experiment: str, owner: Owner, force: bool = False, stale_s: float = 300.0):
    return claims.acquire(
        tracker.client, experiment, CELL.cell_id, force=force, env_tags=ENV, stale_s=stale_s, owner=owner
    )


def _open(tracker: Tracker, experiment: str, decision, tags=ENV) -> str:
    parent = tracker.start_parent(experiment, "quick", 1, Owner.parse(decision.claim.owner))
    return tracker.start_cell(experiment, parent, CELL, tags, decision.claim)


def test_a_live_claim_keeps_others_out_until_its_run_ends(tracker):
    exp = tracker.experiment("quick")
    first = _acquire(tracker, exp, Owner.me())
    assert (first.action, first.claim.generation) == ("run", 1)
    other = Owner(socket.gethostname(), Owner.me().pid, "another")  # alive: this very process
    assert _acquire(tracker, exp, other).action == "busy"  # claimed, no run yet
    run_id = _open(tracker, exp, first)
    busy = _acquire(tracker, exp, other)
    assert busy.action == "busy" and "running in pid" in busy.reason
    tracker.end(run_id, "FINISHED")
    assert _acquire(tracker, exp, other).action == "skip"
    again = _acquire(tracker, exp, other, force=True)
    assert (again.action, again.claim.generation) == ("run", 2)


def test_a_claim_whose_owner_exited_is_taken_over_and_resumed(tracker, exited):
    exp = tracker.experiment("quick")
    dead = _acquire(tracker, exp, exited)
    run_id = _open(tracker, exp, dead)  # left RUNNING, as after a kill -9
    taken = _acquire(tracker, exp, Owner.me())
    assert (taken.action, taken.claim.generation) == ("resume", 2)
    assert taken.run.info.run_id == run_id


def test_a_changed_environment_starts_a_new_run(tracker, exited):
    exp = tracker.experiment("quick")
    dead = _acquire(tracker, exp, exited)
    _open(tracker, exp, dead, tags={**ENV, "sparsebench.git_sha": "0" * 40})
    taken = _acquire(tracker, exp, Owner.me())
    assert taken.action == "run" and "git_sha changed" in taken.reason


def test_an_owner_on_another_host_is_gone_after_the_stale_limit(tracker):
    exp = tracker.experiment("quick")
    remote = Owner("elsewhere.example", 4242, "r")
    run_id = _open(tracker, exp, _acquire(tracker, exp, remote))
    assert _acquire(tracker, exp, Owner.me(), stale_s=60).action == "busy"  # it beat just now
    tracker.client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time() - 120:.3f}")
    taken = _acquire(tracker, exp, Owner.me(), stale_s=60)
    assert taken.action == "resume" and taken.claim.generation == 2


def test_reconcile_marks_only_runs_whose_owner_is_gone(tracker, exited):
    exp = tracker.experiment("quick")
    dead = _acquire(tracker, exp, exited)
    dead_run = _open(tracker, exp, dead)
    live_parent = tracker.start_parent(exp, "quick", 1, Owner.me())
    notes = claims.reconcile(tracker.client, [exp])
    assert len(notes) == 2  # the dead owner's cell and its parent
    assert all("has exited" in note for note in notes)
    run = tracker.client.get_run(dead_run)
    assert run.info.status == "KILLED"
    assert run.data.tags["sparsebench.status"] == "killed"
    assert run.data.tags["sparsebench.reason"].startswith("owner gone: pid")
    assert tracker.client.get_run(live_parent).info.status == "RUNNING"
    assert claims.reconcile(tracker.client, [exp]) == []
    # the reconciler's claim is released with the run: the cell is free to resume
    assert _acquire(tracker, exp, Owner.me()).action == "resume"


def test_the_heartbeat_stamps_its_runs_and_notices_a_takeover(tracker):
    exp = tracker.experiment("quick")
    mine = _acquire(tracker, exp, Owner.me())
    run_id = _open(tracker, exp, mine)
    before = float(tracker.client.get_run(run_id).data.tags[HEARTBEAT_TAG])
    with Heartbeat(tracker.client, interval_s=0.05) as beat:
        beat.hold(run_id, mine.claim)
        time.sleep(0.5)
        assert float(tracker.client.get_run(run_id).data.tags[HEARTBEAT_TAG]) > before
        assert beat.lost(run_id) is None
        # another process judged this one gone and won the next generation
        assert claims.try_claim(tracker.client, exp, CELL.cell_id, 2, Owner("h", 1, "x")) is not None
        deadline = time.monotonic() + 10
        while beat.lost(run_id) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "taken over by h:1:x" in beat.lost(run_id)


def test_report_reconciles_stale_runs_and_says_so(home, tracker, exited, capsys):
    assert (
        main(
            [
                "run",
                "--task",
                "identity",
                "--estimator",
                "dense",
                "--set",
                "tasks.identity.steps=5",
                "--set",
                "tasks.identity.variants=[{n = 4}]",
                "--set",
                "tuning.trials=0",  # one cell per configuration
                "--no-progress",
            ]
        )
        == 0
    )
    exp = tracker.experiment("quick")
    _open(tracker, exp, _acquire(tracker, exp, exited))
    capsys.readouterr()
    assert main(["report"]) == 0
    err = capsys.readouterr().err
    assert "marked KILLED, its owner is gone: identity/n=4/dense/seed=0" in err
    frame = (home / "report" / "frame.csv").read_text()
    assert "running" not in frame
