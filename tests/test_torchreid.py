"""torchreid adapter: model factory, FeatureExtractor, camera ids, checkpoints, engines, both import layouts.

Tiny models (embed 64, depth 3, 64x32 input, stride 16: 4x2 patches) and a tiny generated Market-layout
dataset keep the whole file well under a minute on two cores.
"""

from __future__ import annotations

import importlib
import pickle
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from extras import import_extra
from PIL import Image

# Skips only when torchreid is absent; an install that cannot import (e.g. without scipy) fails.
import_extra("torchreid", "torchreid")

from reid_lite.data.synthetic import generate_reid_dataset  # noqa: E402
from reid_lite.data.transforms import build_transforms  # noqa: E402
from reid_lite.integrations import torchreid as rt  # noqa: E402
from reid_lite.integrations.torchreid import layout as torchreid_layout  # noqa: E402
from reid_lite.models.checkpoint import CheckpointError  # noqa: E402

TINY = ["MODEL.EMBED_DIM", 64, "MODEL.DEPTH", 3, "MODEL.NUM_HEADS", 4, "INPUT.SIZE_TRAIN", [64, 32],
        "INPUT.SIZE_TEST", [64, 32], "MODEL.STRIDE_SIZE", [16, 16], "MODEL.DROP_PATH", 0.0]
# With JPM the trunk has depth - 1 = 2 blocks; 8 patches, r = 2 in each.
TINY_MERGE = dict(opts=TINY, layers=[1, 2], r=2)

warnings.filterwarnings("ignore", message="Cython evaluation")


@pytest.fixture(scope="module")
def tr():
    mods = rt.torchreid_modules()
    rt.register_models()
    rt.register_model("tiny_stm", "stm", **TINY_MERGE)
    rt.register_model("tiny_stm_2cams", "stm", camera_num=2, **TINY_MERGE)
    rt.register_model("tiny_base_nojpm", "none", opts=TINY + ["MODEL.JPM", False], camera_num=2)
    return mods


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    return generate_reid_dataset(tmp_path_factory.mktemp("data"), num_train_ids=4, num_test_ids=4, num_cameras=2,
                                 images_per_id_per_camera=2, size=(64, 32), num_distractors=0, progress=False)


def _tiny(num_classes=4, loss="softmax", **kw):
    return rt.build_transreid(num_classes, loss, method=kw.pop("method", "stm"), **{**TINY_MERGE, **kw})


def _cams(n, k=2):
    return torch.arange(n) % k


# ------------------------------------------------------------------------------------------ layouts / import
def test_importing_reid_lite_does_not_import_torchreid():
    code = ("import sys, reid_lite, reid_lite.integrations.torchreid, reid_lite.models, reid_lite.merging;"
            "assert 'torchreid' not in sys.modules, 'torchreid imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_torchreid_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchreid", None)  # makes `import torchreid` fail
    with pytest.raises(ImportError, match=r"pip install -e \.\[torchreid\]"):
        rt.torchreid_modules()


