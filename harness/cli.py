"""The ``sparsebench`` command: run, list, plugins, check-plugin, report, ui.

Every usage problem (unknown name, bad config, broken plugin, unreachable store, missing data,
a bad command line) ends as one line on stderr and exit code 2, before anything is written to
the store. SIGINT, SIGTERM and SIGHUP end ``run`` with the current cell checkpointed, the cell
and the parent run KILLED, one line naming what to rerun, and exit code 128 + the signal.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from harness.errors import TrackingError, UsageError
from reports.schema import FAILED, RETRYABLE

if TYPE_CHECKING:
    from harness.signals import Interrupted
    from harness.store.faults import StoreLost

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_FAILED_CELLS = 1


def _one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped: an error is one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other usage error (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"sparsebench: error: {_one_line(f'{self.prog}: {message}')} (see --help)\n")


def _csv_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} is empty; give at least one integer")
    return values


def _csv(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} is empty; give at least one name")
    return values


def _number(kind: type, minimum: float, strict: bool = False) -> Callable[[str], int | float]:
    """An argparse type for a finite number >= ``minimum`` (> when ``strict``)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"{text!r} must be {'>' if strict else '>='} {minimum:g}")
        return value

    return parse


def _uri(text: str) -> str:
    """``--tracking-uri``: an empty one (an unset variable in a script) is not "the default"."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is empty; give a store or drop the option")
    return text


def _port(text: str) -> int:
    """A TCP port, 1 to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give 1 to 65535")
    return value


def _jobs(text: str) -> int:
    """``--jobs``: a positive integer, or ``auto`` (0: one per core, or per GPU on CUDA)."""
    if text == "auto":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of jobs; give N >= 1 or auto") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1 (or auto)")
    return value


