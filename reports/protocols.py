"""``docs/protocols.md`` as data: one ``Row`` per setting of a protocol preset, and the checks that
keep the document, the presets and the runs in a store in step.

The row format is fixed by the document's "Format" section: ``| preset | cells | setting | ours |
source | deviation |``. A cell is handed in as a plain mapping (so this module needs neither the
harness nor MLflow): ``name``, ``task``, ``estimator``, ``seed`` and every resolved parameter as
``task.<name>`` / ``estimator.<name>``. ``tests/docs/test_protocols.py`` feeds it the presets'
resolved cells; the report feeds it the cells of a store, read back from their logged params.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

__all__ = [
    "DOCUMENT",
    "HEADER",
    "Departure",
    "ProtocolError",
    "Row",
    "check_rows",
    "covers",
    "departures",
    "deviations",
    "format_value",
    "load",
    "logged_value",
    "parse",
    "uncovered",
]

#: The document in a source checkout (``reports/`` and ``docs/`` are siblings).
DOCUMENT = Path(__file__).resolve().parent.parent / "docs" / "protocols.md"
HEADER = ("preset", "cells", "setting", "ours", "source", "deviation")
SEEDS = "seeds"
_FILTER = re.compile(r'([\w.]+)=(\[[^\]]*\]|"[^"]*"|\S+)')


class ProtocolError(ValueError):
    """A malformed row or table; the message names the line."""


@dataclass(frozen=True)
class Row:
    """One setting of one preset's cells, as the document states it."""

    line: int  # 1-based line number in the document
    section: str  # the "## " heading the row sits under
    preset: str
    cells: str  # as written: "*" or the filters
    filters: tuple[tuple[str, Any], ...]  # () = every cell ("*")
    setting: str  # "task.<name>", "estimator.<name>" or "seeds"
    values: tuple[Any, ...]  # one value, or the values of a sweep
    sweep: bool  # "one of [...]": the covered cells hold exactly these values between them
    ours: str  # as written
    source: str
    deviation: str


