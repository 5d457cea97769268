"""reid-gallery as a new user meets it: no lost gallery, one clear line (exit 2) for ordinary mistakes,
atomic overwrite, recovery, purge, lock timeout, progress. CLI tests run `main([...])` in-process."""

from __future__ import annotations

import csv
import json
import logging
import os
import pickle
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gallery_writer import writer_paused_at

from reid_lite.build import build_model
from reid_lite.config import load_cfg
from reid_lite.data.synthetic import generate_reid_dataset
from reid_lite.index import storage
from reid_lite.index.cli import main
from reid_lite.index.gallery import Gallery, GalleryLocked, IndexParams
from reid_lite.index.storage import WriteLock
from reid_lite.index.store import CropRecord

TINY = ["MODEL.EMBED_DIM", "32", "MODEL.DEPTH", "2", "MODEL.NUM_HEADS", "2", "INPUT.SIZE_TEST", "[64, 32]",
        "INPUT.SIZE_TRAIN", "[64, 32]", "MODEL.STRIDE_SIZE", "[16, 16]", "MODEL.JPM", "False", "MERGE.METHOD", "none",
        "MODEL.PRETRAIN_CHOICE", "none", "MODEL.DEVICE", "cpu", "MODEL.SIE_CAMERA", "True", "TEST.IMS_PER_BATCH", "4"]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """12 gallery crops (4 ids x 3 cameras) and 12 queries, 64x32."""
    return generate_reid_dataset(tmp_path_factory.mktemp("crops"), num_train_ids=2, num_test_ids=4, num_cameras=3,
                                 images_per_id_per_camera=1, size=(64, 32), num_distractors=0, progress=False)


@pytest.fixture
def gallery(tmp_path, data) -> Path:
    """A built gallery of the 12 gallery crops (generation 0)."""
    root = tmp_path / "g"
    assert main(["build", str(root), str(data / "bounding_box_test"), "--opts", *TINY]) == 0
    return root


def cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ": error: " in ln]
    assert len(errors) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in errors[0], (n, errors[0])


def gallery_crops(data: Path) -> list[Path]:
    return sorted((data / "bounding_box_test").glob("*.jpg"))


def assert_intact(root: Path, data: Path) -> None:
    """The gallery verifies, holds every gallery crop, and each crop finds itself first."""
    g = Gallery.open(root)
    crops = gallery_crops(data)
    assert g.store.count() == len(crops)
    hits = g.search([str(p) for p in crops[:2]], k=3)
    assert [h[0].path for h in hits] == [str(p.resolve()) for p in crops[:2]]
    g.close()


def test_overwrite_that_fails_keeps_old_gallery(capsys, tmp_path, data, gallery):
    before = sorted(p.name for p in gallery.iterdir())
    # a mistyped checkpoint: refused before anything is written
    rc, _, err = cli(capsys, "build", str(gallery), str(data / "query"), "--overwrite", "--weights",
                     str(tmp_path / "nope.pth"), "--opts", *TINY)
    assert rc == 2
    one_error_line(err, "checkpoint not found", "nope.pth")
    # crops from cameras the model lacks: fails after the model is built
    rc, _, err = cli(capsys, "build", str(gallery), str(data / "query"), "--overwrite", "--camera-num", "2",
                     "--opts", *TINY)
    assert rc == 2
    one_error_line(err, "--camera-num is 2", "camera 2")
    # every crop unreadable: fails after hashing and embedding
    junk = tmp_path / "junk"
    junk.mkdir()
    for i, p in enumerate(gallery_crops(data)[:3]):
        (junk / p.name).write_bytes(b"not a jpeg %d" % i)
    rc, _, err = cli(capsys, "build", str(gallery), str(junk), "--overwrite", "--opts", *TINY)
    assert rc == 2
    one_error_line(err, "none of the 3 new crop(s) could be read", "nothing was written")
    assert sorted(p.name for p in gallery.iterdir()) == before  # no debris
    assert_intact(gallery, data)
    # a successful overwrite replaces the gallery in one publish
    rc, out, _ = cli(capsys, "build", str(gallery), str(data / "query"), "--overwrite", "--json", "--opts", *TINY)
    assert rc == 0 and json.loads(out)["added"] == len(list((data / "query").glob("*.jpg")))
    g = Gallery.open(gallery)
    assert {Path(r.path).parent.name for r in g.store.get(g.store.all_ids().tolist()).values()} == {"query"}
    assert g.generation == 1


