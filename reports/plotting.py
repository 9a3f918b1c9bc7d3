"""Shared plotting set-up for report figures: the Agg backend, one theme, PNG + SVG output.

Imported only inside ``draw`` functions and by ``reports.build``: it pulls in matplotlib.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; must precede the pyplot import

import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

__all__ = [
    "ESTIMATOR_DASHES",
    "ESTIMATOR_MARKERS",
    "dash_name",
    "dashes_for",
    "markers_for",
    "plt",
    "MARKER_NAMES",
    "save",
    "sns",
    "styles_caption",
]

sns.set_theme(context="paper", style="whitegrid")

#: The paper draws the sparse layer solid and REINFORCE dashed; other estimators get other dashes.
ESTIMATOR_DASHES: dict[str, tuple[float, ...] | str] = {
    "sparse": "",
    "reinforce": (5, 2),
    "gumbel_sinkhorn": (1, 1),
    "dense": (3, 1, 1, 1),
    "bilinear": (6, 1, 1, 1, 1, 1),
}
_SPARE_DASHES: list[tuple[float, ...]] = [(2, 2), (4, 1, 1, 1, 1, 1), (8, 2), (1, 3)]


#: A marker per estimator, so that lines of one colour are told apart at a glance.
ESTIMATOR_MARKERS: dict[str, str] = {
    "sparse": "o",
    "reinforce": "v",
    "gumbel_sinkhorn": "s",
    "dense": "D",
    "bilinear": "^",
}
_SPARE_MARKERS: list[str] = ["P", "X", "*", "h", "<", ">"]


def markers_for(estimators: list[str]) -> dict[str, str]:
    """A marker per estimator: the fixed ones for the built-ins, spare ones for the rest."""
    spare = iter(_SPARE_MARKERS * (1 + len(estimators) // len(_SPARE_MARKERS)))
    return {e: ESTIMATOR_MARKERS[e] if e in ESTIMATOR_MARKERS else next(spare) for e in estimators}


def dashes_for(estimators: list[str]) -> dict[str, tuple[float, ...] | str]:
    """A dash pattern per estimator: the paper's for the known ones, spare ones for the rest."""
    spare = iter(_SPARE_DASHES * (1 + len(estimators) // len(_SPARE_DASHES)))
    return {e: ESTIMATOR_DASHES[e] if e in ESTIMATOR_DASHES else next(spare) for e in estimators}


def dash_name(dashes: tuple[float, ...] | str) -> str:
    """A dash pattern in words, for captions: solid, dashed, dotted, dash-dot or dash-dot-dot."""
    if not dashes:
        return "solid"
    on, off = dashes[0::2], dashes[1::2]
    if len(on) == 1:
        return "dotted" if on[0] <= off[0] else "dashed"
    kind = "dash-dot" if len(on) == 2 else "dash-" + "-".join(["dot"] * (len(on) - 1))
    return kind if on[0] > max(on[1:]) else f"{kind} ({'-'.join(f'{v:g}' for v in dashes)})"


#: Markers in words, for captions.
MARKER_NAMES: dict[str, str] = {
    "o": "circles", "v": "triangles down", "s": "squares", "D": "diamonds", "^": "triangles up",
    "P": "pluses", "X": "crosses", "*": "stars", "h": "hexagons", "<": "triangles left",
    ">": "triangles right",
}


def styles_caption(
    estimators: list[str],
    dashes: dict[str, tuple[float, ...] | str],
    markers: dict[str, str] | None = None,
) -> str:
    """``"sparse solid, reinforce dashed, ..."`` (with ``markers``: ``"sparse solid with circles,
    ..."``): the style of every estimator a figure draws, named from the data it draws rather
    than from a fixed list of estimators."""
    def style(e: str) -> str:
        line = dash_name(dashes[e])
        return f"{line} with {MARKER_NAMES.get(markers[e], markers[e])}" if markers else line

    return ", ".join(f"{e} {style(e)}" for e in estimators)


def save(fig: matplotlib.figure.Figure, out_dir: Path, stem: str) -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.svg`` and close the figure (pyplot keeps figures alive)."""
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.svg"]
    fig.savefig(paths[0], dpi=130, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths
