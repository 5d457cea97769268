#!/usr/bin/env python
"""Screenshot of the `reid-gallery serve` page showing one tracklet's trajectory ("where next"), for docs/.

    reid-gallery ingest /tmp/real VIDEO_DIR/people-detection.264 --camera 0 --every 5 \\
        --detector VIDEO_DIR/pedestrian-detection-adas-0002.xml \\
        --config configs/demo_synthetic.yml --weights weights/demo_synthetic.pth
    python tools/video_trajectory_screenshot.py /tmp/real 5 --within=-20s..1min --same-camera \\
        --out /tmp/video_trajectory.png

Serves GALLERY on loopback, opens `/?after=ID&within=...` in headless Chromium (the system's, as .ci/run
installs it) and saves the page once the trajectory and its thumbnails are drawn.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from urllib.parse import urlencode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from reid_lite.index.server import BackgroundServer, create_app  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main(argv: list[str] | None = None) -> int:
    """Write the screenshot; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gallery", help="a gallery with tracklets (reid-gallery ingest)")
    ap.add_argument("tracklet", type=int, help="the tracklet id to follow")
    ap.add_argument("--within", default="..", help="the window after it ends (default: any time after)")
    ap.add_argument("--same-camera", action="store_true", help="its own camera too")
    ap.add_argument("-k", type=int, default=10, help="hits (default 10)")
    ap.add_argument("--out", default="video_trajectory.png")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    query = {"after": args.tracklet, "within": args.within, "k": args.k,
             **({"same_camera": "1"} if args.same_camera else {})}
    with BackgroundServer(create_app(args.gallery)) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.set_default_timeout(60_000)
        page.goto(f"{server.url}/?{urlencode(query)}")
        page.wait_for_function("document.getElementById('trajectory-title').textContent.includes('#') && "
                               "[...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalHeight)")
        page.wait_for_timeout(500)  # the SVG's <image> thumbnails
        page.screenshot(path=args.out, full_page=True)
        status = page.locator("#status").text_content()
        browser.close()
    print(f"wrote {args.out}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
