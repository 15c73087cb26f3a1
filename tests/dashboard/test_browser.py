"""Real-browser tests: ``panel serve`` on 127.0.0.1 driven by headless Chromium (Debian's, via playwright).

Set ``COMGRA_UPDATE_SCREENSHOTS=1`` to copy the screenshots taken here into ``docs/img/``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]
APP = Path(__file__).resolve().parents[2] / "comgra_callbacks" / "dashboard" / "app.py"
DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"
TIMEOUT_MS = 45_000  # a wait ends when the element shows; 20 s timed out once on a 2-core CI machine busy with the other test worker
START_SECS = 120  # panel serve starts in ~5 s on an idle machine, but a loaded one took over a minute

# The page coordinates of a node's box in the graph, read from the Bokeh figure's data.
BOX_CENTRE_JS = """(name) => {
  function* walk(v) { yield v; for (const c of (v.child_views || [])) yield* walk(c); }
  for (const root of Bokeh.index.roots) for (const v of walk(root)) {
    if (!v.model || v.model.name !== "comgra-graph") continue;
    for (const r of v.model.renderers) {
      const d = r.data_source ? r.data_source.data : null;
      if (!d || !d.name || !d.left) continue;
      const i = Array.from(d.name).indexOf(name);
      if (i < 0) continue;
      v.el.scrollIntoView({block: "center"});
      const x = v.frame.x_scale.compute((d.left[i] + d.right[i]) / 2);
      const y = v.frame.y_scale.compute((d.bottom[i] + d.top[i]) / 2);
      const rect = (v.canvas_view || v).el.getBoundingClientRect();
      return [rect.left + x, rect.top + y];
    }
  }
  return null;
}"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    required = os.environ.get("COMGRA_REQUIRE_BROWSER") == "1"
    if not os.path.exists(CHROMIUM):
        if required:
            pytest.fail(f"{CHROMIUM} is missing and COMGRA_REQUIRE_BROWSER=1: install the Debian package 'chromium'.")
        pytest.skip(f"{CHROMIUM} is not installed (Debian package 'chromium'); the real-browser tests need it.")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            pytest.fail("the Python package 'playwright' is missing and COMGRA_REQUIRE_BROWSER=1: pip install -e '.[dev]'.")
        pytest.skip("the Python package 'playwright' is not installed (pip install -e '.[dev]').")

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@contextlib.contextmanager
def serving(root: Path, *args: str) -> Iterator[str]:
    """``panel serve`` of the package's app file on 127.0.0.1 (a free port); stopped on exit."""
    port = _free_port()
    command = [
        sys.executable, "-m", "panel", "serve", str(APP), "--address", "127.0.0.1", "--port", str(port),
        f"--allow-websocket-origin=127.0.0.1:{port}", "--args", str(root), *args,
    ]
    # The server's output goes to a file: a pipe nobody drains blocks the server once it is full, and reading a
    # pipe to its end waits for a process that has not exited (both hung this fixture on a loaded machine).
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/app"
    try:
        deadline = time.time() + START_SECS
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    _stop(process)
                    log.seek(0)
                    pytest.fail(f"panel serve did not answer within {START_SECS} s: {log.read().decode(errors='replace')[-2000:]}")
                time.sleep(0.3)
        yield url
    finally:
        _stop(process)
        log.close()


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def server(runs_root: tuple[Path, dict]) -> Iterator[str]:
    root, _ = runs_root
    with serving(root, "--custom", "fourier", "--poll", "2") as url:
        yield url


@pytest.fixture
def page(chromium, server):
    context = chromium.new_context(viewport={"width": 1500, "height": 1100})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server)
    page.get_by_text(re.compile(r"step 0 \(train\)")).wait_for(timeout=TIMEOUT_MS)
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _shot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"dashboard-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("COMGRA_UPDATE_SCREENSHOTS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, DOCS_IMG / path.name)


def _click_box(page, name: str) -> None:
    """Click the centre of a node's box once the figure has drawn it and the page stopped moving."""
    deadline = time.time() + TIMEOUT_MS / 1000
    previous = None
    while True:
        where = page.evaluate(BOX_CENTRE_JS, name)
        if where is not None and where == previous:
            break
        if time.time() > deadline:
            pytest.fail(f"the box {name!r} was not drawn in the graph (last position {where})")
        previous = where
        page.wait_for_timeout(150)
    page.mouse.click(*where)


def _click_box_until(page, name: str, shown) -> None:
    """Click a node's box until ``shown`` (a locator) appears: under load the graph may still move after the
    position was read, and a click that lands beside the box is simply made again, as a user would."""
    deadline = time.time() + TIMEOUT_MS / 1000
    while True:
        _click_box(page, name)
        try:
            shown.wait_for(timeout=3000)
            return
        except Exception:
            if time.time() > deadline:
                raise


def _header(page, text: str) -> None:
    page.get_by_text(re.compile(text)).first.wait_for(timeout=TIMEOUT_MS)


