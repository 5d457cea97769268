#!/usr/bin/env python
"""Screenshot of the `reid-gallery serve` page showing one tracklet's trajectory ("where next"), for docs/.

    python tools/video_trajectory_screenshot.py --synthetic --out docs/img/video_trajectory.png
    python tools/video_trajectory_screenshot.py GALLERY 5 --within=-20s..1min --same-camera --out traj.png

`--synthetic` (what docs/img/video_trajectory.png shows, no real footage involved): writes three generated
camera videos in a temporary folder, the demo's synthetic pedestrians (reid_lite.data.synthetic) walking
through them, one of them on every camera; ingests them as cameras 0, 1 and 2 of a new gallery of the demo
model (configs/demo_synthetic.yml, weights/demo_synthetic.pth; every 2nd frame, a background-subtraction
detector, as each camera's empty room is known) and follows that person's first tracklet. Otherwise it
follows tracklet ID of a gallery you ingested (reid-gallery ingest).

Serves the gallery on loopback (the app of `reid-gallery serve`), opens `/?after=ID&within=...` in headless
Chromium (the system's, as .ci/run installs it) and saves the page (256 colours) once the trajectory and its
thumbnails are drawn.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import cv2
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from reid_lite.config import load_cfg  # noqa: E402
from reid_lite.data.synthetic import make_camera, make_identity, render_person  # noqa: E402
from reid_lite.index.gallery import Gallery  # noqa: E402
from reid_lite.index.server import BackgroundServer, create_app  # noqa: E402
from reid_lite.index.tracklets import parse_within, search_after, tracklet_table  # noqa: E402
from reid_lite.video import ingest_to_gallery  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# ----------------------------------------------------------------------------- the synthetic cameras

W, H, FPS, SECONDS = 480, 360, 10.0, 14
PERSON = (144, 72)  #: a pedestrian's box, height x width (the demo's 2:1 crops)
SPEED = 110.0  #: pixels per second, left to right or right to left
START = _dt.datetime(2026, 12, 4, 9, 0, 0, tzinfo=_dt.timezone.utc)  #: camera 0's first frame
#: camera -> (its video's start after START in seconds, passes: (person, seconds into the video, row, rightwards));
#: a pass takes 5 s; passes in one row do not meet, the two rows are 36 px apart (one blob per person)
SCENE: dict[int, tuple[float, list[tuple[int, float, int, bool]]]] = {
    0: (0.0, [(1, 0.5, 0, True), (2, 2.0, 1, False), (3, 6.5, 0, True)]),
    1: (40.0, [(4, 0.5, 0, False), (1, 4.0, 1, True), (2, 6.0, 0, True)]),
    2: (95.0, [(5, 0.5, 1, True), (3, 1.5, 0, False), (1, 7.5, 0, True), (6, 8.5, 1, False)]),
}
FOLLOWED = 1  #: the person whose trajectory is shown: on every camera


@dataclass(frozen=True)
class SyntheticVideo:
    """One generated camera video: its file, camera, start time (s) and empty room (BGR)."""

    path: Path
    camera: int
    start: str
    background: np.ndarray


def room(camera: int) -> np.ndarray:
    """A camera's empty room (BGR): its wall and floor colours (reid_lite.data.synthetic's camera), a soft
    texture and a few fixed shapes."""
    spec = make_camera(camera + 1, seed=7)
    rng = np.random.default_rng(camera)
    horizon = int(H * spec.horizon)
    img = np.empty((H, W, 3), np.float32)
    t = np.linspace(0.0, 1.0, horizon)[:, None, None]
    img[:horizon] = (1 - t) * np.asarray(spec.bg_top) + t * np.asarray(spec.bg_bottom)
    img[horizon:] = spec.floor_color
    texture = cv2.resize(rng.normal(0.0, 1.0, (H // 16, W // 16)).astype(np.float32), (W, H),
                         interpolation=cv2.INTER_CUBIC)
    img += (spec.texture_amp * texture)[..., None]
    for _ in range(4):  # doors, windows, furniture
        x, y = int(rng.integers(0, W - 60)), int(rng.integers(0, horizon - 40))
        colour = np.clip(np.asarray(spec.bg_bottom) + rng.normal(0.0, 30.0, 3), 0, 255)
        cv2.rectangle(img, (x, y), (x + int(rng.integers(30, 60)), y + int(rng.integers(30, 80))), colour.tolist(), -1)
    return cv2.cvtColor(np.clip(img, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)


def write_synthetic_videos(folder: Path) -> list[SyntheticVideo]:
    """Write SCENE's camera videos (MJPG .avi) into `folder`: each pass is one pedestrian of the demo's
    synthetic test split crossing the room, rendered afresh each frame (pose, exposure, noise) as its
    camera sees it."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for camera, (offset, passes) in SCENE.items():
        spec = make_camera(camera + 1, seed=7)
        bg = room(camera)
        rng = np.random.default_rng(100 + camera)
        path = folder / f"cam{camera}.avi"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (W, H))
        if not writer.isOpened():
            raise RuntimeError(f"OpenCV cannot write {path}")
        for i in range(int(SECONDS * FPS)):
            frame = bg.copy()
            for person, at, row, rightwards in passes:
                dx = (i / FPS - at) * SPEED
                x = int(-PERSON[1] + dx) if rightwards else int(W - dx)
                if dx < 0 or x <= -PERSON[1] or x >= W:
                    continue
                y = 20 + row * (PERSON[0] + 36)
                crop = render_person(make_identity(1000 + person, seed=7, twin_prob=0.0), spec, rng, size=PERSON)
                x0, x1 = max(x, 0), min(x + PERSON[1], W)  # cut by the frame's edge while it walks in or out
                frame[y:y + PERSON[0], x0:x1] = cv2.cvtColor(crop, cv2.COLOR_RGB2BGR)[:, x0 - x:x1 - x]
            writer.write(frame)
        writer.release()
        out.append(SyntheticVideo(path, camera, (START + _dt.timedelta(seconds=offset)).isoformat(), bg))
    return out


