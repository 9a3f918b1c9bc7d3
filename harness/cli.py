"""The ``sparsebench`` command: run, list, plugins, check-plugin, report, ui.

Every usage problem (unknown name, bad config, broken plugin, unreachable store, missing data)
ends as one line on stderr and exit code 2, before anything is written to the store.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from harness.errors import UsageError

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_FAILED_CELLS = 1
EXIT_INTERRUPTED = 130


def _csv_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


RETRY = ("diverged", "failed", "n/a")


def _statuses(text: str) -> list[str]:
    statuses = _csv(text)
    bad = [s for s in statuses if s not in RETRY]
    if bad:
        choose = ", ".join(RETRY)
        raise argparse.ArgumentTypeError(f"{bad[0]!r} is not a status to retry; choose from {choose}")
    return statuses


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-p",
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="extra plugin module to load (found in the working folder too), or no:NAME to switch "
        "a plugin off (repeatable; also $SPARSEBENCH_PLUGINS and $SPARSEBENCH_DISABLE_PLUGINS)",
    )
    common.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store or server (default: $MLFLOW_TRACKING_URI, else "
        "sqlite under $SPARSEBENCH_HOME or ./sparsebench-runs)",
    )
    matrix = argparse.ArgumentParser(add_help=False)
    matrix.add_argument(
        "--preset", default="quick", help="shipped preset: quick, paper or neuralsort"
    )
    matrix.add_argument("--config", type=Path, default=None, help="TOML file merged over the preset")
    matrix.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. tasks.identity.steps=200 (repeatable)",
    )
    matrix.add_argument("--task", type=_csv, action="extend", default=[], help="only these tasks")
    matrix.add_argument("--estimator", type=_csv, action="extend", default=[], help="only these estimators")
    matrix.add_argument(
        "--size",
        type=_csv_ints,
        action="extend",
        default=[],
        help="only variants of these sizes (n, or glimpse size)",
    )
    matrix.add_argument("--seeds", type=_csv_ints, default=[], help="seeds to run, e.g. 0,1,2")

    parser = argparse.ArgumentParser(
        prog="sparsebench",
        description="Compare gradient estimators for discrete structure (Bloem et al. 2018).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[common, matrix], help="run the comparison matrix")
    run.add_argument("--dry-run", action="store_true", help="list the cells and stop")
    run.add_argument("--force", action="store_true", help="rerun cells that already finished")
    run.add_argument(
        "--retry",
        type=_statuses,
        default=[],
        metavar="STATUSES",
        help="also rerun cells whose latest run ended with these statuses, e.g. diverged,failed "
        "(failed and interrupted cells are always rerun)",
    )
    run.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    run.add_argument("--no-progress", action="store_true", help="no live progress bars")
    run.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch (default: torch's choice; 1 helps on a busy machine)",
    )
    sub.add_parser("list", parents=[common, matrix], help="tasks, estimators and the cells of a preset")
    sub.add_parser("plugins", parents=[common], help="every plugin, where it came from, what it registered")
    check = sub.add_parser(
        "check-plugin",
        parents=[common],
        help="conformance checks for a plugin's estimators and tasks (exit 1 if any fails)",
    )
    check.add_argument(
        "name",
        nargs="?",
        help="a plugin, one of its estimators or tasks, or its distribution (default: the one --plugin)",
    )
    report = sub.add_parser("report", parents=[common], help="figures and tables from the store")
    report.add_argument(
        "--preset", action="append", default=[], help="report only these presets' experiments (default: all)"
    )
    report.add_argument("--out", type=Path, default=None, help="output folder (default: <home>/report)")
    ui = sub.add_parser("ui", parents=[common], help="serve the MLflow dashboard for the store")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(f"sparsebench: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(
            "sparsebench: interrupted; finished cells are kept, `sparsebench run` resumes the rest",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


def _console():  # -> rich.console.Console
    """A console as wide as the terminal, or 160 columns when output goes to a file or a pipe."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


def _registry(args: argparse.Namespace):  # -> Registry
    """Every plugin loaded; what loading noticed (a module named twice) goes to stderr."""
    from harness import plugins

    registry = plugins.load(args.plugin)
    for warning in registry.warnings:
        print(f"sparsebench: warning: {warning}", file=sys.stderr)
    return registry