def test_source_layout_is_resolved(tr, monkeypatch):
    """A source install exposes torchreid.models etc. at the top level: fake one from the PyPI modules."""
    assert tr.layout == "pypi"
    fake = types.ModuleType("torchreid")
    fake.__path__ = []  # a package with nothing on disk: torchreid.reid cannot be found
    for name in [n for n in sys.modules if n == "torchreid" or n.startswith("torchreid.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchreid", fake)
    for sub in torchreid_layout.SUBMODULES:
        monkeypatch.setitem(sys.modules, f"torchreid.{sub}", getattr(tr, sub))
        setattr(fake, sub, getattr(tr, sub))
    src = rt.torchreid_modules()
    assert src.layout == "source" and src.models is tr.models
    rt.register_model("tiny_src", "tome", **TINY_MERGE)
    model = src.models.build_model("tiny_src", num_classes=3, loss="softmax", pretrained=False)
    assert isinstance(model, rt.TorchreidTransReID) and model.cfg.MERGE.METHOD == "tome"


# ------------------------------------------------------------------------------------------ factory
def test_registered_names_use_the_paper_setting(tr):
    factory = torchreid_layout.model_factory(tr)
    assert set(rt.model_names()) <= set(factory)
    assert rt.register_models() == list(rt.model_names())  # idempotent
    model = tr.models.build_model("transreid_stm", num_classes=751, loss="softmax", pretrained=False, use_gpu=False)
    cfg = model.cfg
    assert cfg.MODEL.TRANSFORMER_TYPE == "vit_base_patch16_224_TransReID" and model.in_planes == 768
    assert list(cfg.INPUT.SIZE_TRAIN) == [256, 128] and list(cfg.MODEL.STRIDE_SIZE) == [12, 12]
    assert model.jpm and model.camera_num == 6 and model.feature_dim == 5 * 768
    assert cfg.MERGE.METHOD == "stm" and cfg.MERGE.R == 8 and sorted(model.reducers) == list(range(10))
    with pytest.raises(ValueError, match="already has a model"):
        rt.register_model("resnet50", "stm")  # torchreid's own model is never replaced silently


def test_options_reach_the_config_and_errors_are_clear(tr):
    model = _tiny(r=1, stm_coords="tracked", stm_alpha=1)
    assert model.cfg.MERGE.R == 1 and model.cfg.MERGE.STM.COORDS == "tracked" and model.cfg.MERGE.STM.ALPHA == 1.0
    assert rt.build_transreid(2, method="none", opts=TINY).reducers == {}
    evit = rt.transreid_evit(2, opts=TINY, evit_layers=[2], evit_keep_rate=0.5)
    assert list(evit.cfg.MERGE.EVIT.LAYERS) == [2] and evit.cfg.MERGE.METHOD == "evit"
    msmt = rt.transreid_base(2, config_file="msmt17_base.yml", opts=TINY)
    assert msmt.camera_num == 15 and msmt.cfg.MERGE.METHOD == "none"
    with pytest.raises(TypeError, match="stm_coords"):
        _tiny(stm_cords="tracked")
    with pytest.raises(ValueError, match="MERGE.METHOD"):
        rt.transreid_stm(2, opts=TINY + ["MERGE.METHOD", "tome"])
    with pytest.raises(CheckpointError, match="nothing is downloaded"):
        tr.models.build_model("tiny_stm", num_classes=2, pretrained=True)
    with pytest.raises(ValueError, match="loss"):
        _tiny(loss="arcface")


def test_eval_and_train_outputs_follow_torchreid(tr):
    x = torch.randn(4, 3, 64, 32)
    model = tr.models.build_model("tiny_stm", num_classes=5, loss="softmax", pretrained=False).eval()
    assert model(x, cam_label=_cams(4)).shape == (4, 5 * 64)

    model.train()
    logits = model(x, cam_label=_cams(4))
    assert isinstance(logits, list) and len(logits) == 8 and all(t.shape == (4, 5) for t in logits)

    triplet = tr.models.build_model("tiny_base_nojpm", num_classes=5, loss="triplet", pretrained=False).train()
    out, feat = triplet(x, cam_label=_cams(4))
    assert out.shape == (4, 5) and feat.shape == (4, 64)
    assert tr.models.build_model("tiny_base_nojpm", num_classes=5, loss="softmax", pretrained=False).train()(
        x, cam_label=_cams(4)).shape == (4, 5)
    assert triplet.eval()(x, cam_label=_cams(4)).shape == (4, 64)


def test_jpm_official_mapping_reproduces_transreid_loss(tr):
    """DeepSupervision (torchreid's mean over a list) over [g]*4 + locals == 0.5 g + 0.5 mean(locals)."""
    torch.manual_seed(0)
    x, pids = torch.randn(6, 3, 64, 32), torch.tensor([0, 0, 1, 1, 2, 2])
    model = _tiny(3, "triplet").train()
    logits, feats = model(x, cam_label=_cams(6))
    assert len(logits) == len(feats) == 8 and all(t is logits[0] for t in logits[:4])
    ce = F.cross_entropy
    official = 0.5 * ce(logits[0], pids) + 0.5 * sum(ce(s, pids) for s in logits[4:]) / 4
    assert torch.allclose(tr.losses.DeepSupervision(ce, logits, pids), official)
    tri = tr.losses.TripletLoss(margin=0.3)
    official_tri = 0.5 * tri(feats[0], pids) + 0.5 * sum(tri(f, pids) for f in feats[4:]) / 4
    assert torch.allclose(tr.losses.DeepSupervision(tri, feats, pids), official_tri)
    assert tr.metrics.accuracy(logits, pids)[0] == tr.metrics.accuracy(logits[0], pids)[0]  # the global branch

    model.jpm_loss = "equal"
    logits5, feats5 = model(x, cam_label=_cams(6))
    assert len(logits5) == len(feats5) == 5 and torch.allclose(logits5[1], logits[4])
    model.jpm_loss = "global"
    g_logits, g_feat = model(x, cam_label=_cams(6))
    assert torch.allclose(g_logits, logits[0]) and torch.allclose(g_feat, feats[0])


# ------------------------------------------------------------------------------------------ cameras
def test_camera_ids_default_and_errors():
    x, cams = torch.randn(4, 3, 64, 32), torch.tensor([1, 0, 1, 1])
    model = _tiny(camera_num=2).eval()
    aware = model(x, cam_label=cams)
    with rt.camera_ids(model, cams.tolist()):
        assert torch.equal(model(x), aware)
    with pytest.warns(UserWarning, match="camera 0 for every image"):
        blind = model(x)
    assert torch.equal(blind, model(x, cam_label=torch.zeros(4, dtype=torch.long)))
    assert not torch.allclose(blind, aware)  # without cameras the features are not the camera-aware ones
    with pytest.raises(ValueError, match="batch of 4"), rt.camera_ids(model, [0, 1]):
        model(x)
    with pytest.raises(ValueError, match="< 2"):
        model(x, cam_label=torch.tensor([0, 1, 2, 0]))
    strict = _tiny(camera_num=2, default_camera=None).eval()
    with pytest.raises(ValueError, match="needs camera ids"):
        strict(x)
    assert _tiny(camera_num=1).camera_num == 0  # one camera: no SIE table (TransReID would crash indexing it)


# ------------------------------------------------------------------------------------------ checkpoints / extractor
@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory):
    """A trained-like TransReID with 2 cameras and 10 ids, saved as the official code does (DataParallel
    `module.` prefix, plus the official ViT's unused ImageNet head `base.fc`)."""
    torch.manual_seed(1)
    model = _tiny(10, camera_num=2).eval()
    for p in model.parameters():  # BN and classifier defaults are trivial: make every weight matter
        p.data.add_(0.05 * torch.randn_like(p))
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state["module.base.fc.weight"], state["module.base.fc.bias"] = torch.randn(1000, 64), torch.zeros(1000)
    path = tmp_path_factory.mktemp("ckpt") / "transformer_120.pth"
    torch.save(state, path)
    return path, model


