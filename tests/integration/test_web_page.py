"""The session page at `/` in a real headless browser (Playwright + Chromium): three preview rounds (the
second an edit at the strength the server predicts, the third at one the user sets), a finalize showing
route, strengths, steps and UNet calls, the progress bar fed by the server-sent events; a screenshot is
saved and its path printed. Skipped, with the reason, when Playwright or a Chromium binary is missing
(README: `apt-get install -y chromium`, `pip install -e ".[dev]"`)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.ray

BROWSER_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def find_chromium() -> str | None:
    """DIFFUSIONX_CHROMIUM if set, else a system Chromium (Debian's `chromium` package)."""
    if os.environ.get("DIFFUSIONX_CHROMIUM"):
        return os.environ["DIFFUSIONX_CHROMIUM"]
    for candidate in BROWSER_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_page_and_its_files_are_served_without_external_references(http):
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in ("static/app.js", "static/style.css"):
        assert asset in page.text
        response = http.get(f"/{asset}")
        assert response.status_code == 200 and response.text.strip()
        assert "http://" not in response.text and "https://" not in response.text  # nothing external
    assert "//" not in page.text.replace("<!doctype html>", "")  # no external link in the page either


def test_a_three_round_session_and_a_finalize_in_a_headless_browser(serve_url, tmp_path, capsys):
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright is not installed: pip install -e '.[dev]'"
    )
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(
            "no Chromium found: install one with `apt-get install -y chromium` (or set DIFFUSIONX_CHROMIUM)"
        )
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            external: list[str] = []
            local = (serve_url, "data:")  # the API and the images it returned
            page.on("request", lambda r: None if r.url.startswith(local) else external.append(r.url))
            page.goto(f"{serve_url}/")
            # round 1: a fresh preview
            page.fill("#prompt", "a large red circle on the left, blue background")
            page.click("#preview-button")
            page.wait_for_selector("#history li:nth-child(1)", timeout=60_000)
            # round 2: an edit of round 1 toward a new prompt, at the strength the server predicts (the
            # strength field is empty by default)
            page.fill("#prompt", "a large green circle on the left, blue background")
            page.check("#edit")
            assert page.input_value("#edit-strength") == ""
            page.click("#preview-button")
            page.wait_for_selector("#history li:nth-child(2)", timeout=60_000)
            predicted = re.search(
                r"edit (\d\.\d\d), predicted\)", page.text_content("#history li:nth-child(2)")
            )
            assert predicted is not None and 0.0 <= float(predicted.group(1)) <= 1.0
            # round 3: an edit at the strength the user sets
            page.fill("#prompt", "a large green circle on the right, blue background")
            page.fill("#edit-strength", "0.6")
            page.click("#preview-button")
            page.wait_for_selector("#history li:nth-child(3)", timeout=60_000)
            third = page.text_content("#history li:nth-child(3)")
            assert "edit 0.60" in third and "predicted" not in third
            # finalize: the route, strengths, steps and UNet calls of the refinement
            page.click("#finalize-button")
            page.wait_for_selector('#final-info dd[data-field="route"]', timeout=60_000)
            field = lambda name: page.text_content(f'#final-info dd[data-field="{name}"]')  # noqa: E731
            assert field("route") in ("cloud", "cloud-reduced", "edge-fallback")
            assert 0.0 < float(field("strength used")) <= 1.0 and float(field("strength predicted")) > 0.0
            assert int(field("steps")) > 0
            # the progress bar followed the refinement's steps to the end
            value, maximum = page.eval_on_selector("#progress", "bar => [bar.value, bar.max]")
            assert value == maximum > 0
            tier = "cloud" if field("route") != "edge-fallback" else "edge"
            assert f"{tier} {int(maximum)}" in field("UNet calls")
            assert page.text_content("#error") == "" and page.text_content("#progress-text") == "done"
            assert external == []  # the page asked nothing of any other host
            screenshot = tmp_path / "diffusionx_web_session.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
    with capsys.disabled():
        print(f"\nweb page screenshot: {screenshot}")
    # the page's rounds used the same API as everyone: the server saw them
    stats = httpx.get(f"{serve_url}/v1/stats").json()["tiers"]
    assert stats["cloud"]["requests_served"] >= 1
