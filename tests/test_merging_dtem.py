"""DTEM: soft grouping and merging (training), hard merging (inference), the learned embedding in the
checkpoint, modular training that moves only the embedding, and the registry's reach (tools/test.py)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from conftest import load_tool, small_tool_yaml, tiny_cfg, tiny_train_cfg

from reid_lite.build import build_model, build_model_for_checkpoint
from reid_lite.config import load_cfg
from reid_lite.data import ImageReadWarning
from reid_lite.merging import DTEM, TokenState, learned_state_dict
from reid_lite.merging.dtem import hard_assignment, soft_bipartite_assignment, soft_merge
from reid_lite.models import CheckpointError
from reid_lite.models.vit import Block

NEG = -math.inf


def test_soft_grouping_tends_to_bipartite_matching_as_the_temperature_falls():
    # A = [cls, a1, a2, a3], B = [b0, b1, b2]; by hand, ToMe with r = 2 merges a1 -> b0 (0.9) and a2 -> b1 (0.8);
    # a3's best (0.7) is third.
    scores = torch.tensor([[[NEG, NEG, NEG],
                            [0.9, 0.2, 0.1],
                            [0.3, 0.8, 0.5],
                            [0.7, 0.1, 0.6]]])
    hard = torch.zeros(1, 4, 3)
    hard[0, 1, 0] = hard[0, 2, 1] = 1.0
    assert torch.equal(hard_assignment(scores, 2), hard)
    errors = [(soft_bipartite_assignment(scores, 2, tau) - hard).abs().max().item() for tau in (1.0, 0.1, 0.01, 0.001)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.3 and errors[-1] < 1e-6
    # rows never exceed one (Eq. 8's clipping) even when hot; the class row stays empty
    soft = soft_bipartite_assignment(scores, 3, 5.0)
    assert soft.sum(-1).max() <= 1 + 1e-6 and soft[0, 0].abs().max() == 0


def test_soft_merge_arithmetic_and_its_one_hot_limit():
    xa = torch.tensor([[[0.0, 0.0], [2.0, 4.0], [6.0, 0.0]]])
    xb = torch.tensor([[[1.0, 1.0], [0.0, 3.0]]])
    ma = torch.tensor([[[1.0], [1.0], [3.0]]])
    mb = torch.tensor([[[1.0], [2.0]]])
    # a1 gives half of itself to b0; a2 all of itself to b1
    e = torch.tensor([[[0.0, 0.0], [0.5, 0.0], [0.0, 1.0]]])
    xb2, mb2, ma2 = soft_merge(xa, xb, ma, mb, e)
    # b0: (1 * [1, 1] + 0.5 * 1 * [2, 4]) / 1.5; b1: (2 * [0, 3] + 3 * [6, 0]) / 5
    torch.testing.assert_close(xb2, torch.tensor([[[4 / 3, 2.0], [18 / 5, 6 / 5]]]))
    torch.testing.assert_close(mb2, torch.tensor([[[1.5], [5.0]]]))
    torch.testing.assert_close(ma2, torch.tensor([[[1.0], [0.5], [3e-6]]]))  # floored, never log(0)


def _bound_dtem(r: int, width: int = 4) -> DTEM:
    reducer = DTEM(r, block=0, dim=width, weights_source="fresh")
    reducer.bind(Block(width, 1))
    with torch.no_grad():  # identity embedding: the metric is the token itself
        reducer.embed.weight.copy_(torch.eye(width))
        reducer.embed.bias.zero_()
    return reducer.eval()


def test_hard_merge_is_tome_on_the_embedding():
    # cls, p1..p4 in sequence order: A = (cls, p2, p4), B = (p1, p3); p2 points like p1, p4 like p3 but less so.
    x = torch.tensor([[[9.0, 9.0, 9.0, 9.0],
                       [1.0, 0.0, 0.0, 0.0],
                       [3.0, 0.1, 0.0, 0.0],
                       [0.0, 1.0, 0.0, 0.0],
                       [0.0, 1.0, 1.0, 0.0]]])
    state = TokenState(grid=(2, 2))
    state.block_input = x
    out = _bound_dtem(1)(x, x[:, None], None, state)
    # p2 merges into p1 (size-weighted mean); order: kept A (cls, p4), then B (p1', p3)
    expected = torch.stack([x[0, 0], x[0, 4], (x[0, 1] + x[0, 2]) / 2, x[0, 3]])[None]
    torch.testing.assert_close(out, expected)
    assert state.size[0, :, 0].tolist() == [1.0, 1.0, 2.0, 1.0]


def test_soft_reduce_keeps_every_token_and_orders_them_as_the_hard_merge():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 4)
    hard_state, soft_state = TokenState(grid=(2, 4)), TokenState(grid=(2, 4))
    hard_state.block_input = soft_state.block_input = x
    reducer = _bound_dtem(2)
    hard = reducer(x, x[:, None], None, hard_state)
    reducer.tau = 1e-4  # nearly hard
    reducer.train()
    soft = reducer(x, x[:, None], None, soft_state)
    assert soft.shape == x.shape and soft_state.active == 7
    torch.testing.assert_close(soft[:, :7], hard, atol=1e-4, rtol=0)
    torch.testing.assert_close(soft_state.size[:, :7], hard_state.size, atol=1e-4, rtol=0)
    assert soft_state.size[:, 7:].max() < 1e-4  # the two merged-away tokens fade out of attention


def _dtem_cfg(**opts):
    cfg = tiny_cfg(depth=3, method="dtem", r=4)
    for k, v in opts.items():
        cfg.MERGE.DTEM[k] = v
    return cfg


def test_embedding_saves_and_loads_strictly_with_the_checkpoint(tmp_path):
    trained = build_model(_dtem_cfg(FRESH=True, SEED=3), 5, 3)
    keys = sorted(learned_state_dict(trained))
    assert keys == [f"base.blocks.{i}.reducer.embed.{p}" for i in (0, 1) for p in ("bias", "weight")]
    full = tmp_path / "full.pth"
    torch.save(trained.state_dict(), full)
    # a DTEM model without FRESH/WEIGHTS takes the embedding from the checkpoint
    loaded = build_model_for_checkpoint(_dtem_cfg(), full, camera_num=3)
    for k, v in learned_state_dict(trained).items():
        assert torch.equal(loaded.state_dict()[k], v)
    # an embedding-only file through MERGE.DTEM.WEIGHTS, on a fresh random model
    only = tmp_path / "embedding.pth"
    torch.save(learned_state_dict(trained), only)
    model = build_model(_dtem_cfg(WEIGHTS=str(only)), 5, 3)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in learned_state_dict(trained).items())
    # a ToMe model reads the same DTEM checkpoint, without the embedding
    cfg = tiny_cfg(depth=3, method="tome", r=4)
    build_model_for_checkpoint(cfg, full, camera_num=3)


def test_a_checkpoint_without_the_embedding_is_a_clear_error_unless_a_fresh_one_is_asked(tmp_path):
    plain = tmp_path / "plain.pth"
    torch.save(build_model(tiny_cfg(depth=3, method="none"), 5, 3).state_dict(), plain)
    with pytest.raises(CheckpointError, match=r"holds no learned merging weights.*MERGE\.DTEM\.WEIGHTS.*FRESH True"):
        build_model_for_checkpoint(_dtem_cfg(), plain, camera_num=3)
    build_model_for_checkpoint(_dtem_cfg(FRESH=True), plain, camera_num=3)
    # an embedding file for other blocks, and two sources at once, are refused by name
    other = tmp_path / "other.pth"
    torch.save(learned_state_dict(build_model(_dtem_cfg(FRESH=True), 5, 3)), other)
    cfg = _dtem_cfg(WEIGHTS=str(other))
    cfg.MERGE.LAYERS = [1]
    with pytest.raises(CheckpointError, match=r"blocks \[1, 2\].*merges in blocks \[1\]"):
        build_model(cfg, 5, 3)
    full = tmp_path / "full.pth"
    torch.save(build_model(_dtem_cfg(FRESH=True), 5, 3).state_dict(), full)
    with pytest.raises(CheckpointError, match="MERGE.DTEM.WEIGHTS"):
        build_model_for_checkpoint(_dtem_cfg(WEIGHTS=str(other)), full, camera_num=3)


def test_a_training_step_changes_only_the_embedding(tiny_data, tmp_path, one_thread):
    from reid_lite.engine.trainer import train

    start = tmp_path / "start.pth"
    cfg = tiny_train_cfg(tiny_data, tmp_path / "out", 1, "MERGE.METHOD", "dtem", "MERGE.DTEM.FRESH", True,
                         "MERGE.DTEM.DIM", 8, "MODEL.DROP_PATH", 0.1)
    torch.save(build_model(cfg, 8, 3).state_dict(), start)
    cfg = tiny_train_cfg(tiny_data, tmp_path / "out", 1, "MERGE.METHOD", "dtem", "MERGE.DTEM.DIM", 8,
                         "MERGE.DTEM.TRAIN_EMBEDDING_ONLY", True, "MODEL.PRETRAIN_CHOICE", "self",
                         "MODEL.PRETRAIN_PATH", str(start), "MODEL.DROP_PATH", 0.1, "SOLVER.BASE_LR", 0.05)
    result = train(cfg, evaluate=False, tensorboard=False)
    before = torch.load(start, weights_only=True)
    after = result.model.state_dict()
    learned = set(learned_state_dict(result.model))
    assert learned and set(after) == set(before)
    frozen = [k for k in before if k not in learned]
    assert [k for k in frozen if not torch.equal(after[k], before[k])] == []
    assert all(not torch.equal(after[k], before[k]) for k in learned)
    # the embedding alone, ready for MERGE.DTEM.WEIGHTS
    saved = torch.load(tmp_path / "out" / "dtem_embedding.pth", weights_only=True)
    assert set(saved) == learned and all(torch.equal(saved[k], after[k]) for k in learned)


def test_training_the_embedding_needs_dtem_and_an_embedding_to_start_from(tiny_data, tmp_path):
    from reid_lite.engine.trainer import train

    cfg = tiny_train_cfg(tiny_data, tmp_path / "out", 1, "MERGE.DTEM.TRAIN_EMBEDDING_ONLY", True)
    with pytest.raises(ValueError, match="set MERGE.METHOD dtem"):
        train(cfg, evaluate=False, tensorboard=False)
    cfg = tiny_train_cfg(tiny_data, tmp_path / "out", 1, "MERGE.METHOD", "dtem",
                         "MERGE.DTEM.TRAIN_EMBEDDING_ONLY", True)
    with pytest.raises(ValueError, match="FRESH True"):
        train(cfg, evaluate=False, tensorboard=False)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from reid_lite.data.synthetic import generate_reid_dataset

    return generate_reid_dataset(tmp_path_factory.mktemp("dtem_data"), num_train_ids=4, num_test_ids=4,
                                 num_cameras=2, images_per_id_per_camera=2, size=(64, 32), num_distractors=0,
                                 progress=False)


def test_tools_test_compares_dtem(data_root, tmp_path, capsys):
    tool = load_tool("test")
    cfg = tmp_path / "tiny.yml"
    cfg.write_text(small_tool_yaml(data_root, depth=3, layers=[1, 2], out=tmp_path / "out"))
    argv = ["--config", cfg, "--no-progress", "--compare", "none,tome,dtem", "MERGE.DTEM.FRESH", True]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageReadWarning)
        assert tool.main([str(a) for a in argv]) == 0
        rows = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
        assert [r["method"] for r in rows] == ["none", "tome", "dtem"]
        assert rows[2]["schedule"] == rows[1]["schedule"] and rows[2]["gflops"] > rows[1]["gflops"]  # + embedding
        # on trained weights, a compared DTEM must say where its embedding comes from
        weights = tmp_path / "w.pth"
        torch.save(build_model(load_cfg(cfg, ["MERGE.METHOD", "none"]), 4, 2).state_dict(), weights)
        capsys.readouterr()
        assert tool.main([str(a) for a in ["--config", cfg, "--compare", "none,dtem", "TEST.WEIGHT", weights]]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "MERGE.DTEM.WEIGHTS" in errors[0]


def test_a_timm_vit_takes_dtem_and_gives_it_back():
    import timm

    from reid_lite.merging import apply_merging, merge_cfg

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3, num_classes=5).eval()
    apply_merging(vit, merge_cfg("dtem", r=8, layers=[1, 2], dtem_fresh=True, dtem_dim=16))
    keys = [f"blocks.{i}.reducer.embed.{p}" for i in (0, 1) for p in ("bias", "weight")]
    assert sorted(learned_state_dict(vit)) == keys
    with torch.no_grad():
        assert vit(torch.randn(2, 3, 224, 224)).shape == (2, 5)
    apply_merging(vit, merge_cfg("tome", r=8, layers=[1, 2]))  # a plain reducer replaces the registered one
    assert learned_state_dict(vit) == {} and not any("reducer" in k for k in vit.state_dict())


@pytest.mark.parametrize("hidden", [0, 8])
def test_analytic_flops_count_the_embedding_as_fvcore_does(hidden):
    from reid_lite.compress.flops import fvcore_gflops, transreid_gflops

    model = build_model(_dtem_cfg(FRESH=True, DIM=16, HIDDEN=hidden), 5, 3).eval()
    tome = build_model(tiny_cfg(depth=3, method="tome", r=4), 5, 3).eval()
    assert transreid_gflops(model) == pytest.approx(fvcore_gflops(model), rel=1e-9)
    assert transreid_gflops(model) > transreid_gflops(tome)  # same schedule plus the embedding


def test_compare_gives_the_model_back_with_its_own_learned_embedding(data_root):
    """`evaluate(..., methods=...)` runs each method on its own copy of the model: an embedding that came with a
    checkpoint (not from the config) keeps its values, and the model its reducers."""
    from reid_lite.data import build_dataset
    from reid_lite.engine.evaluator import evaluate

    cfg = _dtem_cfg(FRESH=True)  # what each compared method is rebuilt from: a fresh seeded embedding
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg, 4, 2)
    with torch.no_grad():
        for p in learned_state_dict(model).values():
            p.add_(1.0)  # as trained: unlike the fresh values the config would rebuild
    trained = {k: v.clone() for k, v in learned_state_dict(model).items()}
    reducers = dict(model.reducers)
    dataset = build_dataset("market1501", data_root.parent, dataset_dir=data_root.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageReadWarning)
        evaluate(cfg, model, dataset, device="cpu", methods=["none", "dtem"], progress=False)
    after = learned_state_dict(model)
    assert set(after) == set(trained) and all(torch.equal(after[k], v) for k, v in trained.items())
    assert model.reducers == reducers and all(model.reducers[i] is r for i, r in reducers.items())
