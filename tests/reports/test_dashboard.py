"""The MLflow dashboard shows a store written in the layout: ``sparsebench ui`` (a real
``mlflow server``) on a test store, driven by headless Chromium through Playwright (the
system's /usr/bin/chromium; never ``playwright install``). Screenshots go to
``$SPARSEBENCH_TEST_ARTIFACTS`` (else a tmp dir)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.tracking import ui_url

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
SERVER_START_S = 120  # the server imports MLflow's whole app; slow on a loaded 2-core machine
UI_TIMEOUT_MS = 60_000
PARENT, CHILDREN, METRIC = "quick run", ("identity/n=8/sparse/seed=0",
                                         "identity/n=8/reinforce/seed=0"), "eval/mse"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def server(dashboard_store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """``mlflow server`` on the dashboard store; the port. Stopped (its whole process group,
    which holds its workers) when the module's tests are done."""
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is absent: install it with `apt-get install -y chromium`"
        if os.environ.get("SPARSEBENCH_REQUIRE_BROWSER"):  # `make test`: never skip in silence
            pytest.fail(message)
        pytest.skip(message)
    port = _free_port()
    log = (tmp_path_factory.mktemp("server") / "server.log").open("w")
    # `sparsebench ui` itself, so the command users run is the one under test.
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "ui", "--tracking-uri", dashboard_store.uri,
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while not _answers(f"http://127.0.0.1:{port}/health"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer on port {port}; see {log.name}")
            time.sleep(0.5)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_dashboard_shows_experiment_child_runs_and_metric(
    server: int, dashboard_store, artifact_dir: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    experiment = "sparsebench-quick"
    url = ui_url(server, dashboard_store.experiments[experiment])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.goto(url)
            expect(page.get_by_text("matching runs")).to_be_visible()
            expect(page.get_by_role("link", name=experiment).first).to_be_visible()
            assistant = page.get_by_role("button", name="Close")  # MLflow's side panel, if open
            if assistant.count() == 1:
                assistant.click()
            parent = page.get_by_role("gridcell").filter(
                has=page.get_by_role("link", name=PARENT, exact=True))
            parent.get_by_role("button").click()  # child runs are folded under their parent
            for child in CHILDREN:
                expect(page.get_by_role("link", name=child, exact=True)).to_be_visible()
            page.screenshot(path=str(artifact_dir / "dashboard.png"))

            page.get_by_role("link", name=CHILDREN[0], exact=True).click()
            page.get_by_role("link", name=METRIC, exact=True).click()  # the metric's chart
            expect(page.get_by_text(f"{CHILDREN[0]} ({METRIC})")).to_be_visible()
            page.screenshot(path=str(artifact_dir / "dashboard_metric.png"))
        finally:
            browser.close()
    for name in ("dashboard.png", "dashboard_metric.png"):
        assert (artifact_dir / name).stat().st_size > 10_000
