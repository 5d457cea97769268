"""`reid-gallery serve`: the HTTP API with a real server on loopback (search, filters, thumbnails, refusals,
upload limits, a search while a writer publishes)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from PIL import Image
from serve_util import build_gallery, make_crops

from reid_lite.index.gallery import Gallery
from reid_lite.index.live import LiveGallery
from reid_lite.index.server import UPLOADS, BackgroundServer, create_app

REPO = Path(__file__).resolve().parent.parent
T = 60  # seconds: every request is bounded


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> Path:
    return make_crops(tmp_path_factory.mktemp("crops"))


@pytest.fixture(scope="module")
def live(tmp_path_factory, crops) -> LiveGallery:
    root = tmp_path_factory.mktemp("g") / "gal"
    build_gallery(root, crops).close()
    return LiveGallery(root)


@pytest.fixture(scope="module")
def server(live):
    with BackgroundServer(create_app(live)) as s:
        yield s


def gallery_files(crops: Path) -> list[Path]:
    return sorted((crops / "bounding_box_test").glob("*.jpg"))


def upload(server, path: Path, **params) -> requests.Response:
    return requests.post(f"{server.url}/api/search", data=path.read_bytes(),
                         params={"filename": path.name, **params}, timeout=T)


def test_search_by_upload_ranks_the_same_crop_first(server, crops):
    f = gallery_files(crops)[4]
    r = upload(server, f, k=5)
    assert r.status_code == 200, r.text
    body = r.json()
    hits = body["hits"]
    assert len(hits) == 5 and [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert hits[0]["name"] == f.name and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))
    assert body["query"]["camera"] == int(f.name.split("_c")[1][0]) - 1  # read from the file name
    assert hits[0]["camid"] == body["query"]["camera"] and hits[0]["timestamp"] == float(f.stem.split("_")[2])
    assert hits[0]["identity"] == int(f.name[:4])
    assert all("path" not in h and str(crops) not in str(h) for h in hits)  # no server paths in answers
    # an uncalibrated gallery answers as before: no threshold, hits not flagged
    assert body["calibration"] is None and body["no_likely_match"] is None and all(h["likely"] is None for h in hits)


def test_filters_cameras_time_and_own_camera(server, crops):
    f = gallery_files(crops)[0]
    cam = int(f.name.split("_c")[1][0]) - 1
    hits = upload(server, f, k=50, cameras=[1, 2]).json()["hits"]
    assert hits and {h["camid"] for h in hits} <= {1, 2}
    assert len(hits) == sum(1 for p in gallery_files(crops) if "_c2" in p.name or "_c3" in p.name)
    hits = upload(server, f, k=50, exclude_same_camera="true").json()["hits"]
    assert hits and all(h["camid"] != cam for h in hits)
    hits = upload(server, f, k=50, time_from="400", time_to="599").json()["hits"]
    assert hits and all(400 <= h["timestamp"] <= 599 for h in hits)
    r = upload(server, f, k=50, cameras=[2], exclude_same_camera="true", camera=2)
    assert r.status_code == 200 and r.json()["hits"] == [] and "not camera 2" in r.json()["notes"][0]


def test_search_from_a_stored_crop(server, crops):
    first = upload(server, gallery_files(crops)[7], k=3).json()["hits"][0]
    r = requests.get(f"{server.url}/api/crops/{first['id']}/search", params={"k": 4, "exclude_same_camera": "1"},
                     timeout=T)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"]["id"] == first["id"] and len(body["hits"]) == 4
    assert all(h["camid"] != first["camid"] for h in body["hits"])
    same = requests.get(f"{server.url}/api/crops/{first['id']}/search", params={"k": 1}, timeout=T).json()
    assert same["hits"][0]["id"] == first["id"] and same["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    meta = requests.get(f"{server.url}/api/crops/{first['id']}", timeout=T).json()
    assert meta["name"] == first["name"] and meta["camid"] == first["camid"]


def test_thumbnail_of_a_stored_crop(server, crops):
    hit = upload(server, gallery_files(crops)[2], k=1).json()["hits"][0]
    r = requests.get(server.url + hit["thumbnail"], params={"height": 32}, timeout=T)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "JPEG" and img.height == 32 and img.width == 16  # 64x32 crop, aspect kept


@pytest.mark.parametrize("url", [
    "/static/../setup.py", "/static/..%2f..%2fsetup.py", "/static/%2e%2e%2f%2e%2e%2fsetup.py",
    "/api/crops/..%2f..%2f..%2fsetup.py/thumbnail", "/api/crops/%2Fetc%2Fpasswd/thumbnail",
    "/api/crops/999999/thumbnail", "/api/crops/-1/thumbnail", "/static/server.py", "/../../setup.py",
])
def test_refuses_anything_but_gallery_files(server, url):
    r = requests.get(server.url + url, timeout=T)
    assert 400 <= r.status_code < 500, (url, r.status_code)
    assert "error" in r.json() and "install_requires" not in r.text and "root:" not in r.text


def test_refuses_a_crop_whose_file_was_swapped(tmp_path, crops, live):
    folder = tmp_path / "c"
    folder.mkdir()
    for p in gallery_files(crops)[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    g, _ = Gallery.build(tmp_path / "gal", live.current().cfg, [folder], camera_num=3)
    victim = sorted(folder.glob("*.jpg"))[0]
    victim.unlink()
    victim.symlink_to(REPO / "setup.py")  # the gallery's path now names a file that is not the crop
    with BackgroundServer(create_app(tmp_path / "gal")) as s:
        ids = {r.path: r.id for r in g.store.get(g.store.all_ids().tolist()).values()}
        r = requests.get(f"{s.url}/api/crops/{ids[str(victim)]}/thumbnail", timeout=T)
        assert r.status_code == 410 and "changed on disk" in r.json()["error"] and "install_requires" not in r.text
        ok = requests.get(f"{s.url}/api/crops/{ids[str(sorted(folder.glob('*.jpg'))[1])]}/thumbnail", timeout=T)
        assert ok.status_code == 200


def test_oversized_upload_is_413(live, crops):
    f = gallery_files(crops)[0]
    big = f.read_bytes() + b"\0" * 40_000
    with BackgroundServer(create_app(live, max_upload_mb=0.02)) as s:  # ~20 kB
        assert requests.post(f"{s.url}/api/search", data=f.read_bytes(), params={"filename": f.name},
                             timeout=T).status_code == 200
        r = requests.post(f"{s.url}/api/search", data=big, params={"filename": f.name}, timeout=T)
        assert r.status_code == 413 and "--max-upload-mb" in r.json()["error"]
        chunked = requests.post(f"{s.url}/api/search", data=iter([big[:15_000], big[15_000:]]),  # no length
                                params={"filename": f.name}, timeout=T)
        assert chunked.status_code == 413


@pytest.mark.parametrize("method,url,params,body,status,words", [
    ("post", "/api/search", {"k": 0, "camera": 0}, "crop", 422, "k: Input should be greater than or equal to 1"),
    ("post", "/api/search", {"k": "ten", "camera": 0}, "crop", 422, "k: "),
    ("post", "/api/search", {"camera": 0}, b"not an image", 400, "not a readable image"),
    ("post", "/api/search", {"camera": 0}, b"", 400, "empty request body"),
    ("post", "/api/search", {}, "crop", 400, "camera SIE: give the query's camera"),
    ("post", "/api/search", {"camera": 7}, "crop", 400, "outside the model's SIE table"),
    ("post", "/api/search", {"camera": 0, "time_from": "yesterday"}, "crop", 400, "neither a number nor ISO 8601"),
    ("post", "/api/search", {"camera": 0, "cameras": 5}, "crop", 400, "no crop in this gallery is from camera(s) 5"),
    ("post", "/api/crops", {"camera": 0}, "crop", 403, "read-only; start it with --allow-add"),
    ("get", "/api/nothing", {}, None, 404, "Not Found"),
    ("get", "/api/crops/12345", {}, None, 404, "no crop with id 12345"),
    ("get", "/api/crops/1/thumbnail", {"height": 5000}, None, 422, "height: "),
    ("delete", "/api/info", {}, None, 405, "Method Not Allowed"),
    # Numbers beyond SQLite's 64-bit integers, non-finite times, names no file system takes: 4xx, never a 500.
    ("get", "/api/crops/99999999999999999999", {}, None, 422, "crop_id: Input should be less than or equal to"),
    ("get", "/api/crops/99999999999999999999/thumbnail", {}, None, 422, "crop_id: "),
    ("get", "/api/crops/99999999999999999999/search", {}, None, 422, "crop_id: "),
    ("get", "/api/crops/-3", {}, None, 422, "crop_id: Input should be greater than or equal to 0"),
    ("post", "/api/search", {"camera": 0, "cameras": 2**70}, "crop", 400, "cameras: 1180591620717411303424 is not"),
    ("post", "/api/search", {"camera": 0, "nprobe": 2**70}, "crop", 422, "nprobe: "),
    ("post", "/api/search", {"filename": "c" * 300 + "_c1s1_000001_00.jpg"}, "crop", 400,
     "filename of 319 bytes is longer than a file name can be (255 bytes)"),
    ("post", "/api/search", {"camera": 0, "time_from": "nan"}, "crop", 400, "timestamp 'nan' is not a finite number"),
    ("post", "/api/search", {"camera": 0, "time_to": "inf"}, "crop", 400, "timestamp 'inf' is not a finite number"),
    ("post", "/api/search", {"camera": 0, "time_to": "1e400"}, "crop", 400, "timestamp '1e400' is not a finite"),
    ("post", "/api/search", {"camera": 0}, "tiny", 400, "the upload is 4x6 pixels (width x height): too small"),
    ("post", "/api/search", {"camera": 0}, "strip", 400, "height / width 0.1 is outside a person crop's"),
])
def test_one_clear_json_error_per_bad_request(server, crops, method, url, params, body, status, words):
    data = gallery_files(crops)[0].read_bytes() if body == "crop" else body
    if body in ("tiny", "strip"):
        buf = io.BytesIO()
        Image.new("RGB", (4, 6) if body == "tiny" else (200, 20), (90, 40, 20)).save(buf, "PNG")
        data = buf.getvalue()
    r = requests.request(method, server.url + url, params=params, data=data, timeout=T)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json" and list(r.json()) == ["error"]
    assert words in r.json()["error"] and "Traceback" not in r.text and "\n" not in r.json()["error"]


def test_info_and_openapi(server, crops):
    info = requests.get(f"{server.url}/api/info", timeout=T).json()
    assert info["size"] == len(gallery_files(crops)) and info["time_span"] == [301.0, 802.0]
    assert info["sie_camera"] and info["camera_num"] == 3 and info["allow_add"] is False
    assert info["calibration"] is None and info["accepts_merged_queries"] is False
    assert "path" not in info and "manifest" not in info
    spec = requests.get(f"{server.url}/openapi.json", timeout=T).json()
    assert {"/api/search", "/api/info", "/api/crops", "/api/crops/{crop_id}/search",
            "/api/crops/{crop_id}/thumbnail"} <= set(spec["paths"])
    params = {p["name"] for p in spec["paths"]["/api/search"]["post"]["parameters"]}
    assert {"k", "cameras", "time_from", "time_to", "exclude_same_camera", "camera"} <= params
    assert requests.get(f"{server.url}/docs", timeout=T).status_code == 404  # it would load a CDN


def test_search_goes_on_while_an_upload_is_published(tmp_path, crops):
    build_gallery(tmp_path / "gal", crops).close()
    new = sorted((crops / "query").glob("*.jpg"))[0]
    probe = gallery_files(crops)[3]
    seen: list[tuple[int, int]] = []
    during: list[int] = []

    def hold_before_publishing(stage: str) -> None:
        """The writer waits between renaming its generation and swapping CURRENT until two searches
        have been answered meanwhile (bounded: the test fails below if they were not); the first write only."""
        if stage == "renamed" and not during:
            t0, n0 = time.monotonic(), len(seen)
            while len(seen) < n0 + 2 and time.monotonic() - t0 < T / 2:
                time.sleep(0.02)
            during.append(len(seen) - n0)

    live = LiveGallery(tmp_path / "gal", on_stage=hold_before_publishing)
    with BackgroundServer(create_app(live, allow_add=True)) as s:
        gen0 = requests.get(f"{s.url}/api/info", timeout=T).json()["generation"]
        failures: list[str] = []
        stop = threading.Event()

        def search_loop() -> None:
            while not stop.is_set():
                r = upload(s, probe, k=3)
                if r.status_code != 200:
                    failures.append(r.text)
                else:
                    seen.append((r.json()["generation"], r.json()["hits"][0]["name"] == probe.name))

        t = threading.Thread(target=search_loop)
        t.start()
        try:
            r = requests.post(f"{s.url}/api/crops", data=new.read_bytes(),
                              params={"filename": new.name, "timestamp": "2024-05-01T08:00:00"}, timeout=T)
        finally:
            time.sleep(0.3)
            stop.set()
            t.join(T)
        assert r.status_code == 200, r.text
        added = r.json()
        assert added["added"] == 1 and added["generation"] == gen0 + 1
        assert not failures and during and during[0] >= 2 and all(top for _, top in seen)
        gens = [g for g, _ in seen]
        assert gens == sorted(gens) and gens[0] == gen0 and set(gens) <= {gen0, gen0 + 1}
        assert (tmp_path / "gal" / UPLOADS).is_dir() and len(list((tmp_path / "gal" / UPLOADS).iterdir())) == 1
        hit = upload(s, new, k=1).json()
        assert hit["generation"] == gen0 + 1 and hit["hits"][0]["id"] == added["id"]
        assert hit["hits"][0]["timestamp_raw"] == "2024-05-01T08:00:00"
        again = requests.post(f"{s.url}/api/crops", data=new.read_bytes(), params={"camera": 0}, timeout=T).json()
        assert again["added"] == 0 and again["duplicate"] and again["id"] == added["id"]
        # a writer in another process publishes: the server switches to it on the next request
        code = ("import sys; from reid_lite.index import Gallery; g = Gallery.open(sys.argv[1]); "
                "g.add([sys.argv[2]]); print(g.generation)")
        other = sorted((crops / "query").glob("*.jpg"))[1]
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "gal"), str(other)], capture_output=True,
                             text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert out.returncode == 0, out.stderr
        info = requests.get(f"{s.url}/api/info", timeout=T).json()
        assert info["generation"] == int(out.stdout.split()[-1]) == again["generation"] + 1
        assert info["size"] == len(gallery_files(crops)) + 2


def test_cli_serve_prints_its_address_and_refuses_a_busy_port(live):
    """`reid-gallery serve` end to end: it says where it listens and answers there; mistakes get one line, exit 2."""
    from reid_lite.index.server import bind

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "reid_lite.index.cli", "serve", str(live.root), "--no-verify"]
    proc = subprocess.Popen([*cmd, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env, cwd=REPO)
    try:
        line = proc.stdout.readline()  # printed once the socket is bound and the model built
        assert "read-only" in line and "http://127.0.0.1:" in line, line
        url = line.split(" on ")[-1].strip().rstrip("/")
        info = requests.get(url + "/api/info", timeout=T).json()
        assert info["size"] == live.current().store.count()
        assert "<title>reid-gallery</title>" in requests.get(url + "/", timeout=T).text
    finally:
        proc.terminate()
        proc.wait(30)
    busy = bind("127.0.0.1", 0)
    try:
        out = subprocess.run([*cmd, "--port", str(busy.getsockname()[1])], capture_output=True, text=True, env=env,
                             cwd=REPO, timeout=120)
    finally:
        busy.close()
    assert out.returncode == 2 and out.stderr.startswith("reid-gallery serve: error: ") and "in use" in out.stderr
    out = subprocess.run([*cmd[:-2], str(REPO / "no-such-gallery")], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "no gallery at" in out.stderr


def test_a_damaged_new_generation_is_not_served(live):
    """CURRENT replaced by garbage (a writer gone wrong): the server goes on with the generation it has."""
    current = live.root / "CURRENT"
    good = current.read_text()
    before = live.current()
    try:
        current.write_text("gen-999999 0000\n")
        assert live.current() is before and "still serving generation" in live.reopen_errors[-1]
        assert live.current() is before  # not retried on every request
    finally:
        current.write_text(good)
    after = live.current()  # CURRENT changed again: reopened, same generation
    assert after.generation == before.generation and after.search(after.crop_features([0]), k=1)[0][0].id == 0


def test_uploads_add_refuses_bad_numbers_and_reads_16_bit_pngs(tmp_path, crops):
    """POST /api/crops: a non-finite timestamp or an identity beyond 64 bits is a 4xx before anything is
    written; a 16-bit grayscale PNG is searched as its scaled 8-bit image (the same as an 8-bit copy), not as
    the white image PIL's own conversion gives."""
    import numpy as np

    build_gallery(tmp_path / "gal", crops).close()
    live = LiveGallery(tmp_path / "gal")
    ramp = (np.arange(64 * 32, dtype=np.uint32).reshape(64, 32) * 31).astype(np.uint16)
    png16, png8 = io.BytesIO(), io.BytesIO()
    Image.fromarray(ramp).save(png16, "PNG")
    Image.fromarray(np.rint(ramp / 257).astype(np.uint8), "L").save(png8, "PNG")
    before = live.current().store.count()
    with BackgroundServer(create_app(live, allow_add=True)) as s:
        for params, status, words in [({"camera": 0, "timestamp": "nan"}, 400, "not a finite number"),
                                      ({"camera": 0, "timestamp": "1e400"}, 400, "not a finite number"),
                                      ({"camera": 0, "identity": 2**64}, 422, "identity: ")]:
            r = requests.post(f"{s.url}/api/crops", data=png8.getvalue(), params=params, timeout=T)
            assert r.status_code == status and words in r.json()["error"], r.text
        assert live.current().store.count() == before
        hits = [requests.post(f"{s.url}/api/search", data=d, params={"camera": 0, "k": 3}, timeout=T).json()["hits"]
                for d in (png16.getvalue(), png8.getvalue())]
    assert [h["id"] for h in hits[0]] == [h["id"] for h in hits[1]]
    assert [h["score"] for h in hits[0]] == pytest.approx([h["score"] for h in hits[1]], abs=1e-5)


def test_cli_serve_refuses_a_port_outside_the_tcp_range(live, capsys):
    from reid_lite.index.cli import main

    for port in ("65536", "-1", "100000"):
        assert main(["serve", str(live.root), "--no-verify", "--port", port]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"reid-gallery serve: error: --port {port} is not a TCP port: use 1-65535 (or 0 for any "
                       "free port)"]
