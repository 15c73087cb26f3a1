"""The Anomalies tab in a real browser: the planted node's box is coloured and the origin named."""

from __future__ import annotations

import re

import pytest

from tests.analysis._planted import Plant, train
from tests.dashboard.test_browser import TIMEOUT_MS, serving
from tests.dashboard.test_browser import chromium as chromium  # noqa: F401  (the fixture, reused)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PLANT = Plant("block.lin", step=0, sample=1, how="scale")  # step 0: the step the page opens on

BOX_COLOR_JS = """(name) => {
  function* walk(v) { yield v; for (const c of (v.child_views || [])) yield* walk(c); }
  for (const root of Bokeh.index.roots) for (const v of walk(root)) {
    if (!v.model || v.model.name !== "comgra-anomaly-graph") continue;
    for (const r of v.model.renderers) {
      const d = r.data_source ? r.data_source.data : null;
      if (!d || !d.name || !d.color) continue;
      const i = Array.from(d.name).indexOf(name);
      if (i >= 0) return d.color[i];
    }
  }
  return null;
}"""


def test_the_anomaly_tab_colours_the_planted_node(chromium, tmp_path):  # noqa: F811
    root = tmp_path / "runs"
    train(root, "scaled", plant=PLANT, steps=3)
    with serving(root) as url:
        context = chromium.new_context(viewport={"width": 1500, "height": 1100})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)
        page.get_by_text("Anomalies", exact=True).first.click()
        page.get_by_text(re.compile(r"origin: block\.lin")).first.wait_for(timeout=TIMEOUT_MS)
        colors = {}
        for _ in range(50):
            colors = {n: page.evaluate(BOX_COLOR_JS, n) for n in ("block.lin", "embed", "input")}
            if all(colors.values()):
                break
            page.wait_for_timeout(200)
        assert colors["block.lin"] not in (None, "#ffffff", "#eeeeee"), colors
        assert colors["embed"] == colors["input"] == "#ffffff", colors
        page.screenshot(path=str(tmp_path / "dashboard-anomalies.png"), full_page=True)
        context.close()
        assert not errors, f"JavaScript errors on the page: {errors}"
