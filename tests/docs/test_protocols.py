"""docs/protocols.md against the presets it covers: every row holds for the resolved cells, and
every setting of every runnable cell has a row, so the document and the presets cannot drift apart.
Plus the parser's own contract on small documents."""

from __future__ import annotations

import re
from typing import Any

import pytest

from harness import config, matrix, plugins
from reports.protocols import (
    DOCUMENT,
    ProtocolError,
    check_rows,
    departures,
    deviations,
    load,
    logged_value,
    parse,
    uncovered,
)

ROWS = load()
PRESETS = sorted({r.preset for r in ROWS})


def as_mapping(cell: matrix.Cell) -> dict[str, Any]:
    """A resolved cell as the protocol checks read it."""
    return {
        "name": cell.name, "task": cell.task, "estimator": cell.estimator, "seed": cell.seed,
        **{f"task.{k}": v for k, v in cell.task_params.items()},
        **{f"estimator.{k}": v for k, v in cell.estimator_params.items()},
    }


@pytest.fixture(scope="module")
def cells_by_preset() -> dict[str, list[dict[str, Any]]]:
    """Each covered preset resolved as `sparsebench run --preset P` resolves it (data not needed)."""
    registry = plugins.load([])
    out = {}
    for preset in PRESETS:
        cells = matrix.resolve_cells(config.load_config(preset), registry)
        out[preset] = [as_mapping(c) for c in cells if c.na_reason is None]
    return out


def test_the_document_covers_shipped_presets_and_parses() -> None:
    assert "paper" in PRESETS
    assert set(PRESETS) <= set(config.preset_names())
    assert {r.section for r in ROWS} >= {
        "Identity (§3.1)", "Attention (§3.2)", "Sorting (§3.3)",
        "Sorting, NeuralSort protocol (Grover et al. 2019)",
    }


def test_every_row_holds_for_the_resolved_cells(cells_by_preset) -> None:
    problems = check_rows(ROWS, cells_by_preset)
    assert not problems, "docs/protocols.md disagrees with the presets:\n" + "\n".join(problems)


def _coverage_params() -> list[Any]:
    registry = plugins.load([])
    params = []
    for preset in PRESETS:
        tasks = sorted({c.task for c in matrix.resolve_cells(config.load_config(preset), registry)})
        for task in tasks:
            params.append(pytest.param(preset, task, id=f"{preset}-{task}"))
    return params


@pytest.mark.parametrize(("preset", "task"), _coverage_params())
def test_every_setting_of_every_runnable_cell_has_a_row(cells_by_preset, preset: str, task: str) -> None:
    cells = [c for c in cells_by_preset[preset] if c["task"] == task]
    missing = uncovered(ROWS, preset, cells)
    assert not missing, f"{len(missing)} settings without a row, e.g.:\n" + "\n".join(missing[:20])


SOURCE = re.compile(
    r"^(§\d|A\.\d|Fig\. \d|Table \d|footnote \d|Algorithm \d|sparse-hyper |ours|[A-Z][a-z]+ et al\. \d{4})"
)


def test_sources_are_named_and_deviations_say_why() -> None:
    for row in ROWS:  # the paper's section, the authors' code file, another paper, or ours
        assert SOURCE.match(row.source), f"line {row.line}: source {row.source!r}"
        if row.deviation:  # a deviation says what differs: more than a word
            assert len(row.deviation.split()) >= 4, f"line {row.line}: {row.deviation!r}"
    shown = deviations(ROWS, ["paper"])
    assert shown and all(r.preset == "paper" and r.deviation for r in shown)
    assert not deviations(ROWS, ["quick"])  # quick claims no protocol


DOC = """# title

## Identity

| preset | cells | setting | ours | source | deviation |
|---|---|---|---|---|---|
| paper | `task=identity estimator=sparse` | `task.lr` | `0.005` | A.1 | |
| paper | `task=identity task.n=8` | `estimator.region` | `[3, 3]` | A.1 | |
| paper | * | `seeds` | `[0, 1]` | ours | |
| paper | `task=identity` | `task.n` | `one of [8, 16]` | Fig. 2 | we add 16 for a reason |
| paper | `task=identity` | `estimator.fix_values` | `true` | README | |
"""


def _cell(name: str, n: int, seed: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "task": "identity", "estimator": "sparse", "seed": seed, "task.n": n,
            "task.lr": 0.005, "estimator.region": [3, 3] if n == 8 else [4, 4],
            "estimator.fix_values": True, **extra}


def test_parser_reads_filters_values_sweeps_and_sections() -> None:
    rows = parse(DOC)
    assert [r.line for r in rows] == [7, 8, 9, 10, 11] and {r.section for r in rows} == {"Identity"}
    assert rows[0].filters == (("task", "identity"), ("estimator", "sparse"))
    assert rows[1].filters == (("task", "identity"), ("task.n", 8)) and rows[1].values == ([3, 3],)
    assert rows[2].filters == () and rows[2].cells == "*"
    assert rows[3].sweep and rows[3].values == (8, 16) and rows[3].deviation
    assert rows[4].values == (True,)


