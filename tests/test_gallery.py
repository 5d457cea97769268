"""Gallery: build/add/search/remove/reopen, crash safety, integrity, fingerprints, filters, torchrun."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gallery_writer import writer_paused_at

from reid_lite.config import load_cfg
from reid_lite.data.synthetic import generate_reid_dataset
from reid_lite.index.gallery import (
    STAGES,
    FingerprintMismatch,
    Gallery,
    GalleryCorrupt,
    IndexParams,
)
from reid_lite.index.store import CropRecord

TINY = ["MODEL.EMBED_DIM", "64", "MODEL.DEPTH", "3", "MODEL.NUM_HEADS", "4", "INPUT.SIZE_TEST", "[64, 32]",
        "INPUT.SIZE_TRAIN", "[64, 32]", "MODEL.STRIDE_SIZE", "[16, 16]", "MODEL.JPM", "True", "MERGE.METHOD", "stm",
        "MERGE.R", "2", "MERGE.LAYERS", "[1]", "MODEL.PRETRAIN_CHOICE", "none", "MODEL.DEVICE", "cpu",
        "MODEL.SIE_CAMERA", "True", "TEST.IMS_PER_BATCH", "8"]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return generate_reid_dataset(tmp_path_factory.mktemp("crops"), num_train_ids=2, num_test_ids=6, num_cameras=3,
                                 images_per_id_per_camera=2, size=(64, 32), num_distractors=0, progress=False)


def tiny_cfg(*extra: str):
    return load_cfg(None, TINY + list(extra))


def new_gallery(path: Path, **kw) -> Gallery:
    return Gallery.create(path, tiny_cfg(), camera_num=3, **kw)


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reid_lite.index.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=REPO, timeout=120)


def vectors(g: Gallery) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of a flat gallery, sorted by id."""
    import faiss

    idx = g.index.index
    ids = faiss.vector_to_array(idx.id_map).astype(np.int64)
    x = idx.index.reconstruct_n(0, idx.ntotal)
    order = np.argsort(ids)
    return ids[order], x[order]


def test_build_add_search_remove_reopen(tmp_path, data):
    g = new_gallery(tmp_path / "g")
    rep = g.add([data / "bounding_box_test"])
    n_gallery = len(list((data / "bounding_box_test").glob("*.jpg")))
    assert rep.added == n_gallery and g.generation == 1 and g.info()["size"] == n_gallery
    q = sorted((data / "query").glob("*.jpg"))
    rep = g.add([str(p) for p in q[:3]])  # loose files, not a folder
    assert rep.added == 3 and g.store.count() == n_gallery + 3
    # a stored crop is its own nearest neighbour
    hits = g.search([str(q[0])], k=5)[0]
    assert hits[0].path == str(q[0].resolve()) and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5] and all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    removed = g.remove(paths=[str(q[0])], cameras=[2])
    cam2 = sum(1 for p in list((data / "bounding_box_test").glob("*.jpg")) + q[:3] if "_c3" in p.name)
    assert removed == cam2 + (0 if "_c3" in q[0].name else 1)
    g2 = Gallery.open(tmp_path / "g")
    assert g2.generation == g.generation and g2.store.count() == n_gallery + 3 - removed
    hits = g2.search([str(q[0])], k=50)[0]
    assert all(h.camid != 2 and h.path != str(q[0].resolve()) for h in hits)
    assert len(hits) == g2.store.count()


def test_duplicates_stored_once(tmp_path, data):
    g = new_gallery(tmp_path / "g")
    copy = tmp_path / "copies"
    copy.mkdir()
    src = sorted((data / "bounding_box_test").glob("*.jpg"))[0]
    (copy / src.name.replace("s1_", "s1_9")).write_bytes(src.read_bytes())  # same bytes, other name
    g.add([data / "bounding_box_test"])
    n = g.store.count()
    rep = g.add([data / "bounding_box_test", copy])
    assert rep.added == 0 and len(rep.duplicates) == n + 1 and g.store.count() == n
    # Nothing new: no generation is published (none to garbage-collect, nothing for readers to reload).
    assert rep.generation == g.generation == 1 and g.index.ntotal == n
    assert not (tmp_path / "g" / "gen-000002").exists() and Gallery.open(tmp_path / "g").generation == 1