def _reference(model, paths, cams):
    tf = build_transforms(model.cfg, is_train=False)  # reid_lite's test transform
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return model(x, cam_label=cams)


def test_feature_extractor_loads_official_checkpoint_strictly(tr, market, official_ckpt):
    path, source = official_ckpt
    paths = sorted(str(p) for p in (market / "query").glob("*.jpg"))[:5]
    cams = torch.tensor([int(p.split("_c")[1][0]) - 1 for p in paths])
    ext = rt.FeatureExtractor("tiny_stm", model_path=str(path), device="cpu", verbose=False)
    assert isinstance(ext, tr.utils.FeatureExtractor)
    assert ext.model.camera_num == 2 and ext.model.num_classes == 10  # both read from the file
    expected = _reference(source, paths, cams)
    assert torch.allclose(ext(paths, camids=cams), expected, atol=1e-5)
    # Tensors and arrays go through torchreid's own __call__ as well.
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    assert torch.allclose(ext(arrays, camids=cams), expected, atol=1e-5)

    bad = path.parent / "unsafe.pth"
    torch.save({"state_dict": source.state_dict(), "extra": types.SimpleNamespace(a=1)}, bad)
    with pytest.raises(CheckpointError, match="TRUST_CHECKPOINT"):
        rt.FeatureExtractor("tiny_stm", model_path=str(bad), device="cpu", verbose=False)
    # A non-JPM model cannot take JPM weights: one error names the file and the keys.
    with pytest.raises(CheckpointError, match=r"transformer_120.pth does not match(.|\n)*unexpected keys"):
        rt.FeatureExtractor("tiny_base_nojpm", model_path=str(path), device="cpu", verbose=False)


