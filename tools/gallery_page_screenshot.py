"""Screenshot of the `reid-gallery serve` page after a search, from synthetic crops only (for docs/).

    python tools/gallery_page_screenshot.py --out docs/gallery_page.png

Generates the demo's synthetic pedestrians (reid_lite.data.synthetic, 12 test identities), builds a gallery
of their crops with the committed demo model (configs/demo_synthetic.yml), calibrates its "no match"
threshold on another synthetic split (so the page dims the unlikely hits), serves it on loopback,
uploads one query crop in headless Chromium (the system's, as .ci/run installs it) and saves the page.
No real photos are involved.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from reid_lite.config import load_cfg  # noqa: E402
from reid_lite.data.synthetic import generate_reid_dataset  # noqa: E402
from reid_lite.index.calibration import calibrate_gallery  # noqa: E402
from reid_lite.index.crops import collect_crops  # noqa: E402
from reid_lite.index.gallery import Gallery  # noqa: E402
from reid_lite.index.server import BackgroundServer, create_app  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PATTERN = r"(?P<pid>-?\d+)_c(?P<camid>\d+)s\d+_(?P<timestamp>\d+)"  # the frame number is the timestamp


def main(argv: list[str] | None = None) -> int:
    """Write the screenshot; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/gallery_page.png")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="reid-page-") as tmp:
        crops = generate_reid_dataset(Path(tmp) / "crops", num_train_ids=2, num_test_ids=12, num_cameras=4,
                                      images_per_id_per_camera=2, num_distractors=4, progress=True)
        cfg = load_cfg(str(REPO / "configs/demo_synthetic.yml"),
                       ["TEST.WEIGHT", str(REPO / "weights/demo_synthetic.pth"), "MODEL.DEVICE", "cpu"])
        g = Gallery.build(Path(tmp) / "gal", cfg, [crops / "bounding_box_test"], pattern=PATTERN)[0]
        # The threshold comes from a labelled split of other synthetic pedestrians (the demo's size and
        # layout, another seed), embedded by the gallery's model: the rule of tools/test.py --calibrate.
        split = generate_reid_dataset(Path(tmp) / "calib", num_train_ids=2, seed=1, progress=True)
        sides = []
        for folder in ("query", "bounding_box_test"):
            records = collect_crops([split / folder], pattern=PATTERN)
            feats, pos, _, _ = g.embed_records(records, progress=True)
            sides.append((feats, [records[i].identity for i in pos], [records[i].camid for i in pos]))
        entry = calibrate_gallery(g, *sides[0], *sides[1], source="synthetic pedestrians, seed 1")
        print(f"threshold {entry['threshold']:.4f}: precision {entry['precision']:.3f}, recall {entry['recall']:.3f} "
              f"on {entry['num_queries']} queries")
        g.close()
        query = sorted((crops / "query").glob("*.jpg"))[3]
        with BackgroundServer(create_app(Path(tmp) / "gal")) as server, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.set_default_timeout(60_000)
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('gallery-info').textContent.includes('crops')")
            page.fill("#k", "16")
            page.set_input_files("#file", str(query))
            page.wait_for_function("document.querySelectorAll('#grid .hit').length === 16 && "
                                   "[...document.querySelectorAll('#grid img')].every(i => i.complete && "
                                   "i.naturalHeight)")
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    print(f"wrote {args.out} (query {query.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