def test_fingerprint_mismatch_refused(tmp_path, data):
    g = new_gallery(tmp_path / "g")
    g.add([data / "bounding_box_test"])
    q = str(sorted((data / "query").glob("*.jpg"))[0])
    with pytest.raises(FingerprintMismatch, match="merging.r: gallery 2 != query 3"):
        g.search([q], k=3, cfg=tiny_cfg("MERGE.R", "3"))
    with pytest.raises(FingerprintMismatch, match="weights"):
        g.search([q], k=3, cfg=tiny_cfg("SOLVER.SEED", "7"))
    with pytest.raises(FingerprintMismatch):
        g.search(np.zeros((1, 320), np.float32), k=3)  # the full JPM feature, not the stored global one
    other = Gallery.create(tmp_path / "h", tiny_cfg("MERGE.METHOD", "tome"), camera_num=3)
    with pytest.raises(FingerprintMismatch, match="merging.method"):
        g.search(np.zeros((1, 64), np.float32), k=3, fingerprint=other.fingerprint)
    # the CLI says so clearly and exits non-zero
    res = run_cli("search", str(tmp_path / "g"), q, "--opts", "MERGE.R", "3")
    assert res.returncode == 2 and "refused" in res.stderr and "merging.r" in res.stderr


@pytest.mark.parametrize("target", ["index.faiss", "meta.sqlite", "manifest.json"])
def test_corrupt_file_refused_on_open(tmp_path, data, target):
    g = new_gallery(tmp_path / "g")
    g.add([data / "bounding_box_test"])
    path = tmp_path / "g" / f"gen-{g.generation:06d}" / target
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit
    path.write_bytes(bytes(raw))
    with pytest.raises(GalleryCorrupt):
        Gallery.open(tmp_path / "g")
    path.write_bytes(bytes(raw[: len(raw) // 2]))  # truncated: caught by size even without hashing
    with pytest.raises(GalleryCorrupt):
        Gallery.open(tmp_path / "g", verify=False)


def _wait_for(cond, timeout: float = 60.0) -> None:
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.05)


@pytest.mark.parametrize("stage", ["batch embedded", "renamed"])
def test_sigkill_mid_add_leaves_previous_gallery(tmp_path, data, stage):
    root = tmp_path / "g"
    g = new_gallery(root)
    g.add([data / "bounding_box_test"])
    before_gen, before_n = g.generation, g.store.count()
    before = g.search(np.asarray(vectors(g)[1][:2]), k=5)
    # Killed after its first batch of 2 crops / with the new generation written and renamed, CURRENT not swapped.
    proc = writer_paused_at(stage, tmp_path / "paused", "add", str(root), str(data / "query"), "--batch-size", "2")
    if stage == "renamed":
        assert (root / f"gen-{before_gen + 1:06d}").is_dir()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    g2 = Gallery.open(root)  # verified: the previous generation is intact
    assert g2.generation == before_gen and g2.store.count() == before_n
    after = g2.search(np.asarray(vectors(g2)[1][:2]), k=5)
    assert [[h.id for h in r] for r in after] == [[h.id for h in r] for r in before]
    # the next writer works, is not blocked by a stale lock, and clears the debris
    rep = g2.add([data / "query"])
    new_gen = before_gen + (2 if stage == "renamed" else 1)  # the unpublished debris' number is not reused
    assert rep.added == len(list((data / "query").glob("*.jpg"))) and g2.generation == new_gen
    names = sorted(p.name for p in root.iterdir())
    assert names == ["CURRENT", "LOCK", f"gen-{before_gen:06d}", f"gen-{new_gen:06d}"]


class Injected(Exception):
    """A failure a test injects at one write stage."""


def fail_at(stage: str):
    def on_stage(reached: str) -> None:
        if reached == stage:
            raise Injected(stage)

    return on_stage


def test_write_stages_in_order_and_a_failure_at_each_keeps_a_published_generation(tmp_path, data):
    root = tmp_path / "g"
    seen: list[str] = []
    g = new_gallery(root, on_stage=seen.append)
    assert seen == ["locked", "staged", "index written", "renamed", "published"]  # create: nothing to embed
    seen.clear()
    crops = sorted((data / "bounding_box_test").glob("*.jpg"))
    g.add(crops, batch_size=8)
    batches = -(-len(crops) // 8)
    assert seen == ["locked", *["batch embedded"] * batches, "embedded", "staged", "index written", "renamed",
                    "published"]
    assert set(seen) == set(STAGES)
    probe = np.asarray(vectors(g)[1][:3])
    queries = sorted((data / "query").glob("*.jpg"))
    for stage in STAGES:
        gen, n = Gallery.open(root).generation, g.store.count()
        expected = [[h.id for h in r] for r in Gallery.open(root).search(probe, k=5)]
        g.on_stage = fail_at(stage)
        with pytest.raises(Injected):
            g.add(queries[:2], batch_size=8)
        g.on_stage = None
        published = stage == "published"  # the failure came after the commit point: the add is whole
        fresh = Gallery.open(root)  # checksums verified
        assert fresh.generation == gen + published and fresh.store.count() == n + 2 * published, stage
        assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp")], stage  # no debris
        if published:  # the new crops are found
            assert [r[0].path for r in fresh.search(queries[:2], k=1)] == [str(q.resolve()) for q in queries[:2]]
        else:  # searchable as before, and no unpublished generation left for `recover` to publish
            assert [[h.id for h in r] for r in fresh.search(probe, k=5)] == expected, stage
            assert sorted(p.name for p in root.iterdir() if p.name.startswith("gen-"))[-1] == f"gen-{gen:06d}"
    # a failed overwriting build leaves the old gallery current and whole, at every stage before the commit
    for stage in STAGES[:-1]:
        with pytest.raises(Injected):
            Gallery.build(root, tiny_cfg(), queries[2:4], camera_num=3, overwrite=True, on_stage=fail_at(stage))
        assert Gallery.open(root).store.count() == len(crops) + 2, stage
    rep = g.add(queries[2:4])  # the next write works and collects the garbage
    assert rep.added == 2 and sorted(p.name for p in root.iterdir()) == [
        "CURRENT", "LOCK", f"gen-{g.generation - 1:06d}", f"gen-{g.generation:06d}"]


def test_filters_exact_for_flat(tmp_path, data):
    folder = data / "bounding_box_test"
    files = sorted(p.name for p in folder.glob("*.jpg"))
    sidecar = tmp_path / "meta.csv"
    with open(sidecar, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "camid", "pid", "timestamp"])
        for i, name in enumerate(files):
            w.writerow([name, int(name.split("_c")[1][0]) - 1, int(name[:4]), 10 * i])
    g = new_gallery(tmp_path / "g")
    g.add([folder], sidecar=sidecar)
    ids, x = vectors(g)
    meta = g.store.get(ids.tolist())
    cams = np.array([meta[i].camid for i in ids])
    ts = np.array([meta[i].timestamp for i in ids])
    q = x[:4] + 0.01
    k = 6

    def brute(mask, qi):
        s = x @ (q[qi] / np.linalg.norm(q[qi]))
        s = np.where(mask, s, -np.inf)
        return [int(ids[j]) for j in np.argsort(-s)[:min(k, mask.sum())]]

    res = g.search(q, k=k, camids=[0, 1, 2, 0], exclude_same_camera=True)
    for qi, c in enumerate([0, 1, 2, 0]):
        assert [h.id for h in res[qi]] == brute(cams != c, qi) and len(res[qi]) == k
    res = g.search(q, k=k, cameras=[1])
    assert all([h.id for h in r] == brute(cams == 1, qi) for qi, r in enumerate(res))
    res = g.search(q, k=k, time_window=(30, 80))
    assert all([h.id for h in r] == brute((ts >= 30) & (ts <= 80), qi) for qi, r in enumerate(res))
    assert all(len(r) == 6 for r in res)  # exactly the 6 crops stamped 30..80
    res = g.search(q, k=k, cameras=[2], time_window=(None, 50))  # fewer valid than k: all of them
    assert all([h.id for h in r] == brute((cams == 2) & (ts <= 50), qi) for qi, r in enumerate(res))


def test_ivfpq_filters_and_rerank(tmp_path):
    g = new_gallery(tmp_path / "g", index=IndexParams(kind="ivfpq", nlist=16, m=8, nprobe=1, refine=8))
    rng = np.random.default_rng(0)
    n = 2000
    x = rng.standard_normal((n, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    recs = [CropRecord(path=f"/x/{i}.jpg", sha256=f"{i:064x}", camid=i % 5, timestamp=float(i)) for i in range(n)]
    g.add_features(recs, x, fingerprint=g.fingerprint)
    g = Gallery.open(tmp_path / "g")
    assert g.info()["index"]["kind"] == "ivfpq" and g.store.count() == n
    q = x[:3]
    # a rare camera + nprobe=1: the probed list alone cannot hold k valid crops; nprobe widens until it does
    res = g.search(q, k=10, cameras=[4], time_window=(0, 400))
    valid = np.flatnonzero((np.arange(n) % 5 == 4) & (np.arange(n) <= 400))
    for r in res:
        assert len(r) == 10 and all(h.camid == 4 and h.timestamp <= 400 for h in r)
    # all lists probed: the PQ shortlist (8 k = 80) holds every valid crop and float16 re-ranking makes it exact
    res = g.search(q, k=10, cameras=[4], time_window=(0, 400), nprobe=16)
    for qi, r in enumerate(res):
        exact = valid[np.argsort(-(x[valid] @ q[qi]))[:10]]
        assert [h.id for h in r] == exact.tolist()
    assert g.remove(cameras=[0]) == n // 5
    assert all(h.camid != 0 for r in g.search(q, k=20) for h in r)


def test_cli_build_search_json_sheet_info(tmp_path, data):
    gal = str(tmp_path / "g")
    res = run_cli("build", gal, str(data / "bounding_box_test"), "--json", "--opts", *TINY)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["added"] == len(list((data / "bounding_box_test").glob("*.jpg")))
    q = [str(p) for p in sorted((data / "query").glob("*.jpg"))[:2]]
    res = run_cli("search", gal, *q, "-k", "4", "--exclude-same-camera", "--json", "--sheet", str(tmp_path / "s.png"))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [o["query"] for o in out] == q and all(len(o["results"]) == 4 for o in out)
    for o in out:
        qcam = int(Path(o["query"]).name.split("_c")[1][0]) - 1
        assert all(r["camid"] != qcam and {"score", "path", "timestamp"} <= set(r) for r in o["results"])
    assert (tmp_path / "s.png").stat().st_size > 0
    res = run_cli("info", gal, "--json")
    info = json.loads(res.stdout)
    assert info["index"]["kind"] == "flat" and info["model"]["weights"] == "random-init:seed=1234"
    res = run_cli("remove", gal, "--camera", "0", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["removed"] > 0


def test_torchrun_two_processes_equals_one(tmp_path, data):
    one, two = tmp_path / "one", tmp_path / "two"
    res = run_cli("build", str(one), str(data / "bounding_box_test"), str(data / "query"), "--opts", *TINY)
    assert res.returncode == 0, res.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "reid_lite.index.distributed", "build", str(two), str(data / "bounding_box_test"),
           str(data / "query"), "--opts", *TINY]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    g1, g2 = Gallery.open(one), Gallery.open(two)
    assert g1.fingerprint == g2.fingerprint
    i1, x1 = vectors(g1)
    i2, x2 = vectors(g2)
    assert i1.tolist() == i2.tolist() and len(i1) > 0
    m1, m2 = g1.store.get(i1.tolist()), g2.store.get(i2.tolist())
    assert [m1[i].to_dict() for i in i1] == [m2[i].to_dict() for i in i2]
    np.testing.assert_allclose(x1, x2, atol=1e-6)
    # a distributed overwrite that fails (every crop unreadable) says so on every rank, hangs no rank,
    # and leaves the gallery as it was
    junk = tmp_path / "junk"
    junk.mkdir()
    for i, src in enumerate(sorted((data / "query").glob("*.jpg"))[:4]):
        (junk / src.name).write_bytes(b"not an image %d" % i)
    cmd[cmd.index(str(two)) + 1:cmd.index("--opts")] = [str(junk), "--overwrite"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=180)
    assert res.returncode != 0 and "(rank 0): error: none of the 4 new crop(s) could be read" in res.stderr
    assert "(rank 1): error: rank 0 failed to publish" in res.stderr
    g2 = Gallery.open(two)
    assert vectors(g2)[0].tolist() == i2.tolist() and g2.generation == 0  # a build publishes once
    assert sorted(p.name for p in two.iterdir()) == ["CURRENT", "LOCK", "gen-000000"]


OLD_GALLERIES = Path(__file__).parent / "data" / "galleries_v1"


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_galleries_written_before_the_wrapper_merge_still_load(tmp_path, kind):
    """tests/data/galleries_v1/{flat,ivfpq} were written by the code of commit 7d46f5e (before the faiss
    wrappers were merged): Gallery.create (a 32-wide random-init TransReID, 3 cameras), add_features of
    40 / 300 unit vectors (`<kind>_vectors.npy`, kept as float16) for crops /synthetic/NNNN_cK.jpg, then
    remove(ids=[1, 2], purge=True). They must open (checksums verified), search and take new writes."""
    root = tmp_path / kind
    shutil.copytree(OLD_GALLERIES / kind, root)
    x = np.load(OLD_GALLERIES / f"{kind}_vectors.npy").astype(np.float32)
    g = Gallery.open(root)
    assert g.index.kind == kind and g.store.count() == g.index.ntotal == len(x) - 2
    keep = np.array([i for i in range(len(x)) if i not in (1, 2)])
    hits = g.search(x[keep[:20]], k=3)
    assert [r[0].id for r in hits] == keep[:20].tolist()
    assert all(h.path == f"/synthetic/{h.id:04d}_c{h.id % 3 + 1}.jpg" and h.camid == h.id % 3 for r in hits for h in r)
    assert not {1, 2} & {h.id for r in g.search(x[:3], k=10) for h in r}
    new = np.eye(32, dtype=np.float32)[:2]
    rep = g.add_features([CropRecord(path=f"/new/{i}_c1.jpg", sha256=f"{i + 10_000:064x}", camid=0)
                          for i in range(2)], new)
    g2 = Gallery.open(root)
    assert rep.added == 2 and g2.generation == g.generation and g2.store.count() == len(x)
    assert [r[0].path for r in g2.search(new, k=1)] == ["/new/0_c1.jpg", "/new/1_c1.jpg"]


def test_index_modules_use_only_each_others_public_names():
    """No module of reid_lite/index imports a `_private` name, or reads or calls a `_private` attribute
    that it does not define itself (the distributed build, the server and the gallery's halves talk
    through public methods)."""
    import ast

    bad = []
    for path in sorted((REPO / "reid_lite" / "index").glob("*.py")):
        tree = ast.parse(path.read_text())
        own = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        own |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)}
        own |= {n.target.id for n in ast.walk(tree) if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("reid_lite")):
                bad += [f"{path.name}:{n.lineno} imports {a.name}" for a in n.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
            elif (isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load) and n.attr.startswith("_")
                  and not n.attr.startswith("__") and n.attr not in own):
                bad.append(f"{path.name}:{n.lineno} uses .{n.attr}")
    assert not bad, bad