def test_failed_build_leaves_nothing(capsys, tmp_path, data):
    root = tmp_path / "new" / "g"
    rc, _, err = cli(capsys, "build", str(root), str(data / "query"), "--weights", str(tmp_path / "x.pth"),
                     "--opts", *TINY)
    assert rc == 2 and not root.parent.exists()  # nor the folder created for it
    junk = tmp_path / "junk"
    junk.mkdir()
    for p in gallery_crops(data)[:4]:
        (junk / p.name).write_bytes(p.read_bytes()[: p.stat().st_size // 2])  # truncated JPEGs
    rc, out, err = cli(capsys, "build", str(root), str(junk), "--opts", *TINY)
    assert rc == 2 and not root.parent.exists() and out == ""
    one_error_line(err, "none of the 4 new crop(s) could be read")
    empty = tmp_path / "empty"
    empty.mkdir()  # an existing empty directory stays empty
    assert cli(capsys, "build", str(empty), str(junk), "--opts", *TINY)[0] == 2
    assert list(empty.iterdir()) == []
    # nothing blocks the re-run
    assert cli(capsys, "build", str(root), str(data / "bounding_box_test"), "--opts", *TINY)[0] == 0
    assert_intact(root, data)


def _checkpoint(path: Path, cameras: int) -> Path:
    model = build_model(load_cfg(None, TINY), num_classes=4, camera_num=cameras)
    torch.save(model.state_dict(), path)
    return path


def test_checkpoint_sie_table_decides_cameras(capsys, tmp_path, data):
    ckpt = _checkpoint(tmp_path / "six.pth", 6)
    root = tmp_path / "g"
    # crops from 3 cameras embed with a model trained on 6
    rc, _, err = cli(capsys, "build", str(root), str(data / "bounding_box_test"), "--weights", str(ckpt),
                     "--opts", *TINY)
    assert rc == 0, err
    info = Gallery.open(root).info()
    assert info["model"]["architecture"]["camera_num"] == 6 and info["model"]["weights"].startswith("sha256:")
    rc, _, err = cli(capsys, "build", str(tmp_path / "h"), str(data / "bounding_box_test"), "--weights", str(ckpt),
                     "--camera-num", "3", "--opts", *TINY)
    assert rc == 2 and not (tmp_path / "h").exists()
    one_error_line(err, "--camera-num 3 does not match", "6 cameras", "omit --camera-num")
    two = _checkpoint(tmp_path / "two.pth", 2)
    rc, _, err = cli(capsys, "build", str(tmp_path / "h"), str(data / "bounding_box_test"), "--weights", str(two),
                     "--opts", *TINY)
    assert rc == 2
    one_error_line(err, "crops from camera 2", "SIE table for 2 cameras")


class Payload:
    """Not a tensor: weights-only loading refuses a checkpoint holding it."""


class RunsCode:
    """Unpickling this calls os.system: a checkpoint built to run code when it is loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_code_running_pickle_is_refused_as_unsafe(capsys, tmp_path, data):
    """Not "not a readable checkpoint": the file was read and refused, and it is refused even when trusted."""
    evil, marker = tmp_path / "evil.pth", tmp_path / "it-ran"
    torch.save({"model": RunsCode(marker)}, evil)
    for trust in ("False", "True"):
        rc, _, err = cli(capsys, "build", str(tmp_path / "g"), str(data / "query"), "--weights", str(evil),
                         "--opts", *TINY, "MODEL.TRUST_CHECKPOINT", trust)
        assert rc == 2 and not (tmp_path / "g").exists()
        one_error_line(err, f"{evil} was refused as unsafe: loading it would call posix.system (code execution")
    assert not marker.exists()


def test_refused_or_unreadable_checkpoint_one_line(capsys, tmp_path, data):
    evil = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, evil, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    text = tmp_path / "notes.yml"
    text.write_text("MODEL:\n  NAME: x\n")
    for weights in (evil, text):
        rc, _, err = cli(capsys, "build", str(tmp_path / "g"), str(data / "query"), "--weights", str(weights),
                         "--opts", *TINY)
        assert rc == 2 and not (tmp_path / "g").exists()
        one_error_line(err, str(weights))


def test_corrupt_query_skipped_others_answered(capsys, tmp_path, data, gallery):
    good = [str(p) for p in sorted((data / "query").glob("*.jpg"))[:2]]
    bad = tmp_path / gallery_crops(data)[0].name
    bad.write_bytes(gallery_crops(data)[0].read_bytes()[:60])  # truncated, parsable name
    missing = str(tmp_path / "0001_c1s1_000099_00.jpg")
    rc, out, err = cli(capsys, "search", str(gallery), good[0], str(bad), good[1], missing, "-k", "3", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert [len(r["results"]) for r in res] == [3, 0, 3, 0]
    assert "unreadable" in res[1]["skipped"] and "not found" in res[3]["skipped"]
    warned = [ln for ln in err.splitlines() if "skipped:" in ln]
    assert len(warned) == 2 and str(bad) in warned[0] and missing in warned[1]
    rc, _, err = cli(capsys, "search", str(gallery), str(bad), missing)
    assert rc == 2
    one_error_line(err, "none of the 2 query image(s) could be read", str(bad))


def test_search_argument_mistakes(capsys, gallery, data):
    q = str(sorted((data / "query").glob("*.jpg"))[0])
    rc, _, err = cli(capsys, "search", str(gallery), q, "--opts", "MODEL.NOT_A_KEY", "1")
    assert rc == 2
    one_error_line(err, "unknown config key", "MODEL.NOT_A_KEY")
    with pytest.raises(SystemExit) as exc:
        main(["search", str(gallery), q, "-k", "-1"])
    assert exc.value.code == 2 and "argument -k: must be a positive integer, got -1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="k must be a positive integer"):
        Gallery.open(gallery).search([q], k=0)
    # filters that can never match say why
    rc, _, err = cli(capsys, "search", str(gallery), q, "--time-from", "2024-01-01T00:00")
    assert rc == 2
    one_error_line(err, "no crop in this gallery has a timestamp")
    rc, _, err = cli(capsys, "search", str(gallery), q, "--cameras", "7", "9")
    assert rc == 2
    one_error_line(err, "no crop in this gallery is from camera(s) 7, 9", "it holds cameras 0, 1, 2")


def test_filters_that_leave_a_query_nothing_say_why(tmp_path, data):
    cam0 = [p for p in gallery_crops(data) if "_c1" in p.name]
    g, _ = Gallery.build(tmp_path / "g", load_cfg(None, TINY), [str(p) for p in cam0], camera_num=3)
    q = [str(p) for p in sorted((data / "query").glob("*.jpg")) if "_c1" in p.name or "_c2" in p.name][:4]
    res = g.search(q, k=3, exclude_same_camera=True)
    for path, hits in zip(q, res):
        assert (len(hits) == 0) == ("_c1" in path)
    assert res.notes == ["no crop matches not camera 0 (the query's own, --exclude-same-camera)"]


def test_sidecar_error_names_file_and_line(capsys, tmp_path, data):
    sidecar = tmp_path / "meta.csv"
    with open(sidecar, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "camid", "timestamp"])
        w.writerow([gallery_crops(data)[0].name, 0, 1])
        w.writerow([gallery_crops(data)[1].name, "two", 2])
    rc, _, err = cli(capsys, "build", str(tmp_path / "g"), str(data / "bounding_box_test"), "--sidecar", str(sidecar),
                     "--opts", *TINY)
    assert rc == 2 and not (tmp_path / "g").exists()
    one_error_line(err, f"{sidecar}: line 3", "camid")


def test_missing_current_offers_recover(capsys, gallery, data):
    assert main(["add", str(gallery), str(data / "query")]) == 0
    (gallery / "CURRENT").unlink()
    rc, _, err = cli(capsys, "info", str(gallery))
    assert rc == 2
    one_error_line(err, "has no CURRENT file", f"reid-gallery recover {gallery}")
    rc, out, _ = cli(capsys, "recover", str(gallery))
    assert rc == 0 and "CURRENT now names generation 1" in out
    g = Gallery.open(gallery)
    assert g.generation == 1 and g.store.count() == len(gallery_crops(data)) + len(list((data / "query").iterdir()))
    rc, out, _ = cli(capsys, "recover", str(gallery))
    assert rc == 0 and out.startswith("nothing to recover")
    # a newest generation with a damaged file is passed over for the complete one before it
    (gallery / "CURRENT").unlink()
    (gallery / "gen-000001" / "index.faiss").write_bytes(b"x")
    g, gen = Gallery.recover(gallery)
    assert gen == 0 and g.store.count() == len(gallery_crops(data))


def test_ctrl_c_during_add(tmp_path, gallery, data):
    # Interrupted while embedding: after its first batch of 2 crops, with the lock held.
    proc = writer_paused_at("batch embedded", tmp_path / "paused", "add", str(gallery), str(data / "query"),
                            "--batch-size", "2")
    assert (gallery / "LOCK").read_text().strip() == str(proc.pid)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == [f"reid-gallery add: interrupted; {gallery} is intact at generation 0 "
                     "(no partial write is ever published)"], err
    assert sorted(p.name for p in gallery.iterdir()) == ["CURRENT", "LOCK", "gen-000000"]
    assert_intact(gallery, data)
    with WriteLock(gallery, timeout=0):  # no stale lock
        pass


def test_lock_timeout_and_repeating_message(capsys, caplog, monkeypatch, gallery, data):
    monkeypatch.setattr(storage, "LOCK_MESSAGE_SECONDS", 0.1)
    with WriteLock(gallery), caplog.at_level(logging.WARNING, logger="reid_lite.index.storage"):
        rc, _, err = cli(capsys, "add", str(gallery), str(data / "query"), "--lock-timeout", "0.5")
        assert rc == 2
        one_error_line(err, "locked by another writer", f"pid {os.getpid()}", "gave up after 0.5s")
        waiting = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
        assert len(waiting) >= 3 and "--lock-timeout" in waiting[0]
        with pytest.raises(GalleryLocked):
            Gallery.open(gallery).remove(cameras=[0], lock_timeout=0.1)
    assert Gallery.open(gallery).generation == 0
    with pytest.raises(SystemExit):
        main(["add", str(gallery), str(data / "query"), "--lock-timeout", "-1"])


def test_progress_on_a_terminal_only(capsys, monkeypatch, gallery, data):
    few = [str(p) for p in sorted((data / "query").glob("*.jpg"))]
    rc, _, err = cli(capsys, "add", str(gallery), *few[:2])
    assert rc == 0 and "hash" not in err and "embed" not in err  # stderr is not a terminal here
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    rc, _, err = cli(capsys, "add", str(gallery), *few[2:4])
    assert rc == 0 and "hash: 100%" in err and "embed: 100%" in err
    rc, _, err = cli(capsys, "add", str(gallery), *few[4:6], "--no-progress")
    assert rc == 0 and "hash" not in err and "embed" not in err


def test_remove_purge_and_readd(capsys, gallery, data):
    victim = gallery_crops(data)[0]
    rc, out, _ = cli(capsys, "remove", str(gallery), "--path", str(victim))
    assert rc == 0 and "removed 1 crop;" in out and "--purge" in out
    needle = str(victim.resolve()).encode()
    old = gallery / "gen-000000" / "meta.sqlite"
    assert needle in old.read_bytes()  # the previous generation still holds it, as documented
    rc, out, _ = cli(capsys, "remove", str(gallery), "--purge", "--json")
    assert rc == 0 and json.loads(out)["purged"] == ["gen-000000"]
    stored = b"".join(p.read_bytes() for p in gallery.rglob("*") if p.is_file())
    assert needle not in stored  # gone from the disk (secure_delete overwrote the row)
    g = Gallery.open(gallery)
    assert g.store.count() == len(gallery_crops(data)) - 1
    # removal is not a block list: adding the folder again stores the crop again
    assert g.add([data / "bounding_box_test"]).added == 1
    assert g.store.count() == len(gallery_crops(data))


def test_parse_timestamp_is_public():
    from reid_lite.data.datasets import parse_timestamp

    assert parse_timestamp("12.5") == 12.5 and parse_timestamp("2024-05-01T08:00") == "2024-05-01T08:00"



def test_purge_compacts_ivfpq_segments(tmp_path):
    g = Gallery.create(tmp_path / "g", load_cfg(None, TINY), camera_num=3,
                       index=IndexParams(kind="ivfpq", nlist=4, m=4, nbits=4, refine=4))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    recs = [CropRecord(path=f"/x/{i}.jpg", sha256=f"{i:064x}", camid=i % 3) for i in range(120)]
    g.add_features(recs, x)
    assert g.remove(cameras=[0], purge=True) == 40
    seg_ids = np.concatenate([np.load(p) for p in sorted((tmp_path / "g" / "segments").glob("*.ids.npy"))])
    assert sorted(seg_ids.tolist()) == [i for i in range(120) if i % 3]  # no float16 copy of a removed crop
    assert sorted(p.name for p in (tmp_path / "g").iterdir() if p.name.startswith("gen-")) == [
        f"gen-{g.generation:06d}"]
    g = Gallery.open(tmp_path / "g")
    hits = g.search(x[1:3], k=5, nprobe=4)
    assert [h[0].id for h in hits] == [1, 2] and all(h.camid != 0 for r in hits for h in r)


def test_interrupted_build_leaves_old_gallery_or_nothing(tmp_path, data, gallery):
    cfg = load_cfg(None, TINY)
    before = sorted(p.name for p in gallery.iterdir())
    for target, overwrite in ((gallery, True), (tmp_path / "fresh", False)):
        with pytest.raises(KeyboardInterrupt), Gallery.staging(target, cfg, camera_num=3, overwrite=overwrite) as g:
            g.add([data / "query"])  # embedded and written into the staged generation, not yet published
            assert Gallery.open(gallery).store.count() == len(gallery_crops(data))  # readers see the old one
            raise KeyboardInterrupt
    assert sorted(p.name for p in gallery.iterdir()) == before and not (tmp_path / "fresh").exists()
    assert_intact(gallery, data)


def test_counts_read_as_english(capsys, tmp_path, data):
    """One crop is "1 crop" (not "1 crops") in build/add/info/remove, and the page uses the same rule."""
    from reid_lite.utils.text import count

    assert (count(1, "camera"), count(2, "camera"), count(0, "crop")) == ("1 camera", "2 cameras", "0 crops")
    assert count(1, "query", "queries") == "1 query" and count(3, "query", "queries") == "3 queries"
    one = gallery_crops(data)[0]
    root = tmp_path / "one"
    rc, out, err = cli(capsys, "build", str(root), str(one), "--opts", *TINY)
    assert rc == 0, err
    assert "added 1 crop, skipped 0 duplicates, 0 unreadable" in out
    rc, out, _ = cli(capsys, "add", str(root), str(one))
    assert rc == 0 and "added 0 crops, skipped 1 duplicate, 0 unreadable" in out
    rc, out, _ = cli(capsys, "info", str(root))
    assert rc == 0 and "size      1 crop, " in out
    rc, out, _ = cli(capsys, "remove", str(root), "--path", str(one))
    assert rc == 0 and out.startswith("removed 1 crop; 0 left")
    page = (REPO / "reid_lite" / "index" / "web" / "app.js").read_text()
    assert '${count(info.size, "crop")}, ${count(cams.length, "camera")}' in page
    assert "return `${n} ${n === 1 ? noun : noun + \"s\"}`;" in page