class BackgroundDetector:
    """Person boxes of a fixed camera whose empty room is known: the pixels that differ from it, joined into
    blobs (conf 0.9); the stand-in for a person detector in the synthetic scene."""

    def __init__(self, background: np.ndarray, min_area: int = 600) -> None:
        self.background = background.astype(np.int16)
        self.min_area = min_area

    def __call__(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        """Boxes `(n, 5)` `[x1, y1, x2, y2, conf]` per frame."""
        out = []
        for f in frames:
            mask = (np.abs(f.astype(np.int16) - self.background).max(axis=2) > 40).astype(np.uint8)
            mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((15, 15), np.uint8))
            _, _, stats, _ = cv2.connectedComponentsWithStats(mask)
            st = stats[1:][stats[1:, cv2.CC_STAT_AREA] >= self.min_area].astype(np.float32)
            x, y, w, h = (st[:, k] for k in range(4))
            out.append(np.stack([x, y, x + w, y + h, np.full_like(x, 0.9)], axis=1).reshape(-1, 5))
        return out


def synthetic_gallery(folder: Path, weights: Path = REPO / "weights/demo_synthetic.pth") -> tuple[Path, dict[int, int]]:
    """Build the synthetic scene's gallery under `folder` (demo model); returns its path and each tracklet's
    person (tracklet id -> SCENE person), matched by camera and time."""
    cfg = load_cfg(str(REPO / "configs/demo_synthetic.yml"), ["TEST.WEIGHT", str(weights), "MODEL.DEVICE", "cpu"])
    gal = folder / "gallery"
    g = Gallery.create(gal, cfg)
    for v in write_synthetic_videos(folder / "videos"):
        report = ingest_to_gallery(g, v.path, BackgroundDetector(v.background), camera=v.camera, start=v.start,
                                   every=2, progress=False)
        print(f"camera {v.camera}: {len(report.tracklets)} tracklets; {report.stats.summary()}")
    g.close()
    people = {}
    with Gallery.open(gal) as opened:
        tracklets = tracklet_table(opened.store).list()
    for t in tracklets:
        offset, passes = SCENE[t.camid]
        # the pass that entered last before the tracklet started: its first box comes less than 1 s after
        # it enters (a sliver at the edge is too small a blob), and passes enter at least 1 s apart
        entered = [(at, p) for p, at, _, _ in passes if START.timestamp() + offset + at <= t.start + 1e-3]
        people[t.id] = max(entered)[1]
    return gal, people