def _load(args: argparse.Namespace):  # -> tuple[Registry, list[Cell]]
    from harness import config, matrix

    registry = _registry(args)
    raw = config.load_config(args.preset, args.config, args.sets)
    selection = matrix.Selection(tuple(args.task), tuple(args.estimator), tuple(args.size), tuple(args.seeds))
    return registry, matrix.resolve_cells(raw, registry, selection)


def cmd_run(args: argparse.Namespace) -> int:
    from harness import runner, summary
    from harness.tracking import Tracker, default_home, resolve_tracking_uri

    registry, cells = _load(args)
    device = runner.pick_device(args.device)
    if args.threads < 0:
        raise UsageError(f"--threads {args.threads}: must be 0 (torch's default) or more")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    console = _console()
    if args.dry_run:
        summary.print_cells(console, cells)
        return 0
    uri = resolve_tracking_uri(args.tracking_uri)
    tracker = Tracker(uri)  # unreachable store: a usage error before any training
    cache = default_home() / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]sparsebench[/] {len(cells)} cells on {device} -> {uri}")
    results = runner.run_matrix(
        cells,
        registry,
        tracker,
        args.preset,
        device,
        cache,
        args.force,
        show_progress=not args.no_progress,
        retry=args.retry,
    )
    summary.print_results(console, results)
    experiment_id = tracker.experiment(args.preset)
    summary.print_where(console, uri, experiment_id)
    return EXIT_FAILED_CELLS if any(r.status == "failed" for r in results) else 0


def cmd_list(args: argparse.Namespace) -> int:
    from harness import summary

    registry, cells = _load(args)
    console = _console()
    summary.print_registry(console, registry)
    summary.print_cells(console, cells)
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from harness import summary

    summary.print_plugins(_console(), _registry(args))
    return 0


def cmd_check_plugin(args: argparse.Namespace) -> int:
    from harness import conformance

    registry = _registry(args)
    name = args.name
    if name is None:
        modules = [p for p in args.plugin if not p.startswith("no:")]
        if len(modules) != 1:
            raise UsageError(
                "check-plugin: name the plugin to check (`sparsebench plugins` lists them) "
                "or give exactly one --plugin MODULE"
            )
        name = modules[0]
    report = conformance.check_plugin(registry, name, echo=lambda line: print(line, flush=True))
    return 0 if report.ok else EXIT_FAILED_CELLS


def cmd_report(args: argparse.Namespace) -> int:
    from harness.errors import TrackingError
    from harness.tracking import default_home, resolve_tracking_uri
    from reports.build import build_report
    from reports.errors import ReportError, StoreReadError

    registry = _registry(args)
    uri = resolve_tracking_uri(args.tracking_uri)
    out = args.out or default_home() / "report"
    experiments = [f"sparsebench-{p}" for p in args.preset] or None
    try:
        result = build_report(uri, experiments, out, [r.obj for r in registry.figures])
    except StoreReadError as e:
        raise TrackingError(str(e)) from e
    except ReportError as e:
        raise UsageError(str(e)) from e
    _console().print(f"report: [bold]{result.index_html}[/]")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from harness.tracking import Tracker, resolve_tracking_uri, ui_url

    uri = resolve_tracking_uri(args.tracking_uri)
    tracker = Tracker(uri)
    experiments = [e for e in tracker.client.search_experiments() if e.name.startswith("sparsebench-")]
    for exp in experiments:
        print(f"{exp.name}: {ui_url(args.port, exp.experiment_id, args.host)}")
    if not experiments:
        print(f"no sparsebench experiments in {uri} yet: run `sparsebench run` first")
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        "1",
    ]
    if tracker.artifact_root:
        command += ["--default-artifact-root", tracker.artifact_root]
    print(f"dashboard: {ui_url(args.port, host=args.host)}  (Ctrl-C stops it)", flush=True)
    try:
        # One worker and no background job runners: a local dashboard, not a shared service.
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 0


COMMANDS = {
    "run": cmd_run,
    "list": cmd_list,
    "plugins": cmd_plugins,
    "check-plugin": cmd_check_plugin,
    "report": cmd_report,
    "ui": cmd_ui,
}


if __name__ == "__main__":
    raise SystemExit(main())
