"""The report as a person sees it: opened from disk in headless Chromium (Debian's package,
driven by Playwright), the table and every plot render, nothing fails to load, nothing is
logged as an error. A screenshot is saved (into $QUANTLAB_SCREENSHOT_DIR when set)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from quantlab.cli import main

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def _chromium() -> str:
    for candidate in (
        os.environ.get("QUANTLAB_CHROMIUM"),
        "chromium",
        "chromium-browser",
        "google-chrome",
    ):
        if candidate and (path := shutil.which(candidate)):
            return path
    message = (
        "no Chromium found: install Debian's browser with `apt-get install chromium` "
        "(scripts/test.sh does, as root), or set QUANTLAB_CHROMIUM to a Chromium/Chrome executable"
    )
    if os.environ.get("QUANTLAB_REQUIRE_BROWSER") == "1":  # CI: the browser test must run
        pytest.fail(message)
    pytest.skip(message)


def open_report(path: Path, screenshot: Path, script: str | None = None) -> dict:
    """Open ``path`` in headless Chromium; return what the page shows and what went wrong
    (``script``: JavaScript run on the page after load, its value returned as ``script``)."""
    sync_api = pytest.importorskip(
        "playwright.sync_api",
        reason="Playwright is not installed: "
        "pip install 'quantlab[dev]' (the browser itself comes from Debian)",
    )
    executable = _chromium()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        errors, failed = [], []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: failed.append(r.url))
        page.goto(path.resolve().as_uri(), wait_until="load")
        images = page.eval_on_selector_all(
            "img",
            "els => els.map(e => ({alt: e.alt, complete: e.complete, w: e.naturalWidth, h: "
            "e.naturalHeight, shown: e.getBoundingClientRect().width}))",
        )
        rows = page.eval_on_selector_all(
            "table.results tbody tr", "els => els.map(e => e.innerText)"
        )
        headers = page.eval_on_selector_all("table.results th", "els => els.map(e => e.innerText)")
        title = page.title()
        ran = page.evaluate(script) if script else None
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return {
        "images": images,
        "rows": rows,
        "headers": headers,
        "errors": errors,
        "failed": failed,
        "title": title,
        "script": ran,
    }


SORT_AND_HIDE = """() => {
  const th = [...document.querySelectorAll("table.results th")];
  const ppl = th.find(h => h.textContent.trim() === "ppl");
  const first = () => document.querySelector("table.results tbody tr").cells[0].textContent.trim();
  ppl.click(); const asc = first(); ppl.click(); const desc = first();
  const box = document.querySelector('#columns input[data-column="ppl"]');
  box.click();
  return {first_after_asc: asc, first_after_desc: desc,
          ppl_hidden: getComputedStyle(ppl).display === "none"};
}"""


def test_report_renders_in_chromium(tiny_recipe, tmp_path):
    assert main(["run", str(tiny_recipe)]) == 0
    report = tmp_path / "run" / "report.html"
    shot_dir = Path(os.environ.get("QUANTLAB_SCREENSHOT_DIR") or tmp_path)
    shot_dir.mkdir(parents=True, exist_ok=True)
    shot = shot_dir / "report-tiny.png"
    seen = open_report(report, shot, script=SORT_AND_HIDE)
    assert seen["errors"] == [] and seen["failed"] == []
    assert "quantlab report" in seen["title"]
    # sorting by ppl, descending, puts the quantized row first; hiding a column hides its cells
    assert (
        seen["script"]["first_after_desc"] == "rtn-w4-g32"
        and seen["script"]["first_after_asc"] == "baseline"
    )
    assert seen["script"]["ppl_hidden"] is True
    assert [r.split("\t")[0] for r in seen["rows"]] == ["baseline", "rtn-w4-g32"]
    assert "ppl" in seen["headers"] and "KL" in seen["headers"]
    assert len(seen["images"]) >= 3
    for img in seen["images"]:
        assert img["complete"] and img["w"] > 300 and img["h"] > 200 and img["shown"] > 100, img
    assert shot.stat().st_size > 50_000  # a full-page picture, not a blank one
