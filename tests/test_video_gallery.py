"""Video into a gallery (reid-gallery ingest): one entry per tracklet, crash safety, re-ingest, search-after
(ordering and window), the CLI, the HTTP API and the trajectory page in headless Chromium."""

from __future__ import annotations

import io
import math
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import load_tool
from doc_commands import doc_command
from extras import import_extra
from PIL import Image
from serve_util import TINY
from test_serve_page import ARGS, require_chromium
from test_video import REAL, colour_detector, ssd_onnx, visible_frames, write_video

from reid_lite.config import load_cfg
from reid_lite.index.cli import main as index_main
from reid_lite.index.crops import to_seconds
from reid_lite.index.gallery import Gallery
from reid_lite.index.server import BackgroundServer, create_app
from reid_lite.index.store import CropRecord
from reid_lite.index.tracklets import (
    TrackletRecord,
    VideoRecord,
    add_tracklets,
    parse_duration,
    parse_within,
    search_after,
    tracklet_table,
)
from reid_lite.video import ingest_to_gallery
from reid_lite.video.cli import main

pytest.importorskip("supervision")

REPO = Path(__file__).resolve().parents[1]
T = 60


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "cam.avi")


def new_gallery(path: Path) -> Gallery:
    """An empty gallery of the tiny random-init model (camera SIE over 3 cameras)."""
    return Gallery.create(path, load_cfg(None, TINY), camera_num=3)


def tiny_config(folder: Path) -> str:
    """A YAML file of the tiny random-init model (for the CLI's --config)."""
    path = folder / "tiny.yml"
    path.write_text(load_cfg(None, TINY).dump(), encoding="utf-8")
    return str(path)


def entries(g: Gallery) -> int:
    return g.store.count()


# ----------------------------------------------------------------------------- ingest: one entry per tracklet


def test_ingest_stores_one_entry_per_tracklet(tmp_path, video):
    g = new_gallery(tmp_path / "gal")
    report = ingest_to_gallery(g, video, colour_detector, camera=2, start=1000.0, every=2, progress=False,
                               keep_crops=True)
    assert report.added and report.generation == g.generation == 1 and len(report.tracklets) == 3
    assert report.stats is not None and "frames/s" in report.stats.summary()
    g = Gallery.open(tmp_path / "gal")  # what was published, checksums verified
    table = tracklet_table(g.store)
    assert entries(g) == table.count() == 3 and g.index.ntotal == 3
    stored = table.list()
    recs = g.store.get([t.id for t in stored])
    for t, name in zip(stored, ["red", "green", "blue"]):  # time order = the order the people came in
        first, last = visible_frames(name)
        assert first - 2 <= t.first_frame <= first + 4 and last - 4 <= t.last_frame <= last + 2, (name, t)
        assert t.start == pytest.approx(1000.0 + t.first_frame / 10)
        assert t.end == pytest.approx(1000.0 + t.last_frame / 10)
        assert t.camid == 2 and t.crop_count == 8 and t.boxes >= 10
        r = recs[t.id]  # the entry: the tracklet's camera, start time and track, searchable like a crop
        assert (r.camid, r.timestamp, r.track) == (2, t.start, str(t.track)) and r.path.endswith(f"#track{t.track}")
        rgb = np.asarray(Image.open(io.BytesIO(table.thumbnail(t.id)))).reshape(-1, 3).mean(axis=0)
        assert int(np.argmax(rgb)) == {"red": 0, "green": 1, "blue": 2}[name]  # the thumbnail shows this person
        crops = table.crops(t.id)
        assert len(crops) == 8 and all(j[:2] == b"\xff\xd8" for _, j in crops)
        assert {f for f, _ in crops} <= set(range(t.first_frame, t.last_frame + 1))
    feats = g.crop_features([t.id for t in stored])
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)  # the aggregate, unit length
    assert table.videos()[0].frames == 120 and table.videos()[0].tracklets == 3


# ----------------------------------------------------------------------------- re-ingest and crash safety


