"""Bad input: one line naming the bad thing, exit code 2, and the store untouched."""

from __future__ import annotations

import pytest

from harness.cli import main

GOOD = ["--task", "identity", "--estimator", "dense", "--set", "tasks.identity.steps=5", "--no-progress"]


def _store_state(home):
    db = home / "mlflow.db"
    return db.read_bytes() if db.exists() else None


@pytest.fixture
def recorded(home):
    """A store that already holds one finished run, to prove failures leave it as it was."""
    assert main(["run", *GOOD, "--set", "tasks.identity.variants=[{n = 4}]"]) == 0
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
