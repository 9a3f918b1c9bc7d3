"""Results tied to the code and config that made them: plugin versions in the cell id and tags,
``--retry``, ``Unsupported`` from ``build()`` as n/a, ``"*"`` for every estimator, and report rows
that never pool cells configured differently."""

from __future__ import annotations

import sys

import mlflow

from harness.cli import main
from reports.frame import read_store
from reports.tables import matrix_summary

TINY = [
    "--task", "identity",
    "--set", "tasks.identity.variants=[{n = 4}]",
    "--set", "tuning.trials=0",  # one cell per configuration, no tuning trials
    "--set", "tasks.identity.steps=20",
    "--set", "tasks.identity.eval_every=10",
    "--set", "tasks.identity.eval_samples=100",
    "--no-progress",
]

VERSIONED = """
import torch
from torch import nn
from estimators.base import Estimator, StructureLayer, hookimpl

START = {start}

class Scaled(StructureLayer):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(START))

    def forward(self, x):
        return self.a * x

class Versioned(Estimator):
    name = "versioned"
    description = "W = a I, from a module the test edits"
    kinds = frozenset({{"sparse_matrix"}})

    def build(self, spec, params):
        return Scaled()

@hookimpl
def register_estimators(register):
    register(Versioned())
"""


def _cells(home):
    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["sparsebench-quick"], output_format="pandas")
    return runs[runs["tags.sparsebench.role"] == "cell"]


def test_edited_plugin_code_makes_new_cells_and_report_rows(plugin_dir, home, capsys):
    args = ["run", *TINY, "--estimator", "versioned", "--plugin", "sb_versioned"]
    plugin_dir("sb_versioned", VERSIONED.format(start=0.2))
    assert main(args) == 0
    assert main(args) == 0
    assert "finished earlier" in capsys.readouterr().out  # same code: the result stands
    assert len(_cells(home)) == 1
    plugin_dir("sb_versioned", VERSIONED.format(start=0.5))  # the author edits the estimator
    sys.modules.pop("sb_versioned")
    assert main(args) == 0
    assert "finished earlier" not in capsys.readouterr().out
    cells = _cells(home)
    assert len(cells) == 2 and cells["tags.sparsebench.cell_id"].nunique() == 2
    codes = cells["tags.sparsebench.code.estimator"]
    assert codes.str.startswith("module sb_versioned src:").all() and codes.nunique() == 2
    assert cells["tags.sparsebench.code.task"].str.startswith("sparsebench ").all()
    summary = matrix_summary(read_store(f"sqlite:///{home / 'mlflow.db'}").runs)
    rows = summary[summary["estimator"] == "versioned"]
    assert len(rows) == 2 and (rows["seeds"] == 1).all()
    assert sorted(rows["settings"]) == sorted(f"estimator code: {c}" for c in codes)


def test_report_rows_keep_apart_cells_of_one_seed_with_other_settings(home):
    for steps in (20, 40):
        assert main(["run", *TINY, "--estimator", "dense", "--set", f"tasks.identity.steps={steps}"]) == 0
    summary = matrix_summary(read_store(f"sqlite:///{home / 'mlflow.db'}").runs)
    assert summary[["estimator", "settings", "seeds", "status"]].to_dict("records") == [
        {"estimator": "dense", "settings": "steps=20", "seeds": 1, "status": "1 finished"},
        {"estimator": "dense", "settings": "steps=40", "seeds": 1, "status": "1 finished"},
    ]
    assert not summary["result"].str.contains("seeds").any()  # never "2 seeds, mean ± std"


def test_retry_reruns_diverged_cells(home, third_party, capsys):
    args = ["run", *TINY, "--estimator", "diverging", "--plugin", third_party]
    assert main(args) == 0
    assert main(args) == 0
    assert "finished earlier" in capsys.readouterr().out
    assert len(_cells(home)) == 1
    assert main([*args, "--retry", "diverged,failed"]) == 0
    cells = _cells(home)
    assert len(cells) == 2 and set(cells["tags.sparsebench.status"]) == {"diverged"}


def test_retry_names_only_statuses(home, capsys):
    assert main(["run", *TINY, "--retry", "diverged,oops"]) == 2
    err = capsys.readouterr().err
    assert "argument --retry: 'oops' is not a status to retry; choose from diverged, failed, n/a" in err


UNSUPPORTED_LATE = """
import torch
from estimators.base import Estimator, Unsupported, hookimpl

class Late(Estimator):
    name = "late"
    description = "finds out in build() that it cannot serve the spec"
    kinds = frozenset({"sparse_matrix"})

    def build(self, spec, params):
        raise Unsupported(f"no layer for n={spec.in_shape[0]} after all")

@hookimpl
def register_estimators(register):
    register(Late())
"""


def test_unsupported_raised_by_build_is_na(plugin_dir, home, capsys):
    plugin_dir("sb_late", UNSUPPORTED_LATE)
    assert main(["run", *TINY, "--estimator", "late", "--plugin", "sb_late"]) == 0
    assert "n/a" in capsys.readouterr().out
    cell = _cells(home).iloc[0]
    assert cell["tags.sparsebench.status"] == "n/a" and cell["status"] == "FINISHED"
    assert cell["tags.sparsebench.reason"] == "no layer for n=4 after all"
    summary = matrix_summary(read_store(f"sqlite:///{home / 'mlflow.db'}").runs)
    assert summary["result"].tolist() == ["n/a: no layer for n=4 after all"]


def test_quick_runs_every_installed_estimator(third_party, capsys):
    assert main(["list", "--preset", "quick", "--plugin", third_party, "--set", "tuning.trials=0"]) == 0
    out = capsys.readouterr().out
    for name in ("sparse", "bilinear", "scaled", "exploding"):
        assert f"identity/n=8/{name}/seed=0" in out


def test_star_and_names_together_list_each_estimator_once(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('[matrix]\ntasks = ["identity"]\nestimators = ["dense", "*"]\n')
    assert main(["list", "--config", str(config), "--size", "8", "--set", "tuning.trials=0"]) == 0
    out = capsys.readouterr().out
    assert out.count("identity/n=8/dense/seed=0") == 1
    assert "identity/n=8/sparse/seed=0" in out