def test_reingest_adds_nothing_and_other_settings_add_again(tmp_path, video):
    g = new_gallery(tmp_path / "gal")
    first = ingest_to_gallery(g, video, colour_detector, camera=0, every=3, progress=False)
    again = ingest_to_gallery(g, video, colour_detector, camera=0, every=3, progress=False)
    assert first.added and not again.added and again.stats is None  # skipped before decoding
    assert [t.id for t in again.tracklets] == [t.id for t in first.tracklets] and g.generation == first.generation
    assert entries(Gallery.open(tmp_path / "gal")) == 3
    other = ingest_to_gallery(g, video, colour_detector, camera=1, start=500.0, every=3, progress=False)
    assert other.added and "ingested before with other settings" in other.notes[0]
    assert entries(Gallery.open(tmp_path / "gal")) == 6 and len(tracklet_table(g.store).videos()) == 2


def test_crash_mid_video_or_mid_write_publishes_nothing(tmp_path, video):
    g = new_gallery(tmp_path / "gal")

    def boom(frame, ids, boxes):
        if frame.index >= 50:
            raise RuntimeError("crash mid-video")

    with pytest.raises(RuntimeError, match="mid-video"):
        ingest_to_gallery(g, video, colour_detector, camera=0, every=2, progress=False, on_frame=boom)

    def fail_at_staged(stage):
        if stage == "staged":
            raise RuntimeError("crash mid-write")

    g.on_stage = fail_at_staged
    with pytest.raises(RuntimeError, match="mid-write"):
        ingest_to_gallery(g, video, colour_detector, camera=0, every=2, progress=False)
    g.on_stage = None
    fresh = Gallery.open(tmp_path / "gal")
    assert fresh.generation == 0 and entries(fresh) == 0 and tracklet_table(fresh.store).count() == 0
    assert sorted(p.name for p in (tmp_path / "gal").iterdir() if p.name.startswith("gen-")) == ["gen-000000"]
    # the same video then goes in whole, once
    assert ingest_to_gallery(g, video, colour_detector, camera=0, every=2, progress=False).added
    assert not ingest_to_gallery(g, video, colour_detector, camera=0, every=2, progress=False).added
    assert entries(Gallery.open(tmp_path / "gal")) == 3


KILLER = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_video import colour_detector
from reid_lite.index.crops import to_seconds
from reid_lite.index.gallery import Gallery
from reid_lite.video import ingest_to_gallery

def die(*_):
    os.kill(os.getpid(), signal.SIGKILL)

g = Gallery.open({gallery!r})
if {when!r} == "mid-video":
    on_frame = lambda f, ids, boxes: die() if f.index >= 60 else None
else:
    on_frame = None
    g.on_stage = lambda stage: die() if stage == {when!r} else None
