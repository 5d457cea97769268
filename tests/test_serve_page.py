"""The `reid-gallery serve` web page in a real headless Chromium (the system's, as .ci/run installs it):
it loads, a query upload shows the hits (those below the calibrated threshold dimmed as unlikely, and says
when no hit is likely), a click on a hit searches again, the camera filter narrows the grid.

`REID_LITE_PAGE_SCREENSHOT=docs/gallery_page.png` also saves the page after the search (synthetic crops).
"""

from __future__ import annotations

import os
import shutil

import pytest
from extras import MISSING_MODULE, import_extra
from serve_util import build_gallery, make_crops

from reid_lite.index.calibration import calibration_entry
from reid_lite.index.server import BackgroundServer, create_app
from reid_lite.metrics.calibration import ThresholdChoice

#: REID_LITE_CHROMIUM: another browser binary (tests/test_ci.py points it at a missing file).
CHROMIUM = os.environ.get("REID_LITE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def require_chromium() -> str:
    """The system Chromium's path for a page test: a failure under CI (which installs it), else a skip."""
    if CHROMIUM is None or not os.path.isfile(CHROMIUM):
        if os.environ.get("REID_LITE_NO_MISSING_MODULE_SKIPS") == "1" or os.environ.get("CI"):
            pytest.fail("chromium is not installed, so the web page is untested: .ci/run installs it "
                        "(apt-get install -y chromium chromium-driver)", pytrace=False)
        pytest.skip(f"{MISSING_MODULE} chromium: apt-get install -y chromium chromium-driver")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser():
    sync_api = import_extra("playwright.sync_api", "test")
    chromium = require_chromium()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=ARGS)
        yield b
        b.close()


def test_page_upload_click_and_camera_filter(browser, tmp_path):
    crops = make_crops(tmp_path / "crops")
    g = build_gallery(tmp_path / "gal", crops)
    files = sorted((crops / "bounding_box_test").glob("*.jpg"))
    # A threshold between the query crop's own score (1) and its best other crop: only itself is likely.
    own, second = (h.score for h in g.search([str(files[5])], k=2)[0])
    g.set_calibration(calibration_entry(ThresholdChoice((own + second) / 2, "f1", None, 1.0, 1.0, 1.0, 1, 1, 1),
                                        g.fingerprint))
    g.close()
    with BackgroundServer(create_app(tmp_path / "gal")) as server:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(20_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: errors.append(r.url))
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('gallery-info').textContent.includes('23 crops')")
        assert f"match threshold {(own + second) / 2:.3f}" in page.locator("#gallery-info").text_content()
        assert page.locator("#cameras input[type=checkbox]").count() == 3

        page.set_input_files("#file", str(files[5]))  # a query upload shows the hits
        page.wait_for_function("document.querySelectorAll('#grid .hit').length === 20")
        first = page.locator("#grid .hit").first
        assert files[5].name in first.get_attribute("title")
        assert page.locator("#timeline circle").count() == 20
        page.wait_for_function("[...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalHeight)")
        assert page.locator("#add").is_hidden()  # a read-only server offers no upload that adds
        if os.environ.get("REID_LITE_PAGE_SCREENSHOT"):
            page.screenshot(path=os.environ["REID_LITE_PAGE_SCREENSHOT"], full_page=True)
        # below the threshold: dimmed and labelled; the crop itself is the one likely hit
        assert page.locator("#grid .hit.unlikely").count() == 19 and page.locator("#grid .hit .flag").count() == 19
        assert "unlikely" not in first.get_attribute("class") and first.locator(".flag").count() == 0
        assert page.locator("#grid .hit.unlikely .flag").first.text_content() == "unlikely"
        assert float(page.locator("#grid .hit.unlikely").first.evaluate("e => getComputedStyle(e).opacity")) < 1
        assert "20 hits, 1 likely for" in page.locator("#status").text_content()
        assert "No likely match" not in page.locator("#status").text_content()
        page.locator("#exclude-same").check()  # without the crop itself, no hit is likely: the page says so
        page.wait_for_function("document.getElementById('status').textContent.includes('No likely match')")
        assert page.locator("#grid .hit").count() == page.locator("#grid .hit.unlikely").count() > 0
        page.locator("#exclude-same").uncheck()
        page.wait_for_function("document.querySelectorAll('#grid .hit').length === 20 && "
                               "!document.getElementById('status').textContent.includes('No likely match')")

        third = page.locator("#grid .hit").nth(2)  # a click on a hit searches from it
        clicked = third.get_attribute("data-id")
        third.click()
        page.wait_for_function(f"document.getElementById('status').textContent.includes('crop #{clicked} ')")
        page.wait_for_function(f"document.querySelector('#grid .hit').dataset.id === '{clicked}'")

        page.locator("#cameras input[value='0']").uncheck()  # the camera filter narrows the grid
        page.wait_for_function("[...document.querySelectorAll('#grid .hit')].length > 0 && "
                               "[...document.querySelectorAll('#grid .hit')].every(h => h.dataset.camid !== '0')")
        cams = {page.locator("#grid .hit").nth(i).get_attribute("data-camid")
                for i in range(page.locator("#grid .hit").count())}
        n_other = sum(1 for f in files if "_c1s" not in f.name)
        assert cams <= {"1", "2"} and page.locator("#grid .hit").count() == min(20, n_other)
        assert not errors and "error" not in (page.locator("#status").get_attribute("class") or "")
        page.close()