def test_main_view_step_view_node_and_keys(page, tmp_path):
    page.get_by_role("button", name="▶").click()
    _header(page, r"step 1 \(train\) · view value")
    page.locator(".noUi-handle").first.focus()
    page.keyboard.press("ArrowRight")
    _header(page, r"step 2 \(train\) · view value")
    view = page.locator("select").filter(has=page.locator("option", has_text=re.compile(r"^grad$")))
    view.select_option("grad")
    _header(page, r"step 2 \(train\) · view grad")
    page.get_by_text("▸ grad").wait_for(timeout=TIMEOUT_MS)
    # Click a node in the graph: the tensor panel shows that node's values.
    _click_box(page, "layers.1")
    page.locator("h3", has_text=re.compile(r"^layers\.1$")).wait_for(timeout=TIMEOUT_MS)
    page.get_by_text(re.compile(r"module layers\.1")).first.wait_for(timeout=TIMEOUT_MS)
    # The arrow keys follow the graph and the steps.
    page.keyboard.press("ArrowRight")
    page.locator("h3", has_text=re.compile(r"^layers\.2$")).wait_for(timeout=TIMEOUT_MS)
    page.keyboard.press("Shift+ArrowRight")
    _header(page, r"step 3 \(train\)")
    page.get_by_role("button", name="per-neuron").click()
    _header(page, r"· per-neuron")
    page.wait_for_timeout(500)
    _shot(page, tmp_path, "neurons")
    page.get_by_role("button", name="individual sample").click()
    _header(page, r"· individual sample")
    page.get_by_text(re.compile(r"sample 0 of 8, a vector of 16 values")).first.wait_for(timeout=TIMEOUT_MS)
    page.wait_for_timeout(500)
    _shot(page, tmp_path, "sample")
    page.get_by_role("button", name="batch statistics").click()
    view.select_option("value")
    _header(page, r"view value · batch statistics")
    page.wait_for_timeout(500)
    _shot(page, tmp_path, "main")


def test_comparison_and_network_tabs(page, tmp_path):
    page.get_by_text("Compare", exact=True).first.click()
    page.get_by_text(re.compile(r"^A = grok · train · steps 0–34")).wait_for(timeout=TIMEOUT_MS)
    first_row = page.locator(".tabulator-row").first
    first_row.wait_for(timeout=TIMEOUT_MS)
    assert re.match(r"layers\.[13]\b", first_row.inner_text()), first_row.inner_text()
    page.locator(".tabulator-cell", has_text=re.compile(r"^attn$")).first.click()
    page.get_by_text("Node 'attn' has no records", exact=False).or_(page.locator("th", has_text="relative")).first.wait_for(timeout=TIMEOUT_MS)
    page.wait_for_timeout(500)
    _shot(page, tmp_path, "compare")
    page.get_by_text("Main", exact=True).first.click()
    page.locator("h3", has_text=re.compile(r"^attn$")).wait_for(timeout=TIMEOUT_MS)
    page.get_by_text("Network", exact=True).first.click()
    page.get_by_text(re.compile(r"MLP: 1,088 parameters")).wait_for(timeout=TIMEOUT_MS)
    page.locator(".tabulator-cell", has_text="Linear").first.wait_for(timeout=TIMEOUT_MS)
    _shot(page, tmp_path, "network")


def test_custom_and_scalars_tabs(page, tmp_path):
    node = page.locator("select").filter(has=page.locator("option", has_text=re.compile(r"^layers\.0\.weight$")))
    node.select_option("layers.0.weight")
    page.locator("h3", has_text=re.compile(r"^layers\.0\.weight$")).wait_for(timeout=TIMEOUT_MS)
    page.get_by_text("Fourier", exact=True).first.click()
    page.get_by_text(re.compile(r"Fourier spectrum of raw values, shape \(16, 16\)")).wait_for(timeout=TIMEOUT_MS)
    _shot(page, tmp_path, "custom")
    page.get_by_text("Scalars", exact=True).first.click()
    page.get_by_text("logged scalars").or_(page.locator(".choices")).first.wait_for(timeout=TIMEOUT_MS)
    page.wait_for_timeout(500)
    _shot(page, tmp_path, "scalars")



def test_a_live_run_grows_on_the_page(chromium, tmp_path, host_record):
    """New records of a run still being written appear without reloading, and the status follows."""
    from comgra_callbacks.store.storage import open_root
    from comgra_callbacks.store.writer import RunWriter

    writer = RunWriter(open_root(tmp_path).run("live"))
    writer.write_graph({"nodes": {"h": {"kind": "intermediate", "roles": [None], "iterations": 1}}, "graphs": {}})
    writer.append([host_record(0, 1.0), host_record(1, 2.0)])
    with serving(tmp_path, "--poll", "1") as url:
        context = chromium.new_context(viewport={"width": 1400, "height": 900})
        page = context.new_page()
        try:
            page.goto(url)
            page.get_by_text(re.compile(r"running · 2 records")).wait_for(timeout=TIMEOUT_MS)
            page.get_by_role("button", name="▶").click()
            _header(page, r"step 1 \(train\)")
            writer.append([host_record(2, 3.0), host_record(3, 4.0)])
            page.get_by_text(re.compile(r"running · 4 records")).wait_for(timeout=TIMEOUT_MS)
            _header(page, r"step 3 \(train\)")  # it was on the last step: it follows the training
            writer.close("finished")
            page.get_by_text(re.compile(r"finished · 4 records")).wait_for(timeout=TIMEOUT_MS)
        finally:
            context.close()


def test_a_big_graph_starts_grouped_and_opens_on_click(chromium, big_root, tmp_path):
    with serving(big_root, "--poll", "0") as url:
        context = chromium.new_context(viewport={"width": 1500, "height": 1000})
        page = context.new_page()
        try:
            page.goto(url)
            page.get_by_text("127 nodes in 8 boxes (1 module group:").wait_for(timeout=TIMEOUT_MS)
            _shot(page, tmp_path, "grouped")
            _click_box(page, "layers.*")
            page.get_by_text("127 nodes in 47 boxes (40 module groups:").wait_for(timeout=TIMEOUT_MS)
            _click_box(page, "layers.7.*")
            page.get_by_text("127 nodes in 49 boxes (39 module groups:").wait_for(timeout=TIMEOUT_MS)
            _click_box_until(page, "layers.7", page.locator("h3", has_text=re.compile(r"^layers\.7$")))
        finally:
            context.close()
