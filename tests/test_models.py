"""TransReID: official behaviour, checkpoints, configs, GFLOPs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_cfg, vit_base_cfg

from reid_lite import build_model, load_cfg
from reid_lite.models import CheckpointError, load_imagenet_backbone, load_transreid_checkpoint, shuffle_unit
from reid_lite.utils.flops import fvcore_gflops, transreid_gflops


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
