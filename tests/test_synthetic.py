"""Tests of the synthetic person-crop generator (reid_lite/data/synthetic.py).

The module is loaded from its file, not through `reid_lite` / `reid_lite.data`: those package
`__init__`s import torch and the dataset code, which are not what is tested here and should not
be able to break (or slow down) these tests.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "reid_lite" / "data" / "synthetic.py"
_spec = importlib.util.spec_from_file_location("_reid_lite_synthetic_under_test", _PATH)
assert _spec is not None and _spec.loader is not None
syn = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = syn  # dataclasses look their module up in sys.modules
_spec.loader.exec_module(syn)

MARKET_RE = re.compile(r"([-\d]+)_c(\d)")
FULL_NAME_RE = re.compile(r"^(\d{4})_c(\d)s(\d)_(\d{6})_(\d{2})\.jpg$")
SIZE = (64, 32)  # small crops keep the suite fast; the drawing scales with the size
SMALL = {"num_train_ids": 4, "num_test_ids": 6, "num_cameras": 3, "images_per_id_per_camera": 2, "size": SIZE,
         "num_distractors": 4, "progress": False}


def parse_dir(folder: Path) -> list[tuple[str, int, int]]:
    """(file name, pid, camera) of every jpg, camera as written in the name (1-based)."""
    out = []
    for f in sorted(folder.glob("*.jpg")):
        m = MARKET_RE.search(f.name)
        assert m is not None, f.name
        out.append((f.name, int(m.group(1)), int(m.group(2))))
    return out


def read_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def hist_features(folder: Path, centre: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tiny 4x4x4 RGB histograms; `centre` keeps the middle of the crop, where the person is."""
    feats, pids, cams = [], [], []
    for name, pid, cam in parse_dir(folder):
        img = cv2.imread(str(folder / name))
        if centre:
            h, w = img.shape[:2]
            img = img[h // 8: h * 7 // 8, w // 4: w * 3 // 4]
        hist = cv2.calcHist([img], [0, 1, 2], None, [4, 4, 4], [0, 256] * 3).ravel()
        feats.append(hist / hist.sum())
        pids.append(pid)
        cams.append(cam)
    return np.array(feats), np.array(pids), np.array(cams)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return syn.generate_reid_dataset(tmp_path_factory.mktemp("small"), seed=0, **SMALL)


@pytest.fixture(scope="module")
def eval_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Enough test ids for rank-1 to mean something, still ~300 tiny images.
    return syn.generate_reid_dataset(tmp_path_factory.mktemp("eval"), num_train_ids=2, num_test_ids=40,
                                     num_cameras=4, images_per_id_per_camera=2, size=SIZE,
                                     num_distractors=0, seed=0, progress=False)


def test_same_seed_same_bytes_other_seed_differs(small_dataset: Path, tmp_path: Path) -> None:
    again = syn.generate_reid_dataset(tmp_path / "a", seed=0, **SMALL)
    assert read_tree(again) == read_tree(small_dataset)
    other = read_tree(syn.generate_reid_dataset(tmp_path / "b", seed=1, **SMALL))
    first = read_tree(small_dataset)
    common = [k for k in first if k in other and k.endswith(".jpg")]
    assert sum(first[k] != other[k] for k in common) > 0.9 * len(common)


def test_render_order_does_not_matter(small_dataset: Path) -> None:
    # Per-image seeds: rendering jobs in reverse order reproduces the written files exactly.
    jobs = syn._plan(4, 6, 3, 2, 4, 2, 0)
    for job in reversed(jobs):
        data = syn._render_job(job, 0, SIZE, 0.15, 4)
        assert data == (small_dataset / job.subdir / syn._file_name(job)).read_bytes()


def test_layout_and_names(small_dataset: Path) -> None:
    assert (small_dataset / syn.MARKER_NAME).is_file()
    splits = {s: parse_dir(small_dataset / s) for s in syn.SUBDIRS}
    for split, items in splits.items():
        assert items, split
        for name, _pid, cam in items:
            assert FULL_NAME_RE.match(name), name
            assert 1 <= cam <= 3
    train_ids = {p for _, p, _ in splits["bounding_box_train"]}
    query_ids = {p for _, p, _ in splits["query"]}
    gallery_ids = {p for _, p, _ in splits["bounding_box_test"]}
    assert train_ids == set(range(1, 5))
    assert query_ids == set(range(5, 11))
    assert gallery_ids == query_ids | {0}  # pid 0000: distractors, gallery only
    img = cv2.imread(str(small_dataset / "query" / splits["query"][0][0]))
    assert img.shape == (*SIZE, 3)


def test_every_query_has_cross_camera_gallery_match(eval_dataset: Path) -> None:
    gallery = {(p, c) for _, p, c in parse_dir(eval_dataset / "bounding_box_test")}
    queries = parse_dir(eval_dataset / "query")
    assert len(queries) >= 40
    for name, pid, cam in queries:
        assert any(p == pid and c != cam for p, c in gallery), name
    # One query per id per camera at most.
    assert len({(p, c) for _, p, c in queries}) == len(queries)


def test_render_person_api() -> None:
    person = syn.make_identity(3, seed=7)
    camera = syn.make_camera(2, seed=7)
    a = syn.render_person(person, camera, np.random.default_rng(5), size=(128, 64))
    b = syn.render_person(person, camera, np.random.default_rng(5), size=(128, 64))
    c = syn.render_person(person, camera, np.random.default_rng(6), size=(128, 64))
    assert a.shape == (128, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert syn.encode_jpeg(a, camera.jpeg_quality)[:2] == b"\xff\xd8"


def test_complete_marker_reuse_and_errors(tmp_path: Path) -> None:
    out = syn.generate_reid_dataset(tmp_path, seed=0, **SMALL)
    marker = out / syn.MARKER_NAME
    stamp = marker.stat().st_mtime_ns
    assert syn.generate_reid_dataset(tmp_path, seed=0, **SMALL) == out
    assert marker.stat().st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(FileExistsError, match="other parameters"):
        syn.generate_reid_dataset(tmp_path, seed=1, **SMALL)
    marker.unlink()  # looks like an interrupted generation now
    with pytest.raises(FileExistsError, match="no _COMPLETE marker"):
        syn.generate_reid_dataset(tmp_path, seed=0, **SMALL)
    syn.generate_reid_dataset(tmp_path, seed=1, overwrite=True, **SMALL)
    assert marker.is_file() and '"seed": 1' in marker.read_text()


def test_registered_dataset_reads_a_finished_folder_of_any_parameters(small_dataset: Path) -> None:
    from reid_lite.data import build_dataset

    # e.g. a set made with tools/make_synthetic.py: read as it is, not refused for other parameters
    ds = build_dataset("synthetic", root=small_dataset.parent)
    assert ds.num_train_pids == SMALL["num_train_ids"] and ds.num_query_cams <= SMALL["num_cameras"]
    with pytest.raises(FileExistsError, match="other parameters"):  # explicit arguments must match it
        build_dataset("synthetic", root=small_dataset.parent, num_train_ids=5)


def test_interrupted_generation_leaves_nothing_that_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = syn._render_job
    calls = {"n": 0}

    def failing(*args: object, **kwargs: object) -> bytes:
        calls["n"] += 1
        if calls["n"] > 10:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(syn, "_render_job", failing)
    with pytest.raises(KeyboardInterrupt):
        syn.generate_reid_dataset(tmp_path, seed=0, **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor a partial folder remains


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        syn.generate_reid_dataset(tmp_path, num_cameras=1, progress=False)
    with pytest.raises(ValueError):
        syn.generate_reid_dataset(tmp_path, num_test_ids=0, progress=False)


def test_identity_learnable_but_not_trivial(eval_dataset: Path) -> None:
    qf, qp, qc = hist_features(eval_dataset / "query", centre=True)
    gf, gp, gc = hist_features(eval_dataset / "bounding_box_test", centre=True)
    dist = np.abs(qf[:, None] - gf[None]).sum(-1)  # L1 between histograms
    # Market protocol: a query's own camera is excluded for its own id.
    dist[(qp[:, None] == gp[None]) & (qc[:, None] == gc[None])] = np.inf
    rank1 = float(np.mean(gp[dist.argmin(1)] == qp))
    chance = 1.0 / len(set(gp))
    assert rank1 > 5 * chance, rank1  # identity is visible across cameras ...
    assert rank1 < 0.9, rank1  # ... but colour alone does not solve the task

    # Averaged over pairs, one id seen by two cameras is closer than two ids seen by two cameras.
    feats = np.concatenate([qf, gf])
    pids = np.concatenate([qp, gp])
    cams = np.concatenate([qc, gc])
    d = np.abs(feats[:, None] - feats[None]).sum(-1)
    cross = cams[:, None] != cams[None]
    same = pids[:, None] == pids[None]
    assert d[same & cross].mean() < 0.8 * d[~same & cross].mean()


def test_cameras_matter(eval_dataset: Path) -> None:
    feats, pids, cams = hist_features(eval_dataset / "bounding_box_test", centre=False)
    d = np.abs(feats[:, None] - feats[None]).sum(-1)
    same_id = pids[:, None] == pids[None]
    same_cam = cams[:, None] == cams[None]
    np.fill_diagonal(d, np.inf)
    # The same person looks more different across cameras than within one ...
    off_diag = ~np.eye(len(d), dtype=bool)
    assert d[same_id & ~same_cam].mean() > 1.2 * d[same_id & same_cam & off_diag].mean()
    # ... and on whole crops (background included) the nearest *other* person is usually in the
    # same camera: the camera is a nuisance a model has to learn to ignore.
    other = np.where(same_id, np.inf, d)
    frac_same_cam = float(np.mean(same_cam[np.arange(len(d)), other.argmin(1)]))
    assert frac_same_cam > 2.0 / 4, frac_same_cam  # chance would be about 1/4 with 4 cameras