def test_stock_feature_extractor_and_its_silent_key_dropping(tr, market, official_ckpt, capsys):
    path, source = official_ckpt
    paths = sorted(str(p) for p in (market / "bounding_box_test").glob("*.jpg"))[:4]
    cams = torch.tensor([int(p.split("_c")[1][0]) - 1 for p in paths])
    stock = tr.utils.FeatureExtractor(model_name="tiny_stm_2cams", model_path=str(path), image_size=(64, 32),
                                      pixel_mean=[0.5] * 3, pixel_std=[0.5] * 3, device="cpu", verbose=False)
    assert "discarded" in capsys.readouterr().out  # the classifiers (num_classes=1) and base.fc
    with rt.camera_ids(stock.model, cams):
        assert torch.allclose(stock(paths), _reference(source, paths, cams), atol=1e-5)
    with pytest.warns(UserWarning, match="camera 0"):
        blind = stock(paths)
    assert torch.allclose(blind, _reference(source, paths, torch.zeros_like(cams)), atol=1e-5)

    # Registered with Market's 6 cameras, the checkpoint's 2-row SIE table does not fit: torchreid drops it
    # with a print and the features change. Our extractor reads the camera count from the file instead.
    wrong = tr.utils.FeatureExtractor(model_name="tiny_stm", model_path=str(path), image_size=(64, 32),
                                      pixel_mean=[0.5] * 3, pixel_std=[0.5] * 3, device="cpu", verbose=False)
    assert "base.sie_embed" in capsys.readouterr().out
    with rt.camera_ids(wrong.model, cams):
        assert not torch.allclose(wrong(paths), _reference(source, paths, cams), atol=1e-3)


# ------------------------------------------------------------------------------------------ engines
@pytest.fixture(scope="module")
def datamanager(tr, market):
    rt.register_dataset("reid_lite_tiny_market", "market1501")
    rt.register_dataset("reid_lite_tiny_market", "market1501")  # idempotent
    model = _tiny()
    return tr.data.ImageDataManager(root=str(market), sources="reid_lite_tiny_market", use_gpu=False,
                                    batch_size_train=8, batch_size_test=5, workers=0, num_instances=4,
                                    train_sampler="RandomIdentitySampler", transforms=["random_flip"],
                                    **rt.torchreid_data_kwargs(model))


def _engine_module(tr):
    return importlib.import_module(tr.engine.__name__ + ".engine")


