"""The MLflow dashboard shows a store written in the layout: ``sparsebench ui`` (a real
``mlflow server``) on a test store, driven by headless Chromium through Playwright (the
system's /usr/bin/chromium; never ``playwright install``). Screenshots go to
``$SPARSEBENCH_TEST_ARTIFACTS`` (else a tmp dir)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.store.dashboard import CELLS_VIEW_NAME, ui_url
from harness.store.server import answers, free_port

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
SERVER_START_S = 120  # the server imports MLflow's whole app; slow on a loaded 2-core machine
UI_TIMEOUT_MS = 60_000
PARENT, CHILDREN, METRIC = "quick run", ("identity/n=8/sparse/seed=0",
                                         "identity/n=8/reinforce/seed=0"), "test/mse"



@pytest.fixture(scope="module")
def server(dashboard_store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """``sparsebench ui`` on the dashboard store; its port and its output. Stopped (its whole process group,
    which holds its workers) when the module's tests are done."""
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is absent: install it with `apt-get install -y chromium`"
        if os.environ.get("SPARSEBENCH_REQUIRE_BROWSER"):  # `make test`: never skip in silence
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    log = log_path.open("w")
    # `sparsebench ui` itself, so the command users run is the one under test.
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "ui", "--tracking-uri", dashboard_store.uri,
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while not answers(f"http://127.0.0.1:{port}/health"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer on port {port}; see {log.name}")
            time.sleep(0.5)
        yield port, log_path
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _printed_url(log: Path, experiment: str) -> str:
    """The URL ``sparsebench ui`` printed for an experiment."""
    prefix = f"{experiment}: "
    (line,) = [line for line in log.read_text().splitlines() if line.startswith(prefix)]
    return line.removeprefix(prefix)


def _close_assistant(page) -> None:
    assistant = page.get_by_role("button", name="Close")  # MLflow's side panel, if open
    if assistant.count() == 1:
        assistant.click()


def _chart(page, metric: str):
    """A metric's card in the chart view."""
    return page.get_by_test_id("experiment-view-compare-runs-card").filter(
        has=page.get_by_text(metric, exact=True))


def test_printed_url_opens_the_cells_in_the_chart_view(server, dashboard_store, artifact_dir: Path) -> None:
    """The bug this guards: MLflow folds child runs under their parent and charts only the rows on
    show, so a matrix's chart view opened empty until the parent row was expanded."""
    from playwright.sync_api import expect, sync_playwright

    port, log = server
    experiment = "sparsebench-quick"
    url = _printed_url(log, experiment)
    assert url == ui_url(port, dashboard_store.experiments[experiment])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.goto(url)  # no clicks: the charts show every cell at once
            expect(page.get_by_text(f"{len(CHILDREN)} matching runs")).to_be_visible()
            _close_assistant(page)
            chart = _chart(page, METRIC)
            expect(chart.locator(".js-plotly-plot .scatterlayer .trace").first).to_be_visible()  # lines
            for child in CHILDREN:  # each cell in the chart's legend and in the runs list
                expect(chart.get_by_text(f"{child} ({METRIC})", exact=True)).to_be_visible()
                expect(page.get_by_role("link", name=child, exact=True)).to_be_visible()
            expect(page.get_by_role("link", name=PARENT, exact=True)).to_have_count(0)
            page.screenshot(path=str(artifact_dir / "dashboard.png"))

            page.get_by_role("link", name=CHILDREN[0], exact=True).click()
            page.get_by_role("link", name=METRIC, exact=True).click()  # the metric's own chart
            expect(page.get_by_text(f"{CHILDREN[0]} ({METRIC})")).to_be_visible()
            page.screenshot(path=str(artifact_dir / "dashboard_metric.png"))
        finally:
            browser.close()
    for name in ("dashboard.png", "dashboard_metric.png"):
        assert (artifact_dir / name).stat().st_size > 10_000


def test_views_menu_offers_the_cells_to_a_user_who_browsed_in(server, dashboard_store) -> None:
    """A store written before the saved view gets it from ``sparsebench ui``; a user who reached the
    experiment from MLflow's own pages (folded rows) picks it from "Views" and sees the cells."""
    from playwright.sync_api import expect, sync_playwright

    port, _ = server
    experiment_id = dashboard_store.experiments["sparsebench-quick"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.goto(f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
            expect(page.get_by_role("link", name=PARENT, exact=True)).to_be_visible()  # MLflow's default
            _close_assistant(page)
            page.get_by_test_id("saved-views-trigger").click()
            page.get_by_text(CELLS_VIEW_NAME, exact=True).click()
            for child in CHILDREN:
                expect(page.get_by_role("link", name=child, exact=True)).to_be_visible()
            expect(page.get_by_role("link", name=PARENT, exact=True)).to_have_count(0)
        finally:
            browser.close()