ingest_to_gallery(g, {video!r}, colour_detector, camera=0, every=2, progress=False, on_frame=on_frame)
print("not killed")
"""


@pytest.mark.parametrize("when", ["mid-video", "staged"])
def test_sigkill_leaves_the_gallery_as_it_was(tmp_path, video, when):
    new_gallery(tmp_path / "gal").close()
    script = KILLER.format(tests=str(REPO / "tests"), gallery=str(tmp_path / "gal"), when=when, video=str(video))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    g = Gallery.open(tmp_path / "gal")  # verified: the published generation is whole
    assert g.generation == 0 and entries(g) == 0 and tracklet_table(g.store).count() == 0
    report = ingest_to_gallery(g, video, colour_detector, camera=0, every=2, progress=False)  # the next run
    assert report.added and entries(Gallery.open(tmp_path / "gal")) == 3


# ----------------------------------------------------------------------------- search after: order and window


def jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (30, 80), colour).save(buf, "JPEG")
    return buf.getvalue()


#: (camera, start, end, person): the query is the first; person "a" appears on several cameras at known times.
SCENE = [(0, 100.0, 110.0, "a"), (2, 105.0, 108.0, "a"), (1, 130.0, 140.0, "a"), (1, 131.0, 135.0, "b"),
         (0, 150.0, 160.0, "a"), (2, 200.0, 215.0, "a"), (2, 250.0, 260.0, "b"), (1, 1000.0, 1010.0, "a")]
COLOURS = {"a": (200, 40, 40), "b": (40, 40, 200)}


def scene_gallery(path: Path) -> tuple[Gallery, list[int]]:
    """A gallery of SCENE's tracklets with made-up features: person a's close to one direction (the better the
    earlier in SCENE), b's to another. Returns it and the tracklets' ids in SCENE order."""
    g = new_gallery(path)
    rng = np.random.default_rng(0)
    base = {p: rng.normal(size=g.dim) for p in "ab"}
    feats, recs, ents = [], [], []
    for n, (cam, start, end, person) in enumerate(SCENE):
        f = base[person] + 0.1 * n * rng.normal(size=g.dim) / math.sqrt(g.dim) * np.linalg.norm(base[person])
        feats.append(f / np.linalg.norm(f))
        recs.append(TrackletRecord(video="v" * 64, track=n, camid=cam, start=start, end=end, first_frame=n * 10,
                                   last_frame=n * 10 + 9, boxes=5, crop_count=4, thumbnail=jpeg(COLOURS[person])))
        ents.append(CropRecord(path=f"/videos/scene.mp4#track{n}", sha256=f"{n:064x}", camid=cam, timestamp=start,
                               timestamp_raw=f"{start:.2f}", track=str(n)))
    video = VideoRecord(key="v" * 64, sha256="s" * 64, path="/videos/scene.mp4", camid=None, start=0.0,
                        settings={"made": "up"}, frames=100, fps=10.0)
    stored, added = add_tracklets(g, video, recs, ents, np.asarray(feats, np.float32))
    assert added and stored.generation == g.generation
    return g, [r.id for r in recs]


def test_search_after_orders_hits_in_time_within_the_window(tmp_path):
    g, ids = scene_gallery(tmp_path / "gal")
    res = search_after(g, ids[0], parse_within("20s..10min"), k=10)
    # other cameras only, starting 20 s .. 10 min after the query ends (110 s): 130, 131, 200, 250 (not 1000)
    assert [h.hit.id for h in res.hits] == [ids[2], ids[3], ids[5], ids[6]]
    assert [h.start for h in res.hits] == sorted(h.start for h in res.hits)
    assert res.window == (130.0, 710.0) and res.hits[0].tracklet.end == 140.0
    ranks = {h.hit.id: h.hit.rank for h in res.hits}
    assert ranks[ids[2]] < ranks[ids[3]] and ranks[ids[5]] < ranks[ids[6]]  # person a above b
    top2 = search_after(g, ids[0], parse_within("20s..10min"), k=2)  # the 2 most similar, then in time order
    assert [h.hit.id for h in top2.hits] == [ids[2], ids[5]] and [h.hit.rank for h in top2.hits] == [1, 2]
    same = search_after(g, ids[0], parse_within("..1min"), k=10, same_camera=True)
    assert [h.hit.id for h in same.hits] == [ids[2], ids[3], ids[4]]  # camera 0 at 150 s too; 105 s is before
    assert [h.hit.id for h in search_after(g, ids[0], (0.0, math.inf), cameras=[2]).hits] == [ids[5], ids[6]]
    around = search_after(g, ids[0], parse_within("-10s..1min"), k=10)  # also what starts before it ends
    assert [h.hit.id for h in around.hits] == [ids[1], ids[2], ids[3]]
    empty = search_after(g, ids[0], parse_within("1h..2h"))
    assert empty.hits == [] and empty.notes
    with pytest.raises(KeyError, match="no entry"):
        search_after(g, 999, (0.0, 1.0))


def test_parse_within_and_duration():
    assert parse_within("20s..10min") == (20.0, 600.0)
    assert parse_within("..1.5h") == (0.0, 5400.0) and parse_within("90..") == (90.0, math.inf)
    assert parse_duration("250ms") == 0.25
    assert parse_within("-1min..") == (-60.0, math.inf)
    for bad in ("20s", "10min..20s", "abc..", "5 weeks..", "..-5s", "--5s.."):
        with pytest.raises(ValueError):
            parse_within(bad)


def test_remove_drops_the_tracklet_rows(tmp_path):
    g, ids = scene_gallery(tmp_path / "gal")
    assert g.remove(cameras=[2]) == 3
    table = tracklet_table(Gallery.open(tmp_path / "gal").store)
    assert table.count() == 5 and table.thumbnail(ids[1]) is None and table.thumbnail(ids[0]) is not None


# ----------------------------------------------------------------------------- the CLI


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_ingest_two_videos_then_search_after(tmp_path, video, capsys):
    pytest.importorskip("openvino")
    det = str(ssd_onnx(tmp_path / "det.onnx"))  # one still box: one tracklet over each whole video
    gal = str(tmp_path / "gal")
    args = ["ingest", gal, str(video), str(video), "--camera", "1", "--detector", det, "--every", "4",
            "--start", "2026-12-04T09:00:00", "--no-progress"]
    rc, out, err = run_cli(capsys, *args)
    assert rc == 2 and "no gallery at" in err and "--config" in err  # nothing to embed with yet
    rc, out, err = run_cli(capsys, *args, "--config", tiny_config(tmp_path), "--camera-num", "3")
    assert rc == 0, err
    assert out.count("added 1 tracklet") == 2 and out.count("speed: ") == 2 and "embed" in out
    t0 = to_seconds("2026-12-04T09:00:00")
    # the second video follows the first: 120 frames at 10 fps later
    assert f"{t0:.2f}..{t0 + 12:.2f} s" in out and f"{t0 + 12:.2f}..{t0 + 24:.2f} s" in out
    assert "ingested before with other settings" in out  # same file, another start: added again, said
    rc, out, err = run_cli(capsys, *args)
    assert rc == 0 and out.count("already stored: 1 tracklet") == 2 and "frames/s" not in out
    g = Gallery.open(gal)
    first, second = tracklet_table(g.store).list()
    assert second.start == pytest.approx(first.start + 12.0) and first.camid == second.camid == 1
    rc, out, err = run_cli(capsys, "search", gal, "--after", str(first.id), "--within", "0s..1min", "--same-camera")
    assert rc == 0, err
    assert f"tracklet {first.id}: camera 1" in out and f"id {second.id}" in out and "#1 " in out
    rc, out, err = run_cli(capsys, "search", gal, "--after", str(first.id), "--within", "0s..1min")
    assert rc == 0 and "0 hits" in out  # no other camera
    rc, out, err = run_cli(capsys, "info", gal)
    assert "tracklets 2 from 2 videos" in out
    assert index_main(["info", gal]) == 0  # the index layer's own entry point knows no ingest, but the rest


@pytest.mark.parametrize("case", ["missing video", "bad detector", "bad start", "bad within", "not a tracklet",
                                  "after and images", "within without after", "config for existing",
                                  "missing crops"])
def test_cli_mistakes_are_one_line(tmp_path, video, capsys, case):
    g, ids = scene_gallery(tmp_path / "gal")
    g.close()
    gal = str(tmp_path / "gal")
    det = tmp_path / "det.onnx"
    det.write_bytes(b"junk")
    argv = {
        "missing video": ["ingest", gal, str(tmp_path / "no.mp4"), "--camera", "0", "--detector", str(det)],
        "bad detector": ["ingest", gal, str(video), "--camera", "0", "--detector", str(det)],
        "bad start": ["ingest", gal, str(video), "--camera", "0", "--detector", str(det), "--start", "noon"],
        "bad within": ["search", gal, "--after", str(ids[0]), "--within", "10 parsecs"],
        "not a tracklet": ["search", gal, "--after", "12345"],
        "after and images": ["search", gal, "q.jpg", "--after", str(ids[0])],
        "within without after": ["search", gal, "q.jpg", "--within", "..1min"],
        "config for existing": ["ingest", gal, str(video), "--camera", "0", "--detector", str(det), "--config",
                                tiny_config(tmp_path)],
        "missing crops": ["add", gal, str(tmp_path / "no_such_folder")],
    }[case]
    rc, out, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "error:" in lines[0], err
    if case == "missing crops":  # the path as typed, not a Python list
        assert lines[0].endswith(f"no such image file or folder: {tmp_path / 'no_such_folder'}"), err


# ----------------------------------------------------------------------------- the HTTP API


def test_http_api_tracklets_and_where_next(tmp_path):
    g, ids = scene_gallery(tmp_path / "gal")
    g.close()
    with BackgroundServer(create_app(tmp_path / "gal")) as s:
        info = requests.get(f"{s.url}/api/info", timeout=T).json()
        assert info["tracklets"] == len(SCENE)
        listed = requests.get(f"{s.url}/api/tracklets", timeout=T).json()["tracklets"]
        assert [t["start"] for t in listed] == sorted(t[1] for t in SCENE)
        assert all("/videos" not in str(t) for t in listed)  # no server paths
        one = requests.get(f"{s.url}/api/tracklets/{ids[2]}", timeout=T).json()
        assert (one["camid"], one["start"], one["end"], one["crop_count"]) == (1, 130.0, 140.0, 4)
        r = requests.get(f"{s.url}/api/tracklets/{ids[0]}/after", params={"within": "20s..10min"}, timeout=T)
        assert r.status_code == 200, r.text
        body = r.json()
        assert [h["id"] for h in body["hits"]] == [ids[2], ids[3], ids[5], ids[6]]
        assert body["window"] == [130.0, 710.0] and body["query"]["id"] == ids[0]
        assert all(h["tracklet"]["end"] == h["end"] for h in body["hits"])
        body = requests.get(f"{s.url}/api/tracklets/{ids[0]}/after",
                            params={"within": "..1min", "same_camera": "true", "k": 2}, timeout=T).json()
        assert [h["id"] for h in body["hits"]] == [ids[2], ids[4]]
        thumb = requests.get(f"{s.url}/api/crops/{ids[3]}/thumbnail", timeout=T)
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert np.asarray(Image.open(io.BytesIO(thumb.content)))[..., 2].mean() > 150  # person b is blue
        hits = requests.get(f"{s.url}/api/crops/{ids[0]}/search", params={"k": 3}, timeout=T).json()["hits"]
        assert hits[0]["id"] == ids[0] and hits[0]["tracklet"]["start"] == 100.0 and hits[0]["end"] == 110.0
        for url, status in [(f"/api/tracklets/{ids[0]}/after?within=sideways", 400), ("/api/tracklets/999", 404),
                            ("/api/tracklets/999/after", 404), (f"/api/tracklets/{ids[0]}/after?k=0", 422)]:
            r = requests.get(s.url + url, timeout=T)
            assert r.status_code == status and list(r.json()) == ["error"], (url, r.text)


# ----------------------------------------------------------------------------- the page


def test_page_trajectory_view(tmp_path):
    sync_api = import_extra("playwright.sync_api", "test")
    chromium = require_chromium()
    g, ids = scene_gallery(tmp_path / "gal")
    g.close()
    with BackgroundServer(create_app(tmp_path / "gal")) as server, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(20_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: errors.append(r.url))
        page.goto(f"{server.url}/?after={ids[0]}&within=20s..10min")  # a link straight to a trajectory
        page.wait_for_function("document.querySelectorAll('#trajectory g.item').length === 5")
        assert page.locator("#trajectory g.item.query").count() == 1
        assert page.locator("#trajectory .lane-label").all_text_contents() == ["camera 0", "camera 1", "camera 2"]
        assert [page.locator("#grid .hit").nth(i).get_attribute("data-id") for i in range(4)] == \
            [str(i) for i in (ids[2], ids[3], ids[5], ids[6])]  # in time order
        assert "4 hits on other cameras within 20s..10min" in page.locator("#status").text_content()
        xs = [float(page.locator(f"#trajectory g.item[data-id='{i}'] rect").get_attribute("x")) for i in
              (ids[0], ids[2], ids[5], ids[6])]
        assert xs == sorted(xs)  # along the time axis
        page.wait_for_function("[...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalHeight)")
        if os.environ.get("REID_LITE_TRAJECTORY_SCREENSHOT"):
            page.screenshot(path=os.environ["REID_LITE_TRAJECTORY_SCREENSHOT"], full_page=True)
        # the tracklet list: a click searches from it, then "where next" draws its trajectory
        assert page.locator("#tracklets .tracklet").count() == len(SCENE)
        page.locator(f"#tracklets .tracklet[data-id='{ids[4]}']").click()
        page.wait_for_function(f"document.getElementById('status').textContent.includes('crop #{ids[4]} ') || "
                               f"document.querySelector('#grid .hit')?.dataset.id === '{ids[4]}'")
        page.fill("#within", "..2min")
        page.locator("#next").click()
        page.wait_for_function(f"document.getElementById('trajectory-title').textContent.includes('#{ids[4]}')")
        # camera 2 at 200 s and 250 s start within 2 min of 160 s
        page.wait_for_function("document.querySelectorAll('#trajectory g.item').length === 3")
        assert [page.locator("#grid .hit").nth(i).get_attribute("data-id") for i in range(2)] == [str(ids[5]),
                                                                                                   str(ids[6])]
        assert not errors, errors
        browser.close()


def test_documented_synthetic_trajectory_screenshot(tmp_path, capsys):
    """docs/img/video_trajectory.png's command (docs/video.md): three generated camera videos of synthetic
    pedestrians, ingested with the demo model through a background-subtraction detector, give one tracklet
    per pass; the followed person's passes on cameras 1 and 2 are the two most similar hits; the page is saved."""
    import_extra("playwright.sync_api", "test")
    chromium = require_chromium()
    tool = load_tool("video_trajectory_screenshot")
    args = shlex.split(doc_command("python tools/video_trajectory_screenshot.py --synthetic"))[2:]
    args[args.index("--out") + 1] = str(tmp_path / "trajectory.png")
    assert tool.main([*args, "--chromium", chromium]) == 0
    out = capsys.readouterr().out
    for camera, (_, passes) in tool.SCENE.items():
        assert f"camera {camera}: {len(passes)} tracklets" in out, out
    hits = [tuple(map(int, m)) for m in re.findall(r"hit rank (\d+): tracklet \d+, camera (\d+), person (\d+)", out)]
    assert len(hits) == 6 and {c for _, c, _ in hits} == {1, 2}  # other cameras only, within 20s..10min
    assert {r for r, _, p in hits if p == tool.FOLLOWED} == {1, 2}  # on camera 1 and 2, the two best
    assert "6 hits on other cameras within 20s..10min after tracklet #0" in out
    png = Image.open(tmp_path / "trajectory.png")
    assert png.width == 1280 and png.height > 860 and png.mode == "P"  # the whole page, 256 colours


@pytest.mark.skipif(not REAL.is_dir(), reason=f"real video folder absent: {REAL}")
def test_real_video_through_the_command(tmp_path, capsys):
    """The real video via `reid-gallery ingest` (tiny random model: the spans, not the features, are checked):
    the 7 tracklets of test_video's real-video test, one entry each."""
    pytest.importorskip("openvino")
    gal = str(tmp_path / "gal")
    rc, out, err = run_cli(capsys, "ingest", gal, str(REAL / "people-detection.264"), "--camera", "0",
                           "--detector", str(REAL / "pedestrian-detection-adas-0002.xml"), "--every", "5",
                           "--no-progress", "--config", tiny_config(tmp_path), "--camera-num", "2")
    assert rc == 0, err
    assert "added 7 tracklets" in out and "596 frames at 25 fps" in out
    g = Gallery.open(gal)
    spans = [(t.first_frame, t.last_frame) for t in tracklet_table(g.store).list()]
    assert len(spans) == entries(g) == 7
    assert spans[0][0] == pytest.approx(30, abs=6) and spans[-1] == pytest.approx((530, 550), abs=6), spans
