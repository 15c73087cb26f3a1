"""Dashboard speed as the user sees it: from a selector change in headless Chromium to the new header on screen.

    .venv/bin/python benchmarks/dashboard_browser.py                  # writes a 10 000-record run first
    .venv/bin/python benchmarks/dashboard_browser.py --root /tmp/store  # a root written by dashboard_bench --keep

Starts ``panel serve`` on 127.0.0.1, opens the page in Debian's Chromium (``/usr/bin/chromium``, through the
``playwright`` package), then changes the node (through the Node selector) and the step (the ▶ button) several
times. Each change is timed inside the page, from the moment it is made until the header naming the new node
or step is in the DOM (checked on every animation frame), so the figure includes the server's work, the
websocket round trip and the browser's layout. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

APP = Path(__file__).resolve().parents[1] / "comgra_callbacks" / "dashboard" / "app.py"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
FIND = "function* all(root) { for (const el of root.querySelectorAll('*')) { yield el; if (el.shadowRoot) yield* all(el.shadowRoot); } }"
# Make the change (window.__change), then resolve with the ms until an element `tag` has the text `text`.
TIMED = FIND + """
([tag, text]) => new Promise((resolve) => {
  const t0 = performance.now();
  const tick = () => {
    for (const el of all(document)) if (el.tagName === tag && el.textContent.trim() === text) return resolve(performance.now() - t0);
    requestAnimationFrame(tick);
  };
  window.__change();
  requestAnimationFrame(tick);
})"""
CHOOSE_NODE = FIND + """
(node) => { window.__change = () => { for (const el of all(document))
  if (el.tagName === 'SELECT' && [...el.options].some(o => o.value === node) && [...el.options].some(o => o.value === 'x')) {
    el.value = node; el.dispatchEvent(new Event('change', {bubbles: true})); return; } }; }"""
NEXT_STEP = FIND + """
() => { window.__change = () => { for (const el of all(document)) if (el.tagName === 'BUTTON' && el.textContent.trim() === '▶') { el.click(); return; } }; }"""


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": round(statistics.median(values), 1), "max": round(max(values), 1)}


def main() -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=None, help="a root of runs (default: write a synthetic 10 000-record run)")
    parser.add_argument("--records", type=int, default=10_000)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    root = args.root
    if root is None:
        sys.path.insert(0, str(APP.parents[2]))
        from comgra_callbacks.dashboard.synthetic import write_run

        root = tempfile.mkdtemp(prefix="comgra-browser-bench-")
        write_run(root, "bench", records=args.records, layers=18, sample_every_layer=4)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "panel", "serve", str(APP), "--address", "127.0.0.1", "--port", str(port), f"--allow-websocket-origin=127.0.0.1:{port}", "--args", str(root), "--poll", "0"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result: dict[str, object] = {"root": str(root)}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            start = time.time()
            for _ in range(120):
                try:
                    page.goto(f"http://127.0.0.1:{port}/app")
                    break
                except Exception:
                    time.sleep(0.5)
            page.get_by_text(re.compile(r"step \d+ \(")).first.wait_for(timeout=60_000)
            result["page_load_s"] = round(time.time() - start, 2)
            page.wait_for_timeout(1000)
            node_ms = []
            for node in ["layers.1", "layers.2", "attn", "block", "layers.0", "out", "layers.3", "x", "layers.1", "layers.2"]:
                page.evaluate(CHOOSE_NODE, node)
                node_ms.append(page.evaluate(TIMED, ["H3", node]))
                page.wait_for_timeout(300)
            step_ms = []
            for step in range(1, 9):
                page.evaluate(NEXT_STEP)
                step_ms.append(page.evaluate(TIMED, ["STRONG", str(step)]))
                page.wait_for_timeout(300)
            result["node_change_ms"] = {**summary(node_ms), "each": [round(v) for v in node_ms]}
            result["step_change_ms"] = {**summary(step_ms), "each": [round(v) for v in step_ms]}
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=15)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
