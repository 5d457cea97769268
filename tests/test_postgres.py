"""The PostgreSQL + pgvector gallery backend on a real server (pgserver: PostgreSQL 16 with pgvector, started
once per test session in a temporary folder): the same Gallery API, CLI and HTTP server as a folder, the
same results, concurrent writers, a killed writer, a refused model, migration both ways."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from extras import import_extra
from gallery_writer import writer_paused_at
from serve_util import PATTERN, TINY, build_gallery, make_crops

from reid_lite.config import load_cfg
from reid_lite.index import FingerprintMismatch, Gallery
from reid_lite.index.backends import storage_for
from reid_lite.index.calibration import calibrate_gallery
from reid_lite.index.cli import main as gallery_cli
from reid_lite.index.live import LiveGallery
from reid_lite.index.migrate import gallery_checksum, migrate_gallery
from reid_lite.index.postgres import PostgresStorage, parse_gallery_uri, redact_uri
from reid_lite.index.server import BackgroundServer, create_app
from reid_lite.index.storage import GalleryError

pgserver = import_extra("pgserver", "postgres")
import_extra("psycopg", "postgres")

REPO = Path(__file__).resolve().parent.parent
T = 60  # seconds: HTTP timeout on a loaded machine


@pytest.fixture(scope="session")
def pg() -> str:
    """The libpq URI (a Unix socket) of a private PostgreSQL 16 + pgvector server, one per test session.

    Its data folder is not under pytest's temporary folder: run as root, pgserver runs the server as another
    user, and every pytest session resets that folder's parent to mode 0700 (a concurrent one would lock the
    server out of its files)."""
    folder = Path(tempfile.mkdtemp(prefix="reid-pgserver-"))
    server = pgserver.get_server(folder, cleanup_mode="stop")
    yield server.get_uri()
    server.cleanup()
    shutil.rmtree(folder, ignore_errors=True)
    # pgserver logs again from an exit handler, after pytest closed the streams a CLI test's log handler holds
    # ("--- Logging error ---" at the end of the run): the server is already stopped, so say nothing more.
    logging.getLogger("pgserver").disabled = True


def gallery_uri(pg: str, name: str) -> str:
    return f"{pg}&gallery={name}" if "?" in pg else f"{pg}?gallery={name}"


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> Path:
    return make_crops(tmp_path_factory.mktemp("crops"))


def test_uris_name_a_gallery_and_hide_passwords():
    conninfo, name = parse_gallery_uri("postgresql://reid@/city?host=/run/pg&gallery=cams")
    assert name == "cams" and conninfo == "postgresql://reid@/city?host=/run/pg"
    assert parse_gallery_uri("postgresql://reid@db:5432/city")[1] == "default"
    assert redact_uri("postgresql://reid:secret@db/city?gallery=x") == "postgresql://reid:***@db/city?gallery=x"
    with pytest.raises(ValueError, match="lower-case letters"):
        parse_gallery_uri("postgresql://db/city?gallery=Drop;Table")
    assert isinstance(storage_for("postgres://db/city"), PostgresStorage)


def test_same_results_as_a_folder_gallery_then_add_remove_info(tmp_path, pg, crops):
    """Exact search (--index flat) on the same crops ranks the same ids with the same scores as a folder
    gallery; add skips stored crops, remove and filters are SQL, info describes the table."""
    uri = gallery_uri(pg, "same")
    cfg = load_cfg(None, TINY)
    inputs = [crops / "bounding_box_test"]
    g, rep = Gallery.build(uri, cfg, inputs, pattern=PATTERN, camera_num=3, index="flat")
    f, _ = Gallery.build(tmp_path / "f", cfg, inputs, pattern=PATTERN, camera_num=3, index="flat")
    assert rep.added == f.store.count() > 10 and g.index.kind == "flat"
    queries = sorted(str(p) for p in (crops / "query").glob("*.jpg"))
    for kw in ({}, {"exclude_same_camera": True}, {"cameras": [1, 2]}, {"time_window": (0, 400)}):
        a, b = g.search(queries, k=5, **kw), f.search(queries, k=5, **kw)
        assert [[h.id for h in r] for r in a] == [[h.id for h in r] for r in b], kw
        assert [[h.path for h in r] for r in a] == [[h.path for h in r] for r in b]
        np.testing.assert_allclose([[h.score for h in r] for r in a], [[h.score for h in r] for r in b], atol=1e-5)
    np.testing.assert_array_equal(g.crop_features([0, 3]), f.crop_features([0, 3]))
    with pytest.raises(ValueError, match="no crop in this gallery is from camera"):
        g.search(queries[:1], k=3, cameras=[7])
    assert g.search(queries[:1], k=3, time_window=(10**9, None)).notes == [
        f.search(queries[:1], k=3, time_window=(10**9, None)).notes[0]]

    size = g.store.count()
    rep = g.add([crops / "bounding_box_test", crops / "query"], pattern=PATTERN)
    assert rep.added == len(queries) and len(rep.duplicates) == size and g.store.count() == size + len(queries)
    removed = g.remove(cameras=[0])
    assert removed > 0 and g.store.count() == size + len(queries) - removed
    assert all(h.camid != 0 for h in g.search(queries[:2], k=50)[0])
    info = Gallery.open(uri).info()
    assert info["size"] == g.store.count() and info["index"]["kind"] == "flat" and "0" not in info["cameras"]
    assert info["path"] == uri and info["bytes"] > 0 and info["generation"] == g.generation
    with pytest.raises(GalleryError, match="needs no recovery"):
        Gallery.recover(uri)
    with pytest.raises(FileExistsError, match="already exists"):
        Gallery.build(uri, cfg, inputs, pattern=PATTERN, camera_num=3)
    g.close()
    f.close()


def test_hnsw_search_and_a_different_model_refused(pg, crops):
    uri = gallery_uri(pg, "hnsw")
    g = build_gallery(uri, crops)
    assert g.index.kind == "hnsw"
    ids = g.store.all_ids()
    hits = g.search(g.crop_features(ids[:4].tolist()), k=3)
    assert [r[0].id for r in hits] == ids[:4].tolist()  # each stored crop finds itself first
    other = load_cfg(None, [*TINY, "MODEL.DEPTH", "2"])
    with pytest.raises(FingerprintMismatch):
        g.search([str(next((crops / "query").glob("*.jpg")))], k=3, cfg=other)
    fp = json.loads(json.dumps(g.fingerprint))
    fp["architecture"]["depth"] = 2
    with pytest.raises(FingerprintMismatch):
        g.add_features(g.store.get([int(ids[0])]).values(), g.crop_features([int(ids[0])]), fingerprint=fp)
    code = gallery_cli(["search", uri, str(next((crops / "query").glob("*.jpg"))), "--opts", "MODEL.DEPTH", "2"])
    assert code == 2
    g.close()


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from reid_lite.index import Gallery
    uri, go, *paths = sys.argv[1:]
    g = Gallery.open(uri, verify=False)
    g.extractor()  # build the model before the start line: the writes overlap
    while not Path(go).exists():
        time.sleep(0.01)
    report = g.add(paths)  # camera, identity and time from the gallery's file-name pattern
    print(report.added, len(report.duplicates))
""")


