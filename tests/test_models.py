"""TransReID: official behaviour, checkpoints, configs, GFLOPs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_cfg, vit_base_cfg

from reid_lite import build_model, load_cfg
from reid_lite.compress.flops import fvcore_gflops, transreid_gflops
from reid_lite.models import CheckpointError, load_imagenet_backbone, load_transreid_checkpoint, shuffle_unit


def _official_forward(model, x, cams):
    """The official TransReID eval forward, written out literally: explicit softmax attention and the
    four JPM branches run one after another (no fused kernel, no batching of the branches)."""

    def block(blk, t):
        a = blk.attn
        B, N, C = t.shape
        y = blk.norm1(t)
        qkv = a.qkv(y).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * a.scale).softmax(dim=-1)
        t = t + a.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        return t + blk.mlp(blk.norm2(t))

    base = model.base
    t = base.patch_embed.proj(x).flatten(2).transpose(1, 2)
    t = torch.cat((base.cls_token.expand(t.shape[0], -1, -1), t), dim=1)
    t = t + base.pos_embed + base.sie_xishu * base.sie_embed[cams]
    for blk in base.blocks[:-1]:
        t = block(blk, t)
    glob = model.b1[1](block(model.b1[0], t))[:, 0]
    n = t.size(1) - 1
    L = n // 4
    token = t[:, 0:1]
    # The official shuffle_unit, verbatim (shift 5, group 2, begin 1).
    feats = torch.cat([t[:, 5:], t[:, 1:5]], dim=1)
    try:
        feats = feats.view(feats.size(0), 2, -1, feats.size(-1))
    except RuntimeError:
        feats = torch.cat([feats, feats[:, -2:-1, :]], dim=1).view(feats.size(0), 2, -1, feats.size(-1))
    feats = torch.transpose(feats, 1, 2).contiguous().view(t.size(0), -1, t.size(-1))
    locs = [model.b2[1](block(model.b2[0], torch.cat((token, feats[:, i * L:(i + 1) * L]), dim=1)))[:, 0]
            for i in range(4)]
    return torch.cat([glob] + [f / 4 for f in locs], dim=1)


def test_matches_the_official_forward(images, cams):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg.TEST.NECK_FEAT = "before"
    model = build_model(cfg, 10, 3, 1).eval()
    with torch.no_grad():
        ours, ref = model(images, cam_label=cams), _official_forward(model, images, cams)
    assert ours.shape == (6, 5 * 48)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_shuffle_unit_pads_odd_lengths_like_the_official_code():
    x = torch.arange(1 + 7).float().view(1, 8, 1)  # class token + 7 patches
    out = shuffle_unit(x, shift=2, group=2).flatten().tolist()
    # rolled: [2..7, 1], padded with the second-to-last (7) -> [2,3,4,5,6,7,1,7], interleaved in two groups
    assert out == [2, 6, 3, 7, 4, 1, 5, 7]


def test_state_dict_uses_the_official_key_layout():
    model = build_model(tiny_cfg(), 10, 3, 1)
    keys = set(model.state_dict())
    assert {"base.cls_token", "base.pos_embed", "base.sie_embed", "base.patch_embed.proj.weight",
            "base.blocks.0.attn.qkv.weight", "base.blocks.0.mlp.fc1.weight", "b1.0.attn.proj.weight", "b1.1.weight",
            "b2.0.norm1.weight", "bottleneck.weight", "bottleneck_4.running_mean", "classifier.weight",
            "classifier_4.weight"} <= keys
    assert not any(k.startswith(("reducer", "base.blocks.0.reducer")) for k in keys)


def test_checkpoint_roundtrip_strict_with_module_prefix(tmp_path, images, cams):
    torch.manual_seed(1)
    src = build_model(tiny_cfg(), 10, 3, 1).eval()
    path = tmp_path / "transreid.pth"
    official = {f"module.{k}": v for k, v in src.state_dict().items()}
    # The official ViT carries an unused ImageNet head, `base.fc`: it must not stop a strict load.
    official.update({"module.base.fc.weight": torch.zeros(1000, 48), "module.base.fc.bias": torch.zeros(1000)})
    torch.save(official, path)
    torch.manual_seed(2)
    dst = build_model(tiny_cfg(), 10, 3, 1).eval()
    load_transreid_checkpoint(dst, path)
    with torch.no_grad():
        assert torch.equal(src(images, cam_label=cams), dst(images, cam_label=cams))


def test_checkpoint_mismatch_is_one_error_listing_the_keys(tmp_path):
    model = build_model(tiny_cfg(), 10, 3, 1)
    state = model.state_dict()
    state.pop("b1.1.weight")
    state["extra.weight"] = torch.zeros(1)
    state["classifier.weight"] = torch.zeros(5, 48)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as e:
        load_transreid_checkpoint(model, path)
    msg = str(e.value)
    assert "b1.1.weight" in msg and "extra.weight" in msg and "classifier.weight: checkpoint (5, 48)" in msg
    # Evaluating on other identities: the classifier may differ and is ignored on request.
    state = model.state_dict()
    state["classifier.weight"] = torch.zeros(5, 48)
    torch.save(state, path)
    load_transreid_checkpoint(model, path, ignore_classifier=True)


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_unsafe_checkpoint_is_refused_unless_trusted(tmp_path, capsys):
    model = build_model(tiny_cfg(), 10, 3, 1)
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": model.state_dict(), "x": _Payload()}, path)
    with pytest.raises(CheckpointError, match="TRUST_CHECKPOINT"):
        load_transreid_checkpoint(model, path)
    assert "unpickled!" not in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="not found"):
        load_transreid_checkpoint(model, tmp_path / "missing.pth")


def test_imagenet_vit_file_initialises_the_backbone(tmp_path):
    import timm

    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=224, patch_size=16, embed_dim=48, depth=4, num_heads=4, num_classes=1000)
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    model = build_model(tiny_cfg(), 10, 3, 1)
    load_imagenet_backbone(model.base, path)
    assert model.base.pos_embed.shape == (1, 1 + 21 * 10, 48)
    assert torch.equal(model.base.blocks[2].attn.qkv.weight, vit.blocks[2].attn.qkv.weight)
    assert torch.equal(model.base.pos_embed[:, 0], vit.pos_embed[:, 0])
    # Resampled bilinearly from the 14x14 grid, as the official code does.
    grid = vit.pos_embed[:, 1:].reshape(1, 14, 14, 48).permute(0, 3, 1, 2)
    expect = F.interpolate(grid, size=(21, 10), mode="bilinear").permute(0, 2, 3, 1).reshape(1, 210, 48)
    torch.testing.assert_close(model.base.pos_embed[:, 1:], expect)
    # Through the config too, with the JPM branches copied from the loaded last block.
    cfg = tiny_cfg()
    cfg.MODEL.PRETRAIN_CHOICE, cfg.MODEL.PRETRAIN_PATH = "imagenet", str(path)
    model = build_model(cfg, 10, 3, 1)
    assert torch.equal(model.b1[0].mlp.fc2.weight, vit.blocks[3].mlp.fc2.weight)


def test_features_are_deterministic_and_batch_independent(images, cams):
    model = build_model(tiny_cfg(), 10, 3, 1).eval()
    with torch.no_grad():
        batch = model(images, cam_label=cams)
        again = model(images, cam_label=cams)
        alone = torch.cat([model(images[i:i + 1], cam_label=cams[i:i + 1]) for i in range(len(images))])
    assert torch.equal(batch, again)
    torch.testing.assert_close(alone, batch, rtol=1e-5, atol=1e-5)


def test_sie_needs_camera_ids(images):
    model = build_model(tiny_cfg(), 10, 3, 1).eval()
    with pytest.raises(ValueError, match="cam_label"):
        model(images)


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("MODEL:\n  NOT_A_KEY: 1\n")
    with pytest.raises(KeyError, match="NOT_A_KEY"):
        load_cfg(bad)
    with pytest.raises(KeyError, match="MERGE.NOPE"):
        load_cfg("msmt17_stm.yml", ["MERGE.NOPE", "1"])
    cfg = load_cfg("msmt17_stm.yml", ["MERGE.R", "6"])  # a bare name is looked up in configs/
    assert (cfg.MERGE.METHOD, cfg.MERGE.R, cfg.MODEL.STRIDE_SIZE, cfg.MODEL.JPM) == ("stm", 6, [12, 12], True)


@pytest.mark.parametrize("written, expected, first", [("0", "0", 0), ("1", "1", 1), ("0,1", "0,1", 0),
                                                     ("('2')", "('2')", 2)])
def test_device_id_is_kept_as_text_from_yaml_and_command_line(tmp_path, written, expected, first):
    """`MODEL.DEVICE_ID 1` (a number to YAML and to yacs) and TransReID's `DEVICE_ID: ('0')` are accepted, and
    the id reaches device selection."""
    from reid_lite.utils.device import first_device_id

    path = tmp_path / "dev.yml"
    path.write_text(f"MODEL:\n  DEVICE_ID: {written}\n")
    assert load_cfg(path).MODEL.DEVICE_ID == expected
    assert load_cfg(None, ["MODEL.DEVICE_ID", written]).MODEL.DEVICE_ID == expected
    assert first_device_id(expected) == first


def test_paper_gflops_unmerged_vit_base():
    model = build_model(vit_base_cfg(), 1000, 15, 1).eval()
    assert round(fvcore_gflops(model), 2) == 20.41
    assert transreid_gflops(model) == pytest.approx(fvcore_gflops(model), rel=1e-6)
    assert model.feature_dim == 3840


def test_sie_table_cameras_reads_the_checkpoint_table():
    from reid_lite.models import sie_table_cameras

    assert sie_table_cameras({"base.sie_embed": torch.zeros(6, 1, 8)}) == 6
    assert sie_table_cameras({"sie_embed": torch.zeros(12, 1, 8)}, view_num=2) == 6
    assert sie_table_cameras({"base.cls_token": torch.zeros(1, 1, 8)}) == 0


# ------------------------------------------------------------------------------ ordinary mistakes, clear errors


@pytest.mark.parametrize("kind", ["yaml", "empty", "directory", "binary"])
def test_a_file_that_is_no_checkpoint_says_what_it_is_and_never_suggests_trusting_it(tmp_path, kind):
    from reid_lite.models import read_state_dict

    path = {"yaml": tmp_path / "market1501_stm.yml", "empty": tmp_path / "empty.pth",
            "directory": tmp_path / "run", "binary": tmp_path / "photo.jpg"}[kind]
    if kind == "yaml":
        path.write_text("MODEL:\n  NAME: 'transformer'\n")
        expect = f"{path} is not a PyTorch checkpoint (a text file, "
    elif kind == "empty":
        path.touch()
        expect = f"{path} is empty (0 bytes): not a checkpoint"
    elif kind == "directory":
        path.mkdir()
        torch.save({}, path / "transformer_120.pth")
        expect = f"{path} is a directory, not a checkpoint file: give the path of a .pth file, e.g. " \
                 f"{path / 'transformer_120.pth'}"
    else:
        path.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)))
        expect = f"{path} is not a PyTorch checkpoint (not in torch.save's format, "
    with pytest.raises(CheckpointError) as exc:
        read_state_dict(path)
    msg = str(exc.value)
    assert msg.startswith(expect) and "\n" not in msg
    assert "TRUST_CHECKPOINT" not in msg  # unpickling it would not help, and would be unsafe


def test_truncated_checkpoint_is_named_damaged(tmp_path):
    from reid_lite.models import read_state_dict

    path = tmp_path / "cut.pth"
    torch.save({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=r"cut.pth is not a readable PyTorch checkpoint \(truncated or damaged"):
        read_state_dict(path)


def test_sie_on_with_fewer_than_two_cameras_is_an_error_that_says_what_to_do():
    cfg = tiny_cfg()  # MODEL.SIE_CAMERA True
    for cams in (0, 1):
        with pytest.raises(ValueError, match=f"MODEL.SIE_CAMERA is on but camera_num={cams}: .* at least 2 cameras"
                                             ".*sie_table_cameras.*or set MODEL.SIE_CAMERA False"):
            build_model(cfg, 10, cams, 0)
    cfg.MODEL.SIE_CAMERA = False
    assert not hasattr(build_model(cfg, 10, 1, 0).base, "sie_embed")  # asked for explicitly: fine


def test_bad_cam_label_is_a_value_error_naming_the_valid_range(images):
    model = build_model(tiny_cfg(), 10, 3, 1).eval()
    with torch.no_grad():
        for bad, match in (
            (torch.tensor([0, 1, 2, 3, 0, 1]), r"camera ids must lie in \[0, 3\) .*cam_label.*got \[0, 3\]"),
            (torch.tensor([0, -1, 2, 0, 1, 2]), r"camera ids must lie in \[0, 3\) .*got \[-1, 2\]"),
            (torch.tensor([0.0, 1, 2, 0, 1, 2]), r"cam_label must hold integer camera ids \(0..2\), got dtype "
                                                 r"torch.float32"),
            (torch.tensor([0, 1, 2]), r"cam_label must have one camera id \(0..2\) per image: shape \(6,\), got "
                                      r"\(3,\)"),
            (torch.zeros(6, 1, dtype=torch.long), r"one camera id \(0..2\) per image"),
            (5, r"camera ids must lie in \[0, 3\)"),
            ([0, 1, 2, 0, 1, 2], r"cam_label must be an integer tensor of camera ids \(0..2\), got list"),
        ):
            with pytest.raises(ValueError, match=match):
                model(images, cam_label=bad)
        # an int32 tensor and a single int for the whole batch are fine
        ref = model(images, cam_label=torch.full((6,), 2))
        assert torch.equal(model(images, cam_label=torch.full((6,), 2, dtype=torch.int32)), ref)
        assert torch.equal(model(images, cam_label=2), ref) and torch.equal(model(images, cam_label=np.int64(2)), ref)


def test_model_for_a_checkpoint_takes_its_camera_count_from_the_sie_table(tmp_path, images):
    from reid_lite.build import build_model_for_checkpoint
    from reid_lite.engine.extractor import FeatureExtractor

    cfg = tiny_cfg()
    trained = build_model(cfg, 10, 6, 0).eval()  # trained on 6 cameras
    path = tmp_path / "six.pth"
    torch.save(trained.state_dict(), path)
    model = build_model_for_checkpoint(cfg, path, 1, camera_num=2).eval()  # data with 2 cameras
    assert model.base.cam_num == 6
    with torch.no_grad():
        assert torch.equal(model(images, cam_label=torch.tensor([0, 1, 5, 0, 1, 5])),
                           trained(images, cam_label=torch.tensor([0, 1, 5, 0, 1, 5])))
    # the library's FeatureExtractor builds the same way
    assert FeatureExtractor(cfg, weights=str(path), device="cpu", camera_num=2).model.base.cam_num == 6
    with pytest.raises(CheckpointError, match=r"the data has 8 cameras .* trained with 6 \(its SIE table\)"):
        build_model_for_checkpoint(cfg, path, camera_num=8)
    cfg.MODEL.SIE_CAMERA = False
    torch.save(build_model(cfg, 10).state_dict(), path)
    cfg.MODEL.SIE_CAMERA = True
    with pytest.raises(CheckpointError, match="has no camera SIE table .* set MODEL.SIE_CAMERA False"):
        build_model_for_checkpoint(cfg, path, camera_num=2)


@pytest.mark.parametrize("make, words", [
    (lambda: torch.zeros(0, 3, 256, 128), "got an empty batch (0, 3, 256, 128)"),
    (lambda: torch.zeros(3, 256, 128), "got one unbatched image (3, 256, 128): add the batch dimension"),
    (lambda: torch.zeros(2, 3, 256, 128, dtype=torch.uint8), "got dtype torch.uint8: convert and normalise"),
    (lambda: torch.zeros(2, 1, 256, 128), "got 1 channel(s) in shape (2, 1, 256, 128)"),
    (lambda: torch.zeros(2, 3, 128, 64), "got size (128, 64): resize to INPUT.SIZE_TEST [256, 128]"),
    (lambda: np.zeros((2, 3, 256, 128), np.float32), "got ndarray"),
])
def test_model_input_mistakes_are_a_value_error_naming_the_expected_input(make, words):
    model = build_model(tiny_cfg(depth=2), 10, 3).eval()
    with pytest.raises(ValueError) as exc:
        model(make(), cam_label=torch.zeros(2, dtype=torch.long))
    assert "the model takes a float tensor (B, 3, 256, 128) of preprocessed images" in str(exc.value)
    assert words in str(exc.value)


def test_a_batch_of_one_in_train_mode_says_to_call_eval():
    model = build_model(tiny_cfg(depth=2), 10, 3).train()
    with pytest.raises(ValueError, match=r"a batch of one image in train mode: BatchNorm needs at least 2; call "
                                         r"model.eval\(\)"):
        model(torch.zeros(1, 3, 256, 128), cam_label=torch.zeros(1, dtype=torch.long))
    assert model.eval()(torch.zeros(1, 3, 256, 128), cam_label=torch.zeros(1, dtype=torch.long)).shape[0] == 1


def test_the_input_checks_read_no_tensor_values():
    """Shape and dtype only: the checks pass on a meta tensor, which has no values to read (a `.item()` or
    `bool(tensor)` would fail), so they add no host-device synchronisation to the forward."""
    from reid_lite.models.transreid import check_images

    check_images(torch.empty(4, 3, 256, 128, device="meta"), (256, 128), training=True)
    with pytest.raises(ValueError, match="empty batch"):
        check_images(torch.empty(0, 3, 256, 128, device="meta"), (256, 128))


def test_nan_pixels_are_refused_where_images_enter_and_never_stored(tmp_path):
    """FeatureExtractor refuses a preprocessed tensor with NaN/inf; a gallery write refuses non-finite features."""
    from reid_lite.engine.extractor import FeatureExtractor
    from reid_lite.index.gallery import Gallery
    from reid_lite.index.storage import GalleryError
    from reid_lite.index.store import CropRecord

    cfg = tiny_cfg(depth=2)
    model = build_model(cfg, 10, 3).eval()
    fe = FeatureExtractor(cfg, model=model)
    x = torch.zeros(3, 3, 256, 128)
    x[1, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf pixels \(image\(s\) \[1\] of the batch\)"):
        fe(x, camids=[0, 1, 2])
    x[1, 0, 5, 5] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        fe([x[0], x[1]], camids=[0, 1])
    g = Gallery.create(tmp_path / "g", cfg, camera_num=3)
    feats = np.ones((2, g.dim), np.float32) / np.sqrt(g.dim)
    feats[1, 0] = np.nan
    records = [CropRecord(path=f"/x/{i}.jpg", sha256=f"{i:064d}", camid=0) for i in range(2)]
    with pytest.raises(GalleryError, match=r"1 of 2 feature\(s\) are not finite .* /x/1.jpg: nothing was written"):
        g.add_features(records, feats)
    assert g.store.count() == 0
    g.close()
