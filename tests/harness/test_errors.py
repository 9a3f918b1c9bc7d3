"""Bad input: one line naming the bad thing, exit code 2, and the store untouched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from harness.cli import main

GOOD = ["--task", "identity", "--estimator", "dense", "--set", "tasks.identity.steps=5", "--no-progress",
        "--set", "tuning.trials=0"]  # one cell per configuration, no tuning trials


def _store_state(home):
    db = home / "mlflow.db"
    return db.read_bytes() if db.exists() else None


@pytest.fixture(scope="module")
def recorded_home(tmp_path_factory) -> Path:
    """A home whose store holds one finished run; made once, copied for each test."""
    home = tmp_path_factory.mktemp("recorded") / "home"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPARSEBENCH_HOME", str(home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert main(["run", *GOOD, "--set", "tasks.identity.variants=[{n = 4}]"]) == 0
    return home


@pytest.fixture
def recorded(home, recorded_home):
    """The recorded store in this test's home, to prove failures leave it as it was."""
    shutil.copytree(recorded_home, home)
    return _store_state(home)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "nosuchtask"], "unknown task 'nosuchtask'"),
        (["--estimator", "nosuch"], "unknown estimator 'nosuch'"),
        (["--set", "tasks.identity.nosuchkey=3"], "unknown key 'nosuchkey'"),
        (["--set", "tasks.identity.steps=fast"], "steps = 'fast' should be int"),
        (["--set", "tasks.identity.variants=[{n = -4}]"], "n = -4 must be positive"),
        (["--size", "-8"], "sizes must be positive"),
        (["--set", "bogus.key=1"], "unknown config table 'bogus'"),
        (["--set", "estimators.sparse.a_l=1.5"], "a_l = 1.5 should be int"),
        (["--preset", "nosuchpreset"], "unknown preset 'nosuchpreset'"),
        (
            ["--plugin", "sb_no_such_module"],
            "plugin 'sb_no_such_module' (module sb_no_such_module) failed to import",
        ),
        (["--set", "tasks.identity.lr=nan"], "lr = nan must be a finite number"),
        (["--set", "tasks.identity.lr=inf"], "lr = inf must be a finite number"),
        (["--set", "tasks.identity.lr=-inf"], "lr = -inf must be a finite number"),
        (["--set", "tasks.identity.eval_every=0"], "eval_every = 0 must be positive"),
        (["--set", "tasks.identity.steps=0"], "steps = 0 must be positive"),
        (["--set", "tasks.identity.snapshots=[0, -5]"], "snapshots = -5 must not be negative"),
        (
            ["--estimator", "sparse", "--set", "estimators.sparse.a_l=0", "--set", "estimators.sparse.a_g=0"],
            "[estimators.sparse]: a_l = a_g = 0 samples nothing",
        ),
        (["--set", "estimators.sparse.tau=0.0"], "tau = 0.0 must be positive"),
        (["--set", "estimators.reinforce.baseline_decay=1.0"], "baseline_decay = 1.0 must be below 1"),
        (["--set", "estimators.gumbel_sinkhorn.temperature=nan"], "temperature = nan must be a finite"),
        (["--set", "estimators.sparse.region=[0, 2]"], "region = [0, 2] must list positive integers"),
        (["--set", "matrix.tasks=[]"], "[matrix] tasks is empty"),
        (["--set", "matrix.estimators=[]", "--estimator", "dense"], "[matrix] estimators is empty"),
        (["--set", "matrix.seeds=[]"], "[matrix] seeds is empty"),
        (["--set", "tasks.identity.variants=[]"], "[tasks.identity] variants is empty"),
        (["--set", "matrix=3"], "[matrix] must be a table"),
        (["--set", "overrides=[1]"], "[[overrides]] must be a list of tables"),
        (["--set", "overrides=[{match = {task = 'identity'}, task = {lr = -1}}]"], "lr = -1.0 must be"),
        (["--set", "overrides=[{sweep = {'task.lr' = []}}]"], "sweep 'task.lr' must be a non-empty list"),
        (["--task", ""], "argument --task: '' is empty"),
        (["--estimator", ""], "argument --estimator: '' is empty"),
        (["--seeds", ""], "argument --seeds: '' is empty"),
        (["--size", ""], "argument --size: '' is empty"),
        (["--seeds", "a,b"], "argument --seeds: 'a,b' is not a comma-separated list of integers"),
        (["--seeds", "-1"], "[matrix] seeds = [-1] must be a list of integers in [0, 2**32)"),
        (["--seeds", "4294967296"], "seeds = [4294967296] must be a list of integers in [0, 2**32)"),
        (["--set", "tasks.identity.steps=9223372036854775808"], "does not fit in 64 bits"),
        (["--threads", "-1"], "argument --threads: '-1' must be >= 0"),
        (["--checkpoint-minutes", "nan"], "argument --checkpoint-minutes: 'nan' must be >= 0"),
        (["--checkpoint-minutes", "0", "--checkpoint-steps", "0"], "give at least one interval"),
        (["--stale-after", "0"], "argument --stale-after: '0' must be > 0"),
        (["--device", "tpu"], "--device 'tpu': choose auto, cpu or cuda"),
        (["--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["--tracking-uri", "bogus://x"], "tracking URI 'bogus://x': unsupported store"),
        (["--tracking-uri", "sqlite://relative.db"], "write a sqlite store as sqlite:///"),
        (["--tracking-uri", ""], "argument --tracking-uri: '' is empty; give a store or drop the option"),
        (
            ["--set", "overrides=[{match = {nosuch_param = 3}, task = {lr = 0.1}}]"],
            "match: 'nosuch_param' is not a task parameter of any task, so it would match no cell",
        ),
        (
            ["--set", "tasks.identity.variants=[{n = 100000000000000}]"],
            "identity/n=100000000000000/dense: batch_size = 64 with n = 100000000000000 needs a 64 x "
            "100000000000000 float32 tensor",
        ),
        (
            ["--set", "tasks.identity.batch_size=100000000000000"],
            "batch_size = 100000000000000 with n = 8 needs a 100000000000000 x 8 float32 tensor",
        ),
        (["--size", "999"], "--size 999: no variant of identity has that size; the sizes configured are 8"),
    ],
)
def test_bad_input_exits_2_and_leaves_the_store_alone(recorded, home, capsys, args, message):
    capsys.readouterr()
    assert main(["run", *GOOD, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1
    assert _store_state(home) == recorded


def test_unreachable_tracking_server_is_a_usage_error(home, capsys):
    code = main(["run", *GOOD, "--tracking-uri", "http://127.0.0.1:9"])
    assert code == 2
    err = capsys.readouterr().err
    assert "tracking server http://127.0.0.1:9 is unreachable" in err
    assert not (home / "mlflow.db").exists()


def test_cuda_requested_without_gpu(home, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["run", *GOOD, "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_backend_ray_without_ray_installed_names_the_extra(recorded, home, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as on an install without the extra
    assert main(["run", *GOOD, "--backend", "ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "sparsebench: error: --backend ray needs Ray: pip install 'sparsebench[ray]' (or pip install ray)"
    ]
    assert _store_state(home) == recorded


def test_argparse_errors_are_one_line(capsys):
    assert main(["run", "--seeds"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "sparsebench: error: sparsebench run: argument --seeds: expected one argument (see --help)"
    ]
    assert main(["frobnicate"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["--help"]) == 0


@pytest.fixture
def config_file(tmp_path):
    def write(data: bytes):
        path = tmp_path / "my.toml"
        path.write_bytes(data)
        return path

    return write


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p, w: p, "is a folder; give a TOML file"),
        (lambda p, w: w(b"[matrix]\ntasks = ['identity'\n"), "is not valid TOML"),
        (lambda p, w: w(b"[matrix]\n# caf\xe9\n"), "is not UTF-8 text (byte 14)"),
        (lambda p, w: p / "absent.toml", "does not exist"),
    ],
    ids=["folder", "toml", "utf8", "absent"],
)
def test_bad_config_files_exit_2(recorded, home, tmp_path, config_file, capsys, make, message):
    path = make(tmp_path, config_file)
    capsys.readouterr()
    assert main(["run", *GOOD, "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(path) in err[0]
    assert _store_state(home) == recorded


@pytest.mark.parametrize("command", [["run", *GOOD], ["report"]])
def test_a_corrupt_store_is_one_line(home, capsys, command):
    home.mkdir()
    (home / "mlflow.db").write_bytes(b"this is not a database" * 100)
    assert main(command) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not an sqlite database" in err[0]
    assert (home / "mlflow.db").read_bytes() == b"this is not a database" * 100


def test_a_store_that_is_a_folder_is_one_line(home, capsys):
    (home / "mlflow.db").mkdir(parents=True)
    assert main(["run", *GOOD]) == 2
    assert "is a folder, not an sqlite database file" in capsys.readouterr().err


def test_report_against_a_dead_server_fails_within_seconds(home, capsys):
    start = time.monotonic()
    assert main(["report", "--tracking-uri", "http://127.0.0.1:9"]) == 2
    assert time.monotonic() - start < 15
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tracking server http://127.0.0.1:9 is unreachable" in err[0]


SETUP_FAILS = """
from harness.errors import UsageError
from harness.hookspecs import hookimpl
from plugins.identity import IdentityTask


class NoData(IdentityTask):
    name = "nodata"

    def setup(self, cell):
        raise UsageError("nodata: the data folder /nowhere holds no digits")


@hookimpl
def register_tasks(register):
    register(NoData())
"""


def test_a_usage_error_found_in_setup_exits_2_and_marks_the_cell_failed(home, plugin_dir, capsys, store):
    plugin_dir("sb_nodata", SETUP_FAILS)
    args = ["run", "--task", "nodata", "--estimator", "dense", "--plugin", "sb_nodata", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "sparsebench: error: nodata: the data folder /nowhere holds no digits"
    cell = store.cell()
    assert cell.info.status == "FAILED" and "holds no digits" in cell.data.tags["sparsebench.reason"]
    assert [r.info.status for r in store.runs("matrix")] == ["FAILED"]


NO_SETPRIV = os.geteuid() == 0 and shutil.which("setpriv") is None


@pytest.mark.skipif(NO_SETPRIV, reason="running as root without setpriv to drop privileges")
def test_a_read_only_home_and_an_unreadable_config_are_one_line(monkeypatch):
    """Run as an unprivileged user (root drops to nobody), so that permissions are real. Outside
    pytest's tmp folder, which only root may enter."""
    base = Path(tempfile.mkdtemp(prefix="sparsebench-readonly-"))
    try:
        base.chmod(0o755)
        home = base / "home"
        monkeypatch.setenv("SPARSEBENCH_HOME", str(home))
        assert main(["run", *GOOD]) == 0
        recorded = _store_state(home)
        unreadable = base / "secret.toml"
        unreadable.write_text("[matrix]\n")
        unreadable.chmod(0o000)
        (base / "user").mkdir(mode=0o777)
        (base / "user").chmod(0o777)
        for path in (home / "mlflow.db", home):
            path.chmod(0o444 if path.is_file() else 0o555)
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        env = {**os.environ, "SPARSEBENCH_HOME": str(home), "HOME": str(base / "user")}
        for args, message in [
            (["run", *GOOD], "is read-only"),
            (["run", *GOOD, "--config", str(unreadable)], "is not readable (permission denied)"),
        ]:
            proc = subprocess.run([*prefix, sys.executable, "-m", "harness.cli", *args], env=env,
                                  capture_output=True, text=True, timeout=300)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
        assert _store_state(home) == recorded
    finally:
        for path in base.rglob("*"):
            path.chmod(0o700)
        shutil.rmtree(base)