def test_four_concurrent_writers_store_every_crop_once(tmp_path, pg, crops):
    """4 processes add at once, two with disjoint crops and two with crops overlapping everyone's: no lock,
    every crop stored exactly once, none lost, and the duplicates each writer reports add up."""
    uri = gallery_uri(pg, "writers")
    Gallery.create(uri, load_cfg(None, TINY), camera_num=3, pattern=PATTERN).close()
    files = sorted(str(p) for p in (crops / "bounding_box_test").glob("*.jpg"))
    half = len(files) // 2
    sets = [files[:half], files[half:], files[::2], files[1::3] + files[:3]]
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, str(go), *s], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s in sets]
    time.sleep(2)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    added = [int(o[0].split()[0]) for o in outs]
    dups = [int(o[0].split()[1]) for o in outs]
    g = Gallery.open(uri)
    stored = g.store.get(g.store.all_ids().tolist()).values()
    assert sorted(r.path for r in stored) == files  # every crop, once
    assert sum(added) == len(files) and sum(added) + sum(dups) == sum(len(s) for s in sets)
    assert g.index.ntotal == len(files)
    g.close()


def test_a_writer_killed_mid_add_leaves_nothing(tmp_path, pg, crops):
    """A writer SIGKILLed with its rows inserted but not committed: readers never saw them, nothing is left,
    and the next writer stores them."""
    uri = gallery_uri(pg, "killed")
    g = build_gallery(uri, crops)
    before, gen = g.store.count(), g.generation
    proc = writer_paused_at("staged", tmp_path / "paused", "add", uri, str(crops / "query"), "--pattern", PATTERN)
    assert g.store.count() == before  # the writer's rows are not visible while it has not committed
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    g2 = Gallery.open(uri)  # verified: every row has its vector
    assert g2.store.count() == before and g2.generation == gen
    rep = g2.add([crops / "query"], pattern=PATTERN)
    assert rep.added == len(list((crops / "query").glob("*.jpg"))) and g2.store.count() == before + rep.added
    g.close()
    g2.close()