# ----------------------------------------------------------------------------- the screenshot


def screenshot(gallery: str | Path, tracklet: int, out: str | Path, within: str = "..", k: int = 10,
               same_camera: bool = False, chromium: str = "/usr/bin/chromium") -> str:
    """Serve `gallery` on loopback, open tracklet's trajectory in headless Chromium, save the page to `out`;
    returns the page's status line."""
    from playwright.sync_api import sync_playwright

    query = {"after": tracklet, "within": within, "k": k, **({"same_camera": "1"} if same_camera else {})}
    with BackgroundServer(create_app(gallery)) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.set_default_timeout(60_000)
        page.goto(f"{server.url}/?{urlencode(query)}")
        page.wait_for_function("document.getElementById('trajectory-title').textContent.includes('#') && "
                               "[...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalHeight)")
        page.wait_for_timeout(500)  # the SVG's <image> thumbnails
        png = page.screenshot(full_page=True)
        status = page.locator("#status").text_content() or ""
        browser.close()
    # 256 colours: the page is flat colour but for the thumbnails, so a docs image stays small
    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(out, optimize=True)
    return status


def main(argv: list[str] | None = None) -> int:
    """Write the screenshot; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gallery", nargs="?", help="a gallery with tracklets (reid-gallery ingest)")
    ap.add_argument("tracklet", nargs="?", type=int, help="the tracklet id to follow")
    ap.add_argument("--synthetic", action="store_true",
                    help="generate three camera videos of synthetic pedestrians and follow one of them")
    ap.add_argument("--within", default=None, help="the window after it ends (default: any time after; "
                                                   "--synthetic: 20s..10min)")
    ap.add_argument("--same-camera", action="store_true", help="its own camera too")
    ap.add_argument("-k", type=int, default=None, help="hits (default 10; --synthetic: 6)")
    ap.add_argument("--out", default="video_trajectory.png")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args(argv)
    if args.synthetic == (args.gallery is not None):
        ap.error("give GALLERY TRACKLET, or --synthetic")
    if args.gallery is not None and args.tracklet is None:
        ap.error("give the tracklet id to follow after GALLERY")
    with tempfile.TemporaryDirectory(prefix="reid-trajectory-") as tmp:
        gallery, tracklet = args.gallery, args.tracklet
        within, k = args.within or ("20s..10min" if args.synthetic else ".."), args.k or (6 if args.synthetic else 10)
        if args.synthetic:
            gallery, people = synthetic_gallery(Path(tmp))
            tracklet = min(t for t, p in people.items() if p == FOLLOWED)
            with Gallery.open(gallery) as g:
                hits = search_after(g, tracklet, parse_within(within), k=k, same_camera=args.same_camera).hits
            for h in hits:
                who = people[h.hit.id]
                print(f"hit rank {h.hit.rank}: tracklet {h.hit.id}, camera {h.tracklet.camid}, person {who}"
                      f"{' (the followed person)' if who == FOLLOWED else ''}, score {h.hit.score:.3f}")
        status = screenshot(gallery, tracklet, args.out, within, k, args.same_camera, args.chromium)
    print(f"wrote {args.out}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