def _statuses(text: str) -> list[str]:
    statuses = _csv(text)
    bad = [s for s in statuses if s not in RETRYABLE]
    if bad:
        choose = ", ".join(RETRYABLE)
        raise argparse.ArgumentTypeError(f"{bad[0]!r} is not a status to retry; choose from {choose}")
    return statuses


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
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
        type=_uri,
        default=None,
        help="MLflow store or server (default: $MLFLOW_TRACKING_URI, else "
        "sqlite under $SPARSEBENCH_HOME or ./sparsebench-runs)",
    )
    stale = _Parser(add_help=False)
    stale.add_argument(
        "--stale-after",
        type=_number(float, 0.0, strict=True),
        default=5.0,
        metavar="MINUTES",
        help="a RUNNING run whose owner (on another host) has not beaten for this long is marked KILLED "
        "(default 5; an owner on this host whose pid has exited is gone at once)",
    )
    from harness.config import preset_names  # light: tomllib and the presets folder

    matrix = _Parser(add_help=False)
    matrix.add_argument(
        "--preset", default="quick", help=f"shipped preset: {', '.join(preset_names())}"
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
    matrix.add_argument(
        "--data-root",
        type=Path,
        default=None,
        metavar="DIR",
        help="where datasets live: DIR/MNIST/raw, DIR/FashionMNIST/raw (torchvision's layout; "
        "also $SPARSEBENCH_DATA_ROOT)",
    )
    matrix.add_argument(
        "--embedded-digits",
        action="store_true",
        help="accept the 5,000 embedded MNIST digits where a cell asks for MNIST and none is at "
        "hand (such cells are marked: not the paper's 60k/10k)",
    )

    parser = _Parser(
        prog="sparsebench",
        description="Compare gradient estimators for discrete structure (Bloem et al. 2018).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[common, matrix, stale], help="run the comparison matrix")
    run.add_argument("--dry-run", action="store_true", help="list the cells and stop")
    run.add_argument(
        "--params",
        action="store_true",
        help="with --dry-run: each cell's resolved task and estimator parameters and trial values",
    )
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
    run.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress at all (default: live bars on a terminal, a line per cell start, evaluation "
        "and end otherwise)",
    )
    run.add_argument(
        "--threads",
        type=_number(int, 0),
        default=0,
        help="CPU threads for torch per cell (default: torch's choice; with --jobs N, cores / N; "
        "with Ray, the cell's num_cpus; 1 helps on a busy machine)",
    )
    run.add_argument(
        "--jobs",
        type=_jobs,
        default=None,
        metavar="N|auto",
        help="run N cells at once in worker processes on this machine (auto: one per core, or one "
        "per GPU on CUDA); with --backend ray, at most N cells in flight",
    )
    run.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="local: this machine (in this process, or --jobs workers); ray: each cell a Ray task "
        "(pip install 'sparsebench[ray]')",
    )
    run.add_argument(
        "--address",
        default=None,
        help="--backend ray: the cluster to join (auto, HOST:PORT, or ray://HOST:10001 through Ray "
        "Client); default: a Ray instance on this machine for the run",
    )
    run.add_argument(
        "--checkpoint-minutes",
        type=_number(float, 0.0),
        default=10.0,
        metavar="MIN",
        help="checkpoint every cell at least this often (default 10; 0: by steps only)",
    )
    run.add_argument(
        "--checkpoint-steps",
        type=_number(int, 0),
        default=0,
        metavar="N",
        help="also checkpoint every N steps (default 0: by time only)",
    )
    listing = sub.add_parser(
        "list", parents=[common, matrix], help="tasks, estimators and the cells of a preset"
    )
    listing.add_argument(
        "--params",
        action="store_true",
        help="each cell's resolved task and estimator parameters and trial values",
    )
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
    report = sub.add_parser("report", parents=[common, stale], help="figures and tables from the store")
    report.add_argument(
        "--preset", action="append", default=[], help="report only these presets' experiments (default: all)"
    )
    report.add_argument("--out", type=Path, default=None, help="output folder (default: <home>/report)")
    report.add_argument(
        "--results", type=Path, default=None, metavar="PAGE",
        help="write the results page PAGE (e.g. docs/results.md, figures beside it in docs/results/) "
        "instead of the report; reads the stores only",
    )
    report.add_argument(
        "--store", action="append", default=[], metavar="HOME_OR_URI",
        help="with --results: a store to read (a sparsebench home folder or a tracking URI); repeat for "
        "several (default: the --tracking-uri / home store)",
    )
    ui = sub.add_parser("ui", parents=[common], help="serve the MLflow dashboard for the store")
    ui.add_argument("--port", type=_port, default=5000)
    ui.add_argument("--host", default="127.0.0.1")
    return parser


@contextlib.contextmanager
def _data_root(path: Path | None) -> Iterator[None]:
    """``--data-root`` as ``$SPARSEBENCH_DATA_ROOT`` for this command (workers inherit it)."""
    if path is None:  # before importing harness.task, which imports torch: `ui` answers at once
        yield
        return
    from harness.task import DATA_ROOT_ENV

    if not path.expanduser().is_dir():
        raise UsageError(f"--data-root {str(path)!r} is not a directory")
    before = os.environ.get(DATA_ROOT_ENV)
    os.environ[DATA_ROOT_ENV] = str(path.expanduser().resolve())
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(DATA_ROOT_ENV, None)
        else:
            os.environ[DATA_ROOT_ENV] = before


def main(argv: Sequence[str] | None = None) -> int:
    from harness.signals import Interrupted, SignalGuard

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a one-line usage error (2)
        return int(e.code or 0)
    try:
        if args.command == "ui":  # the dashboard server shares the terminal; Ctrl-C stops both
            return _guarded(cmd_ui, args)
        with SignalGuard() as guard:
            args.guard = guard
            return _guarded(COMMANDS[args.command], args)
    except KeyboardInterrupt as e:
        interrupted = e if isinstance(e, Interrupted) else Interrupted()
        print(_interrupted_line(interrupted, args.command, argv), file=sys.stderr)
        return interrupted.exit_code
    except Exception as e:
        from harness.store.faults import EXIT_STORE, store_fault

        lost = store_fault(e)
        if lost is None:
            raise
        print(_one_line(_store_lost_line(lost, args, argv)), file=sys.stderr)
        return EXIT_STORE


def _store_lost_line(lost: StoreLost, args: argparse.Namespace, argv: list[str]) -> str:
    """One line: the store or disk failed; what is kept; what to rerun once it is fixed."""
    from harness.store.client import sqlite_path
    from harness.store.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    db = sqlite_path(uri)
    gone = db is not None and not db.exists()
    cause = lost.cause  # sqlite's words; the file itself says better what happened to it
    if gone:
        cause = f"its file {db} was deleted"
    elif db is not None and not (os.access(db, os.W_OK) and os.access(db.parent, os.W_OK)):
        cause = "the store became read-only"
    line = f"sparsebench: error: the tracking store {uri} failed mid-run: {cause} ({lost.detail})"
    if gone:
        line += (
            f"; its checkpoints in {db.parent / 'checkpoints'} belong to the runs of the lost store "
            "(delete them unless you put the store back)"
        )
    elif args.command == "run":
        line += "; unfinished cells keep their last checkpoint"
    return f"{line}; once fixed, rerun: sparsebench {shlex.join(argv)}"


def _guarded(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        with _data_root(getattr(args, "data_root", None)):
            return command(args)
    except UsageError as e:
        print(f"sparsebench: error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_USAGE


def _interrupted_line(e: Interrupted, command: str, argv: list[str]) -> str:
    """One line: which signal, what was saved, what to rerun."""
    line = f"sparsebench: interrupted by {e.name}"
    if command != "run":
        return line
    saved = f"{e.note} (marked KILLED)" if e.note else "finished cells are kept"
    return f"{line}; {saved}; resume with: sparsebench {shlex.join(argv)}"


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
    cells = matrix.resolve_cells(raw, registry, selection, forced=config.set_layer(args.sets))
    return registry, matrix.check_data(cells, registry, args.embedded_digits)


def _reconcile(tracker, experiment_ids: list[str], stale_minutes: float) -> None:
    """Mark runs left RUNNING by a process that is gone as KILLED, and say so."""
    from harness.store.claims import reconcile

    for note in reconcile(tracker.client, experiment_ids, stale_minutes * 60, tracker.artifact_root):
        print(f"sparsebench: marked KILLED, its owner is gone: {note}", file=sys.stderr)


def _cache_dir() -> Path:
    from harness.store.tracking import default_home

    cache = default_home() / "cache"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the data cache {cache}: {e.strerror}; set SPARSEBENCH_HOME") from e
    return cache


def cmd_run(args: argparse.Namespace) -> int:
    from harness.backends.choice import choose_backend, pick_device, use_threads
    from harness.run import runner, summary
    from harness.store.checkpoint import CheckpointPolicy
    from harness.store.tracking import Tracker, resolve_tracking_uri

    if args.params and not args.dry_run:
        raise UsageError("--params shows the cells' settings without running them: add --dry-run")
    registry, cells = _load(args)
    if args.address and args.backend != "ray":
        raise UsageError("--address names a Ray cluster: add --backend ray")
    device = pick_device(args.device) if args.backend == "local" else None
    use_threads(args.threads)
    console = _console()
    if args.dry_run:
        (summary.print_params if args.params else summary.print_cells)(console, cells)
        return 0
    if args.checkpoint_minutes == 0 and args.checkpoint_steps == 0:
        raise UsageError("--checkpoint-minutes 0 and --checkpoint-steps 0: give at least one interval")
    uri = resolve_tracking_uri(args.tracking_uri)
    tracker = Tracker(uri)  # unreachable, unreadable or read-only store: a usage error before any training
    cache = _cache_dir()
    placement = choose_backend(  # Ray: connect; do its nodes reach the store?
        args.backend, uri, cells, device_choice=args.device, device=device, jobs=args.jobs,
        threads=args.threads, address=args.address,
    )
    backend, device = placement.backend, placement.device
    try:
        experiment_id = tracker.experiment(args.preset)
        _reconcile(tracker, [experiment_id], args.stale_after)
        options = runner.MatrixOptions(
            device=device,
            cache_dir=cache,
            checkpoints=CheckpointPolicy.for_store(uri, args.checkpoint_steps, args.checkpoint_minutes),
            force=args.force,
            retry=tuple(args.retry),
            stale_s=args.stale_after * 60,
            show_progress=not args.no_progress,
            plugins=tuple(args.plugin),
        )
        console.print(f"[bold]sparsebench[/] {len(cells)} cells on {device}{placement.where} -> {uri}")
        results = runner.run_matrix(
            cells, registry, tracker, args.preset, options, args.guard, notify=console.print, backend=backend
        )
    finally:
        if backend is not None:
            backend.close()
    summary.print_results(console, results)
    summary.print_where(console, uri, experiment_id)
    return EXIT_FAILED_CELLS if any(r.status == FAILED for r in results) else 0


def cmd_list(args: argparse.Namespace) -> int:
    from harness.run import summary

    registry, cells = _load(args)
    console = _console()
    summary.print_registry(console, registry)
    (summary.print_params if args.params else summary.print_cells)(console, cells)
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from harness.run import summary

    summary.print_plugins(_console(), _registry(args))
    return 0


def cmd_check_plugin(args: argparse.Namespace) -> int:
    from harness.plugins import conformance

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


@contextlib.contextmanager
def _report_errors() -> Iterator[None]:
    """The report's own errors as the CLI's: an unreadable store (TrackingError), anything else the
    user can fix (UsageError); both one line and exit 2."""
    from reports.errors import ReportError, StoreReadError

    try:
        yield
    except StoreReadError as e:
        raise TrackingError(str(e)) from e
    except ReportError as e:
        raise UsageError(str(e)) from e


def cmd_report(args: argparse.Namespace) -> int:
    from harness.store.tracking import EXPERIMENT_PREFIX, Tracker, default_home, resolve_tracking_uri
    from reports.build import build_report

    if args.results is not None:
        return _results_page(args)
    if args.store:
        raise UsageError("--store goes with --results; the report reads the --tracking-uri / home store")
    registry = _registry(args)
    uri = resolve_tracking_uri(args.tracking_uri)
    tracker = Tracker(uri, create=False)  # a dead server or a corrupt store: one line, at once
    out = args.out or default_home() / "report"
    experiments = [f"{EXPERIMENT_PREFIX}{p}" for p in args.preset] or None
    wanted = [
        e.experiment_id
        for e in tracker.client.search_experiments(max_results=1000)
        if (e.name in experiments if experiments else e.name.startswith(EXPERIMENT_PREFIX))
    ]
    _reconcile(tracker, wanted, args.stale_after)
    with _report_errors():
        result = build_report(uri, experiments, out, [r.obj for r in registry.figures])
    _console().print(f"report: [bold]{result.index_html}[/]")
    return 0


def _store_uri(text: str) -> str:
    """A ``--store`` value as a tracking URI: a URI as it is, a folder as the home it is."""
    from harness.store.tracking import home_uri

    return text if "://" in text else home_uri(Path(text).expanduser().resolve())


def _results_page(args: argparse.Namespace) -> int:
    """``report --results PAGE``: the committed results page from one or more stores, read only
    (no report run is logged and no stale run reconciled: the stores may be someone else's)."""
    from harness.store.tracking import resolve_tracking_uri
    from reports.results import build_results

    uris = [_store_uri(s) for s in args.store] or [resolve_tracking_uri(args.tracking_uri)]
    shown = " ".join(f"--store {s}" for s in args.store)
    command = f"sparsebench report --results {args.results} {shown}".strip()
    with _report_errors():
        written = build_results(uris, args.results, command)
    _console().print(f"results: [bold]{written[0]}[/] and {len(written) - 1} figure files")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from harness.store.dashboard import ui_url
    from harness.store.tracking import Tracker, resolve_tracking_uri
    from harness.store.ui import check_address, serve

    loopback = check_address(args.host, args.port)  # a taken port or a bad host: one line, at once
    uri = resolve_tracking_uri(args.tracking_uri)
    tracker = Tracker(uri, create=False)  # as report: a missing store is refused, never created
    if not loopback:
        print(
            f"sparsebench: warning: --host {args.host} serves the dashboard beyond this machine, and it "
            "has no authentication: anyone who reaches the port can read and change the store",
            file=sys.stderr,
        )
    experiments = [e for e in tracker.client.search_experiments() if e.name.startswith("sparsebench-")]
    for exp in experiments:
        tracker.offer_cells_view(exp)
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
    # One worker and no background job runners: a local dashboard, not a shared service.
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return serve(command, env)


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
