"""MLflow store -> tidy pandas frame -> seaborn figures, tables and an HTML index.

Only the light plugin-facing types are exported here, so that figure plugins can import them at
start-up; the report itself is ``reports.build.build_report``, imported by the report command.
"""

from reports.errors import ReportError, StoreReadError
from reports.figure import Figure, FigureEntry, NoFigureData, ReportContext, ReportResult

__all__ = [
    "Figure",
    "FigureEntry",
    "NoFigureData",
    "ReportContext",
    "ReportError",
    "ReportResult",
    "StoreReadError",
]
