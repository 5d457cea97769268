"""`reid_lite.merging.patch`: ToMe's way of using the library (patch a model, then set `model.r`).

The ToMe reference below is the algorithm of Bolya et al. (ICLR 2023) written out literally, one image at a time
with explicit softmax attention, as ToMe's own timm patch computes it: proportional attention (+log size on the
keys), the keys' mean over heads as the similarity metric, alternate tokens split into A and B with the class
token protected, the r best-matched A tokens merged into their B match by size-weighted average, the kept A
tokens in their order followed by every B token; r tokens in every block (`parse_r` of a constant r).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_cfg
from timm.models.vision_transformer import ResPostBlock, VisionTransformer

from reid_lite import merging
from reid_lite.build import build_model
from reid_lite.config import load_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def _vit(depth: int = 4, seed: int = 0, **kwargs) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=64, patch_size=8, embed_dim=48, depth=depth, num_heads=4, num_classes=0,
                             **kwargs).eval()


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def reference_tome_tokens(vit: VisionTransformer, images: torch.Tensor, r: int) -> list[torch.Tensor]:
    """ToMe's output tokens after the final norm, per image (a list: counts may differ from the input's)."""
    out = []
    with torch.no_grad():
        for tokens in vit._pos_embed(vit.patch_embed(images)):
            size = torch.ones(tokens.shape[0], 1)
            for blk in vit.blocks:
                n, dim = tokens.shape
                heads = blk.attn.num_heads
                q, k, v = blk.attn.qkv(blk.norm1(tokens)).reshape(n, 3, heads, dim // heads).permute(1, 2, 0, 3)
                logits = (q @ k.transpose(-2, -1)) * blk.attn.scale + size.log()[:, 0]
                attended = (logits.softmax(dim=-1) @ v).transpose(0, 1).reshape(n, dim)
                tokens = tokens + blk.attn.proj(attended)
                r_here = min(r, (n - 1) // 2)
                if r_here > 0:
                    metric = k.mean(dim=0)
                    metric = metric / metric.norm(dim=-1, keepdim=True)
                    a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
                    scores = metric[a_pos] @ metric[b_pos].T
                    scores[0, :] = -math.inf  # the class token (A's first) never merges
                    best, match = scores.max(dim=-1)
                    ranked = best.argsort(descending=True).tolist()
                    merged, kept = ranked[:r_here], sorted(ranked[r_here:])
                    dst_sum = tokens[b_pos] * size[b_pos]
                    dst_size = size[b_pos].clone()
                    for a in merged:
                        dst_sum[match[a]] += tokens[a_pos[a]] * size[a_pos[a]]
                        dst_size[match[a]] += size[a_pos[a]]
                    kept_pos = [a_pos[a] for a in kept]
                    tokens = torch.cat([tokens[kept_pos], dst_sum / dst_size])
                    size = torch.cat([size[kept_pos], dst_size])
                tokens = tokens + blk.mlp(blk.norm2(tokens))
            out.append(vit.norm(tokens))
    return out


@pytest.mark.parametrize("r", [4, 8])
def test_patch_tome_on_a_timm_vit_is_tomes_behaviour(r):
    vit, images = _vit(), _images()
    expected = reference_tome_tokens(vit, images, r)
    merging.patch(vit, "tome", r=r)  # layers=None: every block, as ToMe's timm patch
    assert [b.reducer is not None for b in vit.blocks] == [True] * 4
    with torch.no_grad():
        got = vit.forward_features(images)
    assert got.shape == (2, 65 - 4 * r, 48)
    for image, want in zip(got, expected):
        torch.testing.assert_close(image, want, rtol=1e-5, atol=1e-5)


def test_r_is_changed_afterwards_like_tomes_model_r():
    vit, images = _vit(), _images()
    with torch.no_grad():
        unmerged = vit(images)
    merging.patch(vit, "tome", r=4)
    assert vit.r == 4
    vit.r = 8  # as `tome.patch.timm(vit); vit.r = 8`
    assert vit.merge_section.R == 8
    with torch.no_grad():
        got = vit.forward_features(images)
    for image, want in zip(got, reference_tome_tokens(_vit(), images, 8)):
        torch.testing.assert_close(image, want, rtol=1e-5, atol=1e-5)
    vit.r = 0
    with torch.no_grad():
        assert torch.allclose(vit(images), unmerged, atol=1e-6)


def test_another_option_is_changed_afterwards_and_a_bad_one_keeps_the_model():
    vit = _vit()
    merging.patch(vit, "evit", r=0, evit_layers=[2], evit_keep_rate=0.7)
    assert vit.blocks[1].reducer.keep_rate == pytest.approx(0.7)
    merging.retune(vit, evit_keep_rate=0.5)
    assert vit.blocks[1].reducer.keep_rate == pytest.approx(0.5)
    before = vit.merge_section
    with pytest.raises(KeyError, match="unknown merging option"):
        merging.retune(vit, evit_keep=0.3)
    with pytest.raises(ValueError, match="largest allowed r|at most"):
        merging.patch(_vit(), "tome", r=40)
    assert vit.merge_section is before


def test_patched_timm_vit_equals_the_config_path():
    images = _images()
    patched = merging.patch(_vit(), "stm", r=4, stm_alpha=0.2)
    section = load_cfg(None, ["MERGE.METHOD", "stm", "MERGE.R", "4", "MERGE.LAYERS", "[1, 2, 3, 4]",
                              "MERGE.STM.ALPHA", "0.2"]).MERGE
    configured = merging.apply_merging(_vit(), section)
    with torch.no_grad():
        assert torch.equal(patched(images), configured(images))


def test_patched_transreid_equals_the_built_model():
    images = torch.randn(2, 3, 256, 128, generator=torch.Generator().manual_seed(5))
    cams = torch.tensor([0, 2])
    torch.manual_seed(0)
    built = build_model(tiny_cfg(METHOD="stm", R=12, LAYERS=[1, 2, 3]), 10, 3, 1).eval()
    torch.manual_seed(0)
    plain = build_model(tiny_cfg(METHOD="none"), 10, 3, 1).eval()
    plain.load_state_dict(built.state_dict())
    merging.patch(plain, "stm", r=12)  # layers=None: the trunk's blocks (JPM's branch block excluded)
    assert sorted(plain.reducers) == [0, 1, 2]
    with torch.no_grad():
        assert torch.equal(plain(images, cam_label=cams), built(images, cam_label=cams))


def test_attention_masks_pass_through_until_the_first_reduction():
    vit, images = _vit(), _images()
    mask = torch.ones(65, 65, dtype=torch.bool)
    mask[:, 7] = False  # no token attends to patch 7
    with torch.no_grad():
        expected = vit.forward_features(images, attn_mask=mask)
        merging.patch(vit, "tome", r=0)
        assert torch.allclose(vit.forward_features(images, attn_mask=mask), expected, atol=1e-6)
        assert not torch.allclose(vit.forward_features(images), expected, atol=1e-4)
        vit.r = 4
        with pytest.raises(ValueError, match="reduced by an earlier block"):
            vit.forward_features(images, attn_mask=mask)


def test_patch_refuses_other_models_and_blocks():
    with pytest.raises(TypeError, match="ResPostBlock"):
        merging.patch(_vit(block_fn=ResPostBlock), "tome", r=4)
    with pytest.raises(TypeError, match="TransReID or a timm VisionTransformer"):
        merging.patch(torch.nn.Linear(3, 3), "tome", r=4)
    with pytest.raises(ValueError, match="budgets are solved by reid_lite.compress"):
        merging.patch(_vit(), "tome", r=4, target_gflops=1.0)