def test_checks_catch_wrong_values_missing_rows_and_empty_rows() -> None:
    rows = parse(DOC)
    cells = [_cell("a", 8, 0), _cell("b", 16, 1)]
    assert check_rows(rows, {"paper": cells}) == []
    wrong = [_cell("a", 8, 0), _cell("b", 16, 1, **{"task.lr": 0.01})]
    (problem,) = check_rows(rows, {"paper": wrong})
    assert "line 7" in problem and "0.01" in problem
    assert any("covers no runnable cell" in p for p in check_rows(rows, {"paper": [_cell("b", 16, 1)]}))
    # fix_values = 1 is not true: booleans never equal numbers
    assert check_rows(rows, {"paper": [_cell("a", 8, 0, **{"estimator.fix_values": 1}),
                                        _cell("b", 16, 1)]})
    extra = [_cell("a", 8, 0, **{"task.steps": 10})]
    assert uncovered(rows, "paper", extra) == ["a: task.steps"]
    assert uncovered(rows, "paper", [_cell("b", 16, 1)]) == ["b: estimator.region"]  # n = 8 only
    assert check_rows(rows, {"quick": cells})[0].endswith("was not resolved")


def test_departures_count_cells_that_differ_from_plain_rows() -> None:
    rows = parse(DOC)
    cells = [_cell("a", 8, 0, **{"task.lr": 0.1}), _cell("b", 8, 1, **{"task.lr": 0.1}),
             _cell("c", 16, 0)]
    (dep,) = departures(rows, "paper", cells)
    assert (dep.row.setting, dep.value, dep.cells) == ("task.lr", 0.1, 2)
    assert departures(rows, "quick", cells) == []


HEAD = "| preset | cells | setting | ours | source | deviation |\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("| a | b |", "must start with the header"),
        (HEAD + "| paper | * | lr | `1` | A.1 | |", "expected task.<name>"),
        (HEAD + "| paper | * | task.lr | `0.0.1` | A | |", "not a TOML literal"),
        (HEAD + "| paper | * | task.lr | `1` | | |", "names its source"),
        (HEAD + "| paper | * | task.lr | one of 3 | A | |", "'one of' takes a list"),
        (HEAD + "| paper | task identity | task.lr | 1 | A | |", "expected \\* or key=value"),
        (HEAD + "| paper | * | task.lr | 1 | A |", "5 columns, expected 6"),
    ],
)
def test_malformed_rows_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse(text)


def test_logged_params_read_back_as_the_document_writes_them() -> None:
    """What ``harness.store.tracking`` logs (str, json for lists) compares equal to the TOML values."""
    assert logged_value("True") is True and logged_value("1e-05") == 0.00001
    assert logged_value("[3, 3]") == [3, 3] and logged_value("deepmind") == "deepmind"
    assert logged_value("10000") == 10000 and logged_value("0.005") == 0.005


def test_document_is_where_the_report_looks() -> None:
    assert DOCUMENT.is_file() and DOCUMENT.parent.name == "docs"


#: Issue 22's options: (task, setting, the paper preset's value, the default everything else keeps).
AUTHORS_FORMS = [
    ("identity", "estimator.sigma", "std", "variance"),  # Fig. 2's REINFORCE baseline
    ("sorting", "task.ties", "strict", "any_order"),  # Fig. 6's error
    ("attention", "task.glimpse_eval", "sampled", "rounded"),  # Table 1 / Fig. 4's glimpses
    ("attention", "task.collapse", "drop", "keep"),  # Table 1's seeds (A.1)
    ("attention", "task.loss", "bce", "bce"),  # the paper rules over the authors' double softmax
]


@pytest.mark.parametrize(("task", "setting", "paper", "default"), AUTHORS_FORMS,
                         ids=[f"{t}-{s}" for t, s, _, _ in AUTHORS_FORMS])
def test_paper_selects_the_authors_forms_and_quick_keeps_the_defaults(
    cells_by_preset, task: str, setting: str, paper: str, default: str
) -> None:
    registry = plugins.load([])
    quick = [as_mapping(c) for c in matrix.resolve_cells(config.load_config("quick"), registry)
             if c.na_reason is None]
    for preset, cells, want in (("paper", cells_by_preset["paper"], paper), ("quick", quick, default)):
        held = {c[setting] for c in cells if c["task"] == task and setting in c}
        if setting == "estimator.sigma":  # a reinforce setting: the other estimators lack it
            held = {c[setting] for c in cells if c["task"] == task and c["estimator"] == "reinforce"}
        assert held == {want}, f"{preset}: {task} {setting} = {held}"
    (row,) = [r for r in ROWS if r.preset == "paper" and r.setting == setting
              and ("task", task) in r.filters and r.values == (paper,)]
    if paper != default:  # a departure from our default names the code it follows and why
        assert "sparse-hyper" in row.source or row.source.startswith("A.1"), row.source
        assert row.deviation, f"line {row.line}: the row must say how ours differs"