def _toml(text: str, where: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as e:
        raise ProtocolError(f"{where}: {text!r} is not a TOML literal ({e})") from None


def _strip(text: str) -> str:
    text = text.strip()
    return text[1:-1].strip() if len(text) >= 2 and text[0] == text[-1] == "`" else text


def _filters(text: str, where: str) -> tuple[tuple[str, Any], ...]:
    text = _strip(text)
    if text == "*":
        return ()
    found = _FILTER.findall(text)
    if not found or _FILTER.sub("", text).strip():
        raise ProtocolError(f"{where}: cells {text!r}: expected * or key=value filters")
    out = []
    for key, raw in found:
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare word (task=identity) is a string
        out.append((key, value))
    return tuple(out)


def _row(cols: list[str], line: int, section: str) -> Row:
    where = f"docs/protocols.md line {line}"
    preset, cells, setting, ours, source, deviation = (c.strip() for c in cols)
    setting = _strip(setting)
    if not (setting == SEEDS or re.fullmatch(r"(task|estimator)\.\w+", setting)):
        raise ProtocolError(f"{where}: setting {setting!r}: expected task.<name>, estimator.<name> "
                            "or seeds")
    text = _strip(ours)
    sweep = text.startswith("one of ")
    value = _toml(text.removeprefix("one of "), where)
    if sweep and not isinstance(value, list):
        raise ProtocolError(f"{where}: 'one of' takes a list, got {text!r}")
    if not source:
        raise ProtocolError(f"{where}: every row names its source (or `ours`)")
    return Row(line, section, _strip(preset), _strip(cells), _filters(cells, where), setting,
               tuple(value) if sweep else (value,), sweep, text, source, deviation)


def parse(text: str) -> list[Row]:
    """Every row of every protocol table in ``text``; raises ``ProtocolError`` naming the line."""
    rows: list[Row] = []
    section, in_table = "", False
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("## "):
            section = line[3:].strip()
        if not line.startswith("|"):
            in_table = False
            continue
        cols = [c.strip() for c in line.strip().strip("|").split("|")]
        if not in_table:
            if tuple(cols) != HEADER:
                raise ProtocolError(f"docs/protocols.md line {number}: a table must start with "
                                    f"the header | {' | '.join(HEADER)} |")
            in_table = True
            continue
        if all(set(c) <= set("-: ") for c in cols):
            continue  # the |---|---| line
        if len(cols) != len(HEADER):
            raise ProtocolError(f"docs/protocols.md line {number}: {len(cols)} columns, expected "
                                f"{len(HEADER)} (a '|' inside a cell?)")
        rows.append(_row(cols, number, section))
    return rows


def load(path: Path | None = None) -> list[Row]:
    """The rows of ``path`` (default: ``DOCUMENT``)."""
    return parse((path or DOCUMENT).read_text(encoding="utf-8"))


def format_value(value: Any) -> str:
    """A value as the document writes it (a TOML literal)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


def logged_value(text: str) -> Any:
    """A parameter back from its MLflow string (``json`` for lists, ``str`` for the rest)."""
    if text in ("True", "False"):
        return text == "True"
    try:
        return json.loads(text)
    except ValueError:
        return text


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps ``True`` apart from ``1`` and compares lists element by element."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def covers(row: Row, cell: Mapping[str, Any]) -> bool:
    """Whether ``row``'s filters all hold for ``cell``."""
    return all(key in cell and _same(cell[key], want) for key, want in row.filters)


def _values(row: Row, cells: Sequence[Mapping[str, Any]]) -> list[Any]:
    key = "seed" if row.setting == SEEDS else row.setting
    return [c.get(key, _MISSING) for c in cells]


_MISSING = object()


def _distinct(values: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if not any(_same(v, u) for u in out):
            out.append(v)
    return out


def check_rows(rows: Iterable[Row], cells_by_preset: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """Problems with ``rows`` against each preset's runnable cells; empty when all hold.

    A row must cover at least one cell; its setting must be a parameter of every covered cell; a
    plain row's value must be every covered cell's; a sweep's values must be exactly the values
    the covered cells hold; ``seeds`` must be exactly the covered cells' seeds.
    """
    problems = []
    for row in rows:
        where = f"line {row.line} ({row.preset}: {row.cells} {row.setting})"
        if row.preset not in cells_by_preset:
            problems.append(f"{where}: preset {row.preset!r} was not resolved")
            continue
        covered = [c for c in cells_by_preset[row.preset] if covers(row, c)]
        if not covered:
            problems.append(f"{where}: covers no runnable cell")
            continue
        values = _values(row, covered)
        if any(v is _MISSING for v in values):
            problems.append(f"{where}: not a setting of {covered[values.index(_MISSING)]['name']}")
            continue
        have = _distinct(values)
        if row.setting == SEEDS:
            want = row.values[0] if isinstance(row.values[0], list) else [row.values[0]]
            ok = sorted(have) == sorted(want)
        elif row.sweep:
            ok = len(have) == len(row.values) and all(any(_same(h, w) for w in row.values) for h in have)
        else:
            ok = all(_same(h, row.values[0]) for h in have)
        if not ok:
            shown = ", ".join(format_value(v) for v in have[:6])
            problems.append(f"{where}: the document says {row.ours}, the cells hold {shown}")
    return problems


def uncovered(rows: Iterable[Row], preset: str, cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """``"<cell name>: <setting>"`` for every setting of every cell that no row of ``preset``
    covers (the settings are the cell's ``task.*`` / ``estimator.*`` keys, and ``seeds``)."""
    rows = [r for r in rows if r.preset == preset]
    missing = []
    for cell in cells:
        settings = [k for k in cell if k.startswith(("task.", "estimator."))] + [SEEDS]
        for setting in settings:
            if not any(r.setting == setting and covers(r, cell) for r in rows):
                missing.append(f"{cell['name']}: {setting}")
    return missing


def deviations(rows: Iterable[Row], presets: Iterable[str]) -> list[Row]:
    """The rows of ``presets`` that state a deliberate difference from their source."""
    wanted = set(presets)
    return [r for r in rows if r.preset in wanted and r.deviation]


@dataclass(frozen=True)
class Departure:
    """Cells of a store whose setting differs from the document's (a ``--set``, an accepted
    stand-in dataset, an older preset): the setting, the value they held and how many."""

    row: Row
    value: Any
    cells: int


def departures(rows: Iterable[Row], preset: str, cells: Sequence[Mapping[str, Any]]) -> list[Departure]:
    """Where ``cells`` (run under ``preset``) hold a value other than a plain row's."""
    counts: Counter[tuple[int, str]] = Counter()
    by_line: dict[int, Row] = {}
    values: dict[tuple[int, str], Any] = {}
    for row in rows:
        if row.preset != preset or row.sweep or row.setting == SEEDS:
            continue
        for cell in cells:
            have = cell.get(row.setting, _MISSING)
            if covers(row, cell) and have is not _MISSING and not _same(have, row.values[0]):
                key = (row.line, format_value(have))
                counts[key] += 1
                by_line[row.line], values[key] = row, have
    return [Departure(by_line[line], values[(line, v)], n) for (line, v), n in sorted(counts.items())]
