"""The store or the disk failing under a real ``sparsebench run`` process: one line naming the
cause and what to rerun, exit code 3, no traceback; the next run resumes from the checkpoint.

Each trial starts the CLI in its own process with slowed steps (the ``sparse_probe`` estimator),
waits for the cell's first checkpoint and then breaks the store: deletes its file, fills its disk
(a 48 MiB tmpfs), or makes its folder read-only (a read-only bind mount: root ignores file modes).
The last two need root to mount; elsewhere they skip, saying so.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cli import main

ARGS = [
    "run", "--task", "identity", "--estimator", "sparse_probe", "--plugin", "sb_probe",
    "--set", "tasks.identity.variants=[{n = 8}]",
    "--set", "tuning.trials=0",  # one cell per configuration, no tuning trials
    "--set", "tasks.identity.steps=300",
    "--set", "tasks.identity.eval_every=20",
    "--set", "tasks.identity.eval_samples=200",
    "--checkpoint-steps", "10", "--no-progress", "--threads", "1",
]  # fmt: skip
WAIT_S = 240  # generous: the machine may be busy with other work


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.fixture
def mounted(tmp_path):
    """A folder for a home on which this test may mount (root only); unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small or read-only file system for the store")
    folder = tmp_path / "mnt"
    folder.mkdir()
    yield folder
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for point in reversed([m for m in mounts if m == str(folder) or m.startswith(f"{folder}/")]):
        subprocess.run(["umount", "--lazy", point], capture_output=True)  # this process may hold the store


def _run_until_checkpoint(home: Path, probe: Path, err: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SPARSEBENCH_HOME": str(home), "SB_PROBE_SLEEP": "0.02",
           "PYTHONPATH": os.pathsep.join([str(probe), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    with err.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "harness.cli", *ARGS], env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
    deadline = time.monotonic() + WAIT_S
    while not list((home / "checkpoints").glob("*.pt")):
        assert proc.poll() is None, err.read_text()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    return proc


def _one_line(proc: subprocess.Popen[bytes], err: Path) -> str:
    assert proc.wait(timeout=WAIT_S) == 3, err.read_text()[-3000:]
    lines = err.read_text().strip().splitlines()
    assert len(lines) == 1, lines[:20]  # no traceback, no MLflow log
    assert lines[0].startswith("sparsebench: error: the tracking store sqlite:///")
    assert lines[0].endswith(f"; once fixed, rerun: sparsebench {shlex.join(ARGS)}")
    return lines[0]


def _resumes(home: Path, store_at, capsys, monkeypatch) -> None:
    """The next run marks the cell its dead owner left RUNNING KILLED and resumes it, same run."""
    monkeypatch.setenv("SPARSEBENCH_HOME", str(home))
    store = store_at(home)
    before = store.cell()
    capsys.readouterr()
    assert main(ARGS) == 0
    assert "marked KILLED, its owner is gone" in capsys.readouterr().err
    after = store.cell()
    assert after.info.run_id == before.info.run_id and after.info.status == "FINISHED"
    assert after.data.tags["sparsebench.resumes"] == "1"
    history = store.history(after.info.run_id)
    assert all(len({s for s, _ in pairs}) == len(pairs) for pairs in history.values())  # no step twice
    assert store.checkpoints() == []


def test_a_deleted_store_is_one_line_naming_its_checkpoints(probe, tmp_path, seeded):
    home = seeded(tmp_path / "home")
    proc = _run_until_checkpoint(home, probe, tmp_path / "err")
    (home / "mlflow.db").unlink()
    line = _one_line(proc, tmp_path / "err")
    assert f"its file {home / 'mlflow.db'} was deleted" in line
    assert f"its checkpoints in {home / 'checkpoints'} belong to the runs of the lost store" in line


def test_a_full_disk_is_one_line_and_the_next_run_resumes(
    probe, mounted, seeded, store_at, capsys, tmp_path, monkeypatch
):
    _mount("-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mounted))
    home = seeded(mounted / "home")
    proc = _run_until_checkpoint(home, probe, tmp_path / "err")
    with (mounted / "filler").open("wb") as filler, pytest.raises(OSError):
        while True:
            filler.write(b"\0" * 2**20)
            filler.flush()
    line = _one_line(proc, tmp_path / "err")
    assert "failed mid-run: the disk is full" in line
    assert "unfinished cells keep their last checkpoint" in line
    (mounted / "filler").unlink()
    _resumes(home, store_at, capsys, monkeypatch)


def test_a_store_made_read_only_is_one_line_and_the_next_run_resumes(
    probe, mounted, seeded, store_at, capsys, tmp_path, monkeypatch
):
    home = seeded(mounted / "home")
    proc = _run_until_checkpoint(home, probe, tmp_path / "err")
    _mount("--bind", str(home), str(home))
    for _ in range(100):  # EBUSY while the run has a file open for writing through the new mount
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(home)], capture_output=True).returncode == 0:
            break
        time.sleep(0.01)
    else:
        pytest.fail("could not make the store's folder read-only")
    line = _one_line(proc, tmp_path / "err")
    assert "failed mid-run: the store became read-only" in line
    subprocess.run(["umount", str(home)], check=True)
    _resumes(home, store_at, capsys, monkeypatch)
