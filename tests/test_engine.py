"""Feature extraction and query/gallery evaluation on a tiny TransReID and a generated dataset."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reid_lite.build import build_model
from reid_lite.config import load_cfg
from reid_lite.data import ImageReadWarning, build_dataset, build_test_loader, build_transforms, read_image
from reid_lite.data.synthetic import generate_reid_dataset
from reid_lite.engine import FeatureExtractor, Features, extract_features
from reid_lite.engine.evaluator import evaluate, format_table, split_query_gallery
from reid_lite.index.visualize import canvas_size, rank_gallery, visualize_ranked_results
from reid_lite.utils.device import amp_dtype, autocast, resolve_device

TINY = [
    "MODEL.PRETRAIN_CHOICE", "none", "MODEL.EMBED_DIM", 64, "MODEL.DEPTH", 3, "MODEL.NUM_HEADS", 4,
    "MODEL.STRIDE_SIZE", [16, 16], "MODEL.SIE_CAMERA", True, "MODEL.JPM", True, "MODEL.DEVICE", "cpu",
    "INPUT.SIZE_TRAIN", [64, 32], "INPUT.SIZE_TEST", [64, 32], "DATALOADER.NUM_WORKERS", 0,
    "TEST.IMS_PER_BATCH", 5, "MERGE.METHOD", "none", "MERGE.R", 2, "MERGE.LAYERS", [1, 2],
]


def tiny_cfg(*opts):
    return load_cfg(None, TINY + list(opts))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("engine_data")
    return generate_reid_dataset(root, num_train_ids=4, num_test_ids=4, num_cameras=2, images_per_id_per_camera=2,
                                 size=(64, 32), num_distractors=0, progress=False)


@pytest.fixture(scope="module")
def dataset(data_root):
    return build_dataset("market1501", data_root)


@pytest.fixture(scope="module")
def model(dataset):
    torch.manual_seed(0)
    return build_model(tiny_cfg(), dataset.num_train_pids, dataset.num_train_cams, 1).eval()


def _direct(model, cfg, records, flip=False):
    """Reference features: the test transform and one plain model call on all images."""
    tf = build_transforms(cfg, is_train=False)
    x = torch.stack([tf(read_image(r[0])) for r in records])
    cams = torch.tensor([r[2] for r in records])
    with torch.no_grad():
        f = model(x, cam_label=cams)
        if flip:
            f = (f + model(x.flip(3), cam_label=cams)) / 2
    return f


def test_extraction_order_and_features_match_direct_call(model, dataset):
    cfg = tiny_cfg()
    loader, num_query = build_test_loader(cfg, dataset)  # batches of 5: the last one is short
    feats = extract_features(model, loader, feat_norm=False, progress=False)
    records = list(dataset.query) + list(dataset.gallery)
    assert isinstance(feats, Features)
    assert feats.feats.dtype == torch.float32 and feats.feats.device.type == "cpu"
    assert feats.feats.shape == (len(records), model.feature_dim)
    np.testing.assert_array_equal(feats.indices, np.arange(len(records)))
    np.testing.assert_array_equal(feats.pids, [r[1] for r in records])
    np.testing.assert_array_equal(feats.camids, [r[2] for r in records])
    assert feats.paths == [r[0] for r in records] and feats.failed == []
    assert feats.indices.dtype == np.int64
    torch.testing.assert_close(feats.feats, _direct(model, cfg, records), rtol=1e-4, atol=1e-5)
    assert feats.seconds > 0 and feats.images_per_second > 0 and feats.model_images_per_second > 0
    query, gallery = split_query_gallery(feats, num_query)
    assert len(query) == len(dataset.query) and len(gallery) == len(dataset.gallery)


def test_flip_averaging_and_feat_norm(model, dataset):
    cfg = tiny_cfg()
    loader, _ = build_test_loader(cfg, dataset)
    records = list(dataset.query) + list(dataset.gallery)
    flipped = extract_features(model, loader, flip=True, feat_norm=False, progress=False)
    expected = _direct(model, cfg, records, flip=True)
    torch.testing.assert_close(flipped.feats, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(flipped.feats, _direct(model, cfg, records), atol=1e-4)  # flip does something
    normed = extract_features(model, loader, flip=True, feat_norm=True, progress=False)
    torch.testing.assert_close(normed.feats.norm(dim=1), torch.ones(len(records)))
    torch.testing.assert_close(normed.feats, F.normalize(expected, dim=1), rtol=1e-4, atol=1e-5)


def test_camera_ids_are_checked_before_the_model(model, dataset):
    cfg = tiny_cfg()
    loader, _ = build_test_loader(cfg, dataset)
    batch = next(iter(loader))
    batch.camids[0] = 7  # beyond the model's 2 SIE cameras
    with pytest.raises(ValueError, match="camera ids must lie in"):
        extract_features(model, [batch], progress=False)
    with pytest.raises(ValueError, match="camera"):
        extract_features(model, loader, use_camera=False, progress=False)


def test_feature_extractor_inputs_agree(model, dataset):
    cfg = tiny_cfg()
    records = list(dataset.gallery)[:6]
    paths = [r[0] for r in records]
    cams = [r[2] for r in records]
    fe = FeatureExtractor(cfg, model=model)
    from_paths = fe(paths, camids=cams, batch_size=4)
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    from_arrays = fe(arrays, camids=cams)
    from_pil = fe([Image.fromarray(a) for a in arrays], camids=cams)
    tf = build_transforms(cfg, is_train=False)
    from_tensor = fe(torch.stack([tf(read_image(p)) for p in paths]), camids=cams)
    loader, _ = build_test_loader(cfg, dataset)
    ref = extract_features(model, loader, progress=False)
    ref_rows = ref.feats[[ref.paths.index(p) for p in paths]]
    assert from_paths.shape == (6, model.feature_dim) and from_paths.dtype == torch.float32
    for other in (from_arrays, from_pil, from_tensor, ref_rows):
        torch.testing.assert_close(from_paths, other, rtol=1e-4, atol=1e-5)
    single = fe(paths[0], camids=cams[0])
    torch.testing.assert_close(single, from_paths[:1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="camids"):
        fe(paths)  # the model has a camera SIE: a silent camera 0 would change the features


def test_corrupt_gallery_jpeg_is_skipped_and_reported(model, data_root, tmp_path):
    root = Path(shutil.copytree(data_root, tmp_path / "copy"))
    victim = sorted((root / "bounding_box_test").glob("*.jpg"))[3]
    victim.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ds = build_dataset("market1501", root)
    cfg = tiny_cfg()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageReadWarning)
        results = evaluate(cfg, model, ds, progress=False)
    assert results["skipped"] == 1 and results["skipped_paths"] == [str(victim)]
    row = results["rows"][0]
    assert row["skipped"] == 1
    assert row["num_gallery"] == len(ds.gallery) - 1 and row["num_query"] == len(ds.query)
    assert 0.0 <= row["rank1"] <= 1.0 and 0.0 <= row["mAP"] <= 1.0
    assert "skipped images: 1" in format_table(results)


def test_evaluate_compare_methods_and_rerank(model, dataset):
    cfg = tiny_cfg("TEST.RE_RANKING", True)
    results = evaluate(cfg, model, dataset, methods=["none", "tome"], progress=False, keep_features=True)
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == ["none", "tome"]
    assert rows["tome"]["gflops"] < rows["none"]["gflops"]
    assert all(r["re_ranking"] for r in rows.values())
    for r in rows.values():
        for key in ("rank1", "rank5", "rank10", "mAP", "mINP"):
            assert 0.0 <= r[key] <= 1.0
        assert r["feature_dim"] == model.feature_dim and r["skipped"] == 0
    q_none, _ = results["features"]["none"]
    q_tome, _ = results["features"]["tome"]
    assert not torch.allclose(q_none.feats, q_tome.feats)  # each method extracts its own features
    assert model.reducers == {}  # each method ran on its own copy: the caller's model is not changed
    table = format_table(results)
    assert "| none" in table and "| tome" in table and "Rank-1" in table and "device: cpu" in table


def test_resolve_device_and_amp(caplog):
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with caplog.at_level(logging.WARNING):
            assert resolve_device("cuda") == torch.device("cpu")
        assert "CUDA is not available" in caplog.text
    cpu = torch.device("cpu")
    assert amp_dtype(cpu, "auto") is None and amp_dtype(cpu, "fp32") is None
    assert amp_dtype(torch.device("cuda"), "auto") is torch.bfloat16
    assert amp_dtype(cpu, "fp16") is torch.float16
    with pytest.raises(ValueError, match="TEST.AMP"):
        amp_dtype(cpu, "int8")
    with autocast(cpu, "bf16") as dtype:
        assert dtype is torch.bfloat16 and torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype is torch.bfloat16


def test_visualisation_png_size(model, dataset, tmp_path):
    cfg = tiny_cfg()
    loader, num_query = build_test_loader(cfg, dataset)
    query, gallery = split_query_gallery(extract_features(model, loader, progress=False), num_query)
    ranked = [rank_gallery(query.feats[i], int(query.pids[i]), int(query.camids[i]), gallery.feats,
                           gallery.pids, gallery.camids, topk=10) for i in range(2)]
    for i, order in enumerate(ranked):  # same-id same-camera gallery images are excluded
        assert not any(gallery.pids[g] == query.pids[i] and gallery.camids[g] == query.camids[i] for g in order)
    out = visualize_ranked_results(query.paths[:2], query.pids[:2], query.camids[:2], ranked, gallery.paths,
                                   gallery.pids, gallery.camids, tmp_path / "vis" / "ranked.png", topk=10)
    img = cv2.imread(str(out))
    assert img.shape[:2] == canvas_size(2, 10) == (8 + (256 + 22 + 8) * 2, 8 + (128 + 8) * 11 + 24)


def test_test_size_other_than_the_model_size_is_refused_before_any_image_is_read(model, dataset, monkeypatch):
    import reid_lite.engine.evaluator as ev

    monkeypatch.setattr(ev, "build_test_loader", lambda *a, **k: pytest.fail("read images first"))
    with pytest.raises(ValueError, match=r"^INPUT.SIZE_TEST \[128, 64\] differs from INPUT.SIZE_TRAIN \[64, 32\], "
                                         r"the size the model .* is built for"):
        evaluate(tiny_cfg("INPUT.SIZE_TEST", [128, 64]), model, dataset, device="cpu", progress=False)