def test_cli_build_add_search_info_remove(tmp_path, pg, crops, capsys):
    uri = gallery_uri(pg, "cli")
    opts = ["--opts", *TINY, "--camera-num", "3", "--pattern", PATTERN]
    assert gallery_cli(["build", uri, str(crops / "bounding_box_test"), *opts]) == 0
    capsys.readouterr()
    assert gallery_cli(["add", uri, str(crops / "query"), "--pattern", PATTERN, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == len(list((crops / "query").glob("*.jpg")))
    query = sorted((crops / "query").glob("*.jpg"))[0]
    assert gallery_cli(["search", uri, str(query), "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["results"]
    assert hits[0]["path"] == str(query) and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert gallery_cli(["info", uri, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["index"]["kind"] == "hnsw" and info["size"] == len(list(crops.glob("*/*.jpg"))) - len(
        list((crops / "bounding_box_train").glob("*.jpg")))
    assert gallery_cli(["remove", uri, "--path", str(query), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == 1
    assert gallery_cli(["serve", uri, "--allow-add", "--port", "0"]) == 2
    assert "no gallery 'nothere'" in _stderr_of(capsys, ["info", gallery_uri(pg, "nothere")])


def _stderr_of(capsys, argv: list[str]) -> str:
    assert gallery_cli(argv) == 2
    return capsys.readouterr().err


def test_server_searches_and_follows_new_writes(pg, crops):
    uri = gallery_uri(pg, "served")
    build_gallery(uri, crops).close()
    live = LiveGallery(uri)
    files = sorted((crops / "bounding_box_test").glob("*.jpg"))
    with BackgroundServer(create_app(live)) as s:
        info = requests.get(f"{s.url}/api/info", timeout=T).json()
        assert info["size"] == len(files) and info["time_span"] and info["has_identity"]
        r = requests.post(f"{s.url}/api/search", data=files[4].read_bytes(), params={"filename": files[4].name,
                                                                                       "k": 5}, timeout=T)
        assert r.status_code == 200, r.text
        assert r.json()["hits"][0]["name"] == files[4].name
        crop_id = r.json()["hits"][0]["id"]
        r = requests.get(f"{s.url}/api/crops/{crop_id}/search", params={"k": 3, "cameras": [1]}, timeout=T)
        assert r.status_code == 200 and all(h["camid"] == 1 for h in r.json()["hits"])
        assert requests.post(f"{s.url}/api/crops", data=files[0].read_bytes(), timeout=T).status_code == 403
        writer = Gallery.open(uri)
        writer.add([crops / "query"], pattern=PATTERN)
        after = requests.get(f"{s.url}/api/info", timeout=T).json()
        assert after["size"] == writer.store.count() > info["size"] and after["generation"] > info["generation"]
        writer.close()


def test_calibrate_a_database_gallery(pg, crops):
    """A calibration is stored in the gallery's meta table (one transaction) and flags hits."""
    uri = gallery_uri(pg, "calibrated")
    g = build_gallery(uri, crops)
    ids = g.store.all_ids()
    recs = g.store.get(ids.tolist())
    feats = g.crop_features(ids.tolist())
    pids = np.array([recs[int(i)].identity for i in ids])
    cams = np.array([recs[int(i)].camid for i in ids])
    strangers = g.embed_records([type(recs[0])(path=str(p), sha256="", camid=0)
                                 for p in sorted((crops / "query").glob("*.jpg"))])[0]
    q = np.concatenate([feats, strangers])
    entry = calibrate_gallery(g, q, np.concatenate([pids, np.full(len(strangers), 9999)]),
                              np.concatenate([cams + 10, np.zeros(len(strangers), int)]), feats, pids, cams)
    again = Gallery.open(uri)
    assert again.calibration_for(None)["threshold"] == entry["threshold"]
    res = again.search(feats[:1], k=2)
    assert res.threshold == entry["threshold"] and res[0][0].likely is True
    g.close()
    again.close()


def test_migrate_both_ways_verifies_counts_and_checksums(tmp_path, pg, crops, capsys):
    folder = tmp_path / "gal"
    g = build_gallery(folder, crops)
    g.remove(cameras=[2])  # ids with a gap: the copy is compared by content, not by id
    want = gallery_checksum(g)
    uri = gallery_uri(pg, "migrated")
    report = migrate_gallery(folder, uri)
    assert report["crops"] == want[0] and report["checksum"] == want[1] and report["target_index"] == "hnsw"
    db = Gallery.open(uri)
    assert gallery_checksum(db) == want and db.fingerprint == g.fingerprint
    back = tmp_path / "back"
    assert gallery_cli(["migrate", uri, str(back), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["crops"] == want[0] and out["checksum"] == want[1]
    copy = Gallery.open(back)
    assert gallery_checksum(copy) == want and copy.index.kind == "flat"
    q = g.crop_features(g.store.all_ids()[:3].tolist())
    assert [[h.path for h in r] for r in copy.search(q, k=4)] == [[h.path for h in r] for r in g.search(q, k=4)]
    assert "already exists" in _stderr_of(capsys, ["migrate", str(folder), uri])
    for x in (g, db, copy):
        x.close()
