"""Real-browser tests: ``panel serve`` on 127.0.0.1 driven by headless Chromium (Debian's, via playwright).

Set ``COMGRA_UPDATE_SCREENSHOTS=1`` to copy the screenshots taken here into ``docs/img/``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
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
TIMEOUT_MS = 20_000

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
    if not os.path.exists(CHROMIUM):
        if os.environ.get("COMGRA_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} is missing and COMGRA_REQUIRE_BROWSER=1: install the Debian package 'chromium'.")
        pytest.skip(f"{CHROMIUM} is not installed (Debian package 'chromium'); the real-browser tests need it.")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(runs_root: tuple[Path, dict]) -> Iterator[str]:
    """``panel serve`` of the package's app file on 127.0.0.1, stopped after the module."""
    root, _ = runs_root
    port = _free_port()
    command = [
        sys.executable, "-m", "panel", "serve", str(APP), "--address", "127.0.0.1", "--port", str(port),
        f"--allow-websocket-origin=127.0.0.1:{port}", "--args", str(root), "--custom", "fourier", "--poll", "2",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/app"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    output = process.stdout.read().decode() if process.stdout else ""
                    pytest.fail(f"panel serve did not start: {output[-2000:]}")
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
    x, y = page.evaluate(BOX_CENTRE_JS, "layers.1")
    page.mouse.click(x, y)
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
    page.get_by_text("Fourier", exact=True).first.click()
    page.get_by_text(re.compile(r"Strongest frequencies")).wait_for(timeout=TIMEOUT_MS)
    _shot(page, tmp_path, "custom")
    page.get_by_text("Scalars", exact=True).first.click()
    page.get_by_text("logged scalars").or_(page.locator(".choices")).first.wait_for(timeout=TIMEOUT_MS)
    page.wait_for_timeout(500)
    _shot(page, tmp_path, "scalars")