def test_test_only_metrics_equal_ours(tr, datamanager, official_ckpt, tmp_path, monkeypatch):
    from reid_lite.metrics.rank import evaluate_rank

    path, _ = official_ckpt
    model = rt.transreid_stm(datamanager.num_train_pids, weights=path, **TINY_MERGE)
    assert model.camera_num == 2
    calls = []
    real = tr.metrics.evaluate_rank

    def spy(distmat, q_pids, g_pids, q_camids, g_camids, **kw):
        calls.append((distmat, q_pids, g_pids, q_camids, g_camids, real(distmat, q_pids, g_pids, q_camids,
                                                                          g_camids, **kw)))
        return calls[-1][-1]

    monkeypatch.setattr(_engine_module(tr).metrics, "evaluate_rank", spy)
    engine = rt.CameraAwareSoftmaxEngine(datamanager, model, optimizer=None, use_gpu=False)
    engine.run(save_dir=str(tmp_path), test_only=True, ranks=[1, 5])
    distmat, q_pids, g_pids, q_camids, g_camids, (cmc, mAP) = calls[0]

    def extract(loader):
        feats, pids, camids = [], [], []
        with torch.no_grad():
            for data in loader:
                feats.append(model.eval()(data["img"], cam_label=data["camid"]))
                pids += data["pid"].tolist()
                camids += data["camid"].tolist()
        return torch.cat(feats), np.array(pids), np.array(camids)

    loaders = datamanager.test_loader["reid_lite_tiny_market"]
    qf, qp, qc = extract(loaders["query"])
    gf, gp, gc = extract(loaders["gallery"])
    assert (qp == q_pids).all() and (gc == g_camids).all()
    ours = torch.cdist(qf.double(), gf.double()).pow(2).numpy()
    assert np.allclose(ours, distmat, rtol=1e-4, atol=1e-4)
    our_cmc, our_map, _ = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids)
    assert np.allclose(our_cmc, cmc[: len(our_cmc)]) and our_map == pytest.approx(mAP)
    cmc2, map2, _ = evaluate_rank(ours, qp, gp, qc, gc)
    assert np.allclose(cmc2, our_cmc) and map2 == pytest.approx(our_map, abs=1e-6)

    # The stock engine gives no cameras: every image is embedded as camera 0.
    calls.clear()
    with pytest.warns(UserWarning, match="camera 0"):
        tr.engine.ImageSoftmaxEngine(datamanager, model, optimizer=None, use_gpu=False).run(
            save_dir=str(tmp_path), test_only=True, ranks=[1, 5])
    assert not np.allclose(calls[0][0], distmat)


@pytest.mark.parametrize("kind", ["softmax", "triplet"])
def test_training_through_torchreid_engine_updates_weights(tr, datamanager, tmp_path, kind):
    torch.manual_seed(0)
    model = rt.transreid_stm(datamanager.num_train_pids, loss=kind, camera_num=datamanager.num_train_cams,
                             **TINY_MERGE)
    optimizer = tr.optim.build_optimizer(model, optim="adam", lr=1e-3)
    scheduler = tr.optim.build_lr_scheduler(optimizer, lr_scheduler="single_step", stepsize=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cls = rt.CameraAwareSoftmaxEngine if kind == "softmax" else rt.CameraAwareTripletEngine
    engine = cls(datamanager, model, optimizer=optimizer, scheduler=scheduler, use_gpu=False)
    seen = []
    real_forward = type(model).forward

    def record(self, x, label=None, cam_label=None, view_label=None):
        seen.append(cam_label)
        return real_forward(self, x, label, cam_label, view_label)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(model), "forward", record)
        engine.run(save_dir=str(tmp_path), max_epoch=1, print_freq=1, ranks=[1, 5])
    after = model.state_dict()
    for key in ("base.patch_embed.proj.weight", "base.sie_embed", "b2.0.attn.qkv.weight", "classifier_3.weight"):
        assert not torch.equal(before[key], after[key]), key
    assert seen and all(c is not None for c in seen)  # cameras reached the model in training and test

    # torchreid's own checkpoint (state_dict, optimizer, epoch, rank1 as a numpy scalar) loads through our
    # weights-only path; torchreid 0.2.5's loader cannot read it under torch >= 2.6 (weights_only default).
    saved = next((tmp_path / "model").glob("model.pth.tar-*"))
    with pytest.raises(pickle.UnpicklingError):
        tr.utils.load_checkpoint(str(saved))
    ext = rt.FeatureExtractor("tiny_stm", model_path=str(saved), device="cpu", verbose=False)
    x = torch.randn(2, 3, 64, 32)
    assert torch.allclose(ext(x, camids=[0, 1]), model.eval()(x, cam_label=torch.tensor([0, 1])), atol=1e-5)
