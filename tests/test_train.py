"""Training: losses on hand-checkable cases, optimiser/schedule, a few real steps, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import load_tool, tiny_train_cfg

from reid_lite.build import build_model
from reid_lite.config import get_cfg, load_cfg
from reid_lite.data import build_train_loader
from reid_lite.engine.losses import TripletLoss, hard_example_mining, jpm_weighted, make_loss
from reid_lite.engine.trainer import (
    create_scheduler,
    do_train,
    make_optimizer,
    prepare_dataset,
    save_state_dict,
    sie_counts,
    train,
)
from reid_lite.models import load_transreid_checkpoint

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ losses


def test_hard_mining_picks_hardest_positive_and_negative():
    # 1-D points: id 0 at {0, 1, 5}, id 1 at {3.5, 10}. For the anchor at 0 the hardest positive is 5
    # (index 2) and the hardest negative 3.5 (index 3); for the anchor at 10 (id 1) the positive is 3.5
    # (distance 6.5) and the negative 5 (distance 5).
    x = torch.tensor([[0.0], [1.0], [5.0], [3.5], [10.0]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    dist = torch.cdist(x, x)
    ap, an, p_idx, n_idx = hard_example_mining(dist, labels)
    assert p_idx.tolist() == [2, 2, 0, 4, 3]
    assert n_idx.tolist() == [3, 3, 3, 2, 2]
    assert ap.tolist() == [5.0, 4.0, 5.0, 6.5, 6.5]
    assert an.tolist() == [3.5, 2.5, 1.5, 1.5, 5.0]


def test_triplet_loss_margin_and_soft_margin():
    x = torch.tensor([[0.0], [1.0], [5.0], [3.5], [10.0]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    ap = torch.tensor([5.0, 4.0, 5.0, 6.5, 6.5])
    an = torch.tensor([3.5, 2.5, 1.5, 1.5, 5.0])
    loss, d_ap, d_an = TripletLoss(margin=0.3)(x, labels)
    assert torch.allclose(d_ap, ap, atol=1e-4) and torch.allclose(d_an, an, atol=1e-4)
    assert loss.item() == pytest.approx(torch.relu(ap - an + 0.3).mean().item(), abs=1e-4)
    soft, _, _ = TripletLoss(margin=None)(x, labels)
    assert soft.item() == pytest.approx(F.softplus(ap - an).mean().item(), abs=1e-4)
    # Easy batch: every negative is farther than every positive by more than the margin -> zero loss.
    easy = torch.tensor([[0.0], [0.1], [10.0], [10.1]])
    assert TripletLoss(0.3)(easy, torch.tensor([0, 0, 1, 1]))[0].item() == pytest.approx(0.0, abs=1e-6)


def test_triplet_loss_single_identity_is_zero_with_gradient():
    x = torch.randn(4, 8, requires_grad=True)
    loss, _, _ = TripletLoss(0.3)(x, torch.zeros(4, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph
    assert x.grad is not None


def test_jpm_weighting_half_global_half_mean_of_locals():
    assert jpm_weighted(lambda v: v, [torch.tensor(v) for v in (2.0, 1.0, 2.0, 3.0, 6.0)]).item() == 0.5 * 2 + 0.5 * 3
    assert jpm_weighted(lambda v: v * 2, torch.tensor(4.0)).item() == 8.0


def _loss_cfg(**opts):
    cfg = get_cfg()
    cfg.DATALOADER.SAMPLER = "softmax_triplet"
    for k, v in opts.items():
        section, key = k.split("__")
        cfg[section][key] = v
    return cfg


def test_make_loss_matches_official_formula():
    torch.manual_seed(0)
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    scores = [torch.randn(6, 3) for _ in range(5)]
    feats = [torch.randn(6, 4) for _ in range(5)]
    cfg = _loss_cfg(MODEL__IF_LABELSMOOTH="on", MODEL__NO_MARGIN=False, SOLVER__MARGIN=0.3,
                    MODEL__ID_LOSS_WEIGHT=0.7, MODEL__TRIPLET_LOSS_WEIGHT=2.0)
    got = make_loss(cfg, 3)(scores, feats, targets)

    def xent_ls(s):  # the official CrossEntropyLabelSmooth, written out
        logp = s.log_softmax(1)
        t = torch.zeros_like(logp).scatter_(1, targets[:, None], 1) * 0.9 + 0.1 / 3
        return (-t * logp).mean(0).sum()

    tri = TripletLoss(0.3)
    id_loss = 0.5 * xent_ls(scores[0]) + 0.5 * sum(xent_ls(s) for s in scores[1:]) / 4
    tri_loss = 0.5 * tri(feats[0], targets)[0] + 0.5 * sum(tri(f, targets)[0] for f in feats[1:]) / 4
    assert got.item() == pytest.approx((0.7 * id_loss + 2.0 * tri_loss).item(), rel=1e-5)
    # Without JPM: a single tensor each; label smoothing off -> plain cross-entropy.
    cfg = _loss_cfg(MODEL__IF_LABELSMOOTH="off", MODEL__NO_MARGIN=True)
    got = make_loss(cfg, 3)(scores[0], feats[0], targets)
    want = F.cross_entropy(scores[0], targets) + TripletLoss(None)(feats[0], targets)[0]
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


# ------------------------------------------------------------------------------ optimiser / schedule


def test_optimizer_groups_and_cosine_warmup_schedule():
    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.OPTIMIZER_NAME", "SGD", "SOLVER.BASE_LR", 0.008, "SOLVER.BIAS_LR_FACTOR", 2,
                         "SOLVER.WEIGHT_DECAY", 1e-4, "SOLVER.WEIGHT_DECAY_BIAS", 0.0, "SOLVER.LARGE_FC_LR", True,
                         "SOLVER.MAX_EPOCHS", 100, "SOLVER.WARMUP_EPOCHS", 5])
    model = torch.nn.ModuleDict({"base": torch.nn.Linear(3, 3), "classifier": torch.nn.Linear(3, 2, bias=False)})
    opt = make_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    by_shape = {tuple(g["params"][0].shape): (g["lr"], g["weight_decay"]) for g in opt.param_groups}
    assert by_shape[(3, 3)] == (0.008, 1e-4)  # weight
    assert by_shape[(3,)] == (0.016, 0.0)  # bias: BIAS_LR_FACTOR, WEIGHT_DECAY_BIAS
    assert by_shape[(2, 3)] == (0.016, 1e-4)  # classifier with LARGE_FC_LR
    sched = create_scheduler(cfg, opt)
    weight_group = next(g for g in opt.param_groups if tuple(g["params"][0].shape) == (3, 3))

    def lr_at(epoch):
        sched.step(epoch)
        return weight_group["lr"]

    base = 0.008
    # Epochs count from 1 and epoch e starts at t = e - 1: epoch 1 is the first warm-up epoch.
    assert lr_at(1) == pytest.approx(0.01 * base)  # warmup_lr_init
    assert lr_at(2) == pytest.approx(0.01 * base + (base - 0.01 * base) / 5)  # linear warmup
    # After warmup, timm's cosine runs over t in [0, MAX_EPOCHS) from BASE_LR down to 0.002 * BASE_LR.
    lr_min = 0.002 * base
    assert lr_at(51) == pytest.approx(lr_min + 0.5 * (base - lr_min) * (1 + math.cos(math.pi * 50 / 100)))
    assert lr_min < lr_at(100) < 0.01 * base  # the last epoch still above lr_min
    for name in ("Adam", "AdamW"):
        cfg.SOLVER.OPTIMIZER_NAME = name
        assert type(make_optimizer(cfg, model)).__name__ == name
    cfg.SOLVER.OPTIMIZER_NAME = "Nope"
    with pytest.raises(ValueError, match="OPTIMIZER_NAME"):
        make_optimizer(cfg, model)


# ------------------------------------------------------------------------------ real training steps


def _frozen_loss(model, batch, loss_fn) -> float:
    """Loss on `batch` in train-mode outputs but deterministic: no dropout/drop path, BN on running stats."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.eval()
    with torch.no_grad():
        score, feat = model(batch.images, cam_label=batch.camids, view_label=batch.viewids)
        return loss_fn(score, feat, batch.pids).item()


def test_training_steps_change_weights_and_reduce_loss(tiny_data, tmp_path, one_thread):
    cfg = tiny_train_cfg(tiny_data, tmp_path / "out", epochs=2)
    dataset = prepare_dataset(cfg)
    cams, views = sie_counts(dataset)
    torch.manual_seed(0)
    model = build_model(cfg, dataset.num_train_pids, cams, views)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    fixed = next(iter(build_train_loader(cfg, dataset)))
    loss_fn = make_loss(cfg, dataset.num_train_pids)
    loss_before = _frozen_loss(model, fixed, loss_fn)
    opt = make_optimizer(cfg, model)
    result = do_train(cfg, model, build_train_loader(cfg, dataset), opt, create_scheduler(cfg, opt), loss_fn,
                      "cpu", tmp_path / "out")
    changed = {k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, initial[k])}
    for key in ("base.patch_embed.proj.weight", "base.sie_embed", "b1.0.attn.qkv.weight", "b2.0.mlp.fc1.weight",
                "classifier.weight", "classifier_4.weight", "bottleneck.weight"):
        assert key in changed, key
    assert _frozen_loss(model, fixed, loss_fn) < loss_before
    assert len(result.history) == 2 and all(math.isfinite(h["loss"]) for h in result.history)
    assert [p.name for p in result.checkpoints] == ["transformer_1.pth", "transformer_2.pth"]


def test_train_writes_official_state_dict_that_loads_strictly(tiny_data, tmp_path, one_thread):
    cfg = tiny_train_cfg(tiny_data, tmp_path / "out", epochs=1)
    result = train(cfg)
    trained = result.model
    assert trained is not None and not trained.reducers  # trained unmerged although MERGE.METHOD is stm
    assert (tmp_path / "out" / "config.yaml").is_file()
    state = torch.load(result.final_checkpoint, map_location="cpu", weights_only=True)
    assert set(state) == set(trained.state_dict())
    assert any(k.startswith("b1.") for k in state) and "bottleneck_4.running_mean" in state
    dataset = prepare_dataset(cfg)
    fresh = build_model(cfg, dataset.num_train_pids, *sie_counts(dataset))
    assert fresh.reducers  # a fresh model from the same config does get STM for inference
    load_transreid_checkpoint(fresh, result.final_checkpoint)  # strict, weights_only=True
    for k, v in trained.state_dict().items():
        assert torch.equal(v.cpu(), fresh.state_dict()[k]), k
    # fp16 storage loads too (load_state_dict casts back to fp32) at half the size.
    half = save_state_dict(trained, tmp_path / "half.pth", half=True)
    load_transreid_checkpoint(fresh, half)
    assert fresh.base.pos_embed.dtype == torch.float32
    assert half.stat().st_size < 0.6 * result.final_checkpoint.stat().st_size


def test_synthetic_dataset_generates_itself_and_real_ones_give_a_clear_error(tmp_path, capsys):
    cfg = get_cfg()
    cfg.DATASETS.NAMES, cfg.DATASETS.ROOT_DIR = "market1501", str(tmp_path)
    from reid_lite.data import DatasetLayoutError

    with pytest.raises(DatasetLayoutError, match="Market1501 not found"):
        prepare_dataset(cfg)
    assert not any(tmp_path.iterdir())  # nothing generated for a real dataset
    # Outside the default location (a mistyped ROOT_DIR?) nothing is generated unless asked for.
    cfg.DATASETS.NAMES = "synthetic"
    with pytest.raises(DatasetLayoutError) as exc:
        prepare_dataset(cfg)
    assert str(exc.value).startswith(f"no synthetic dataset at {tmp_path / 'synthetic'}")
    assert "DATASETS.GENERATE True" in str(exc.value) and not any(tmp_path.iterdir())
    cfg.DATASETS.GENERATE = True
    dataset = prepare_dataset(cfg)
    assert (tmp_path / "synthetic" / "_COMPLETE").is_file() and dataset.num_train_pids == 60
    # ... and not silently: it says where and how much, with a progress bar.
    err = capsys.readouterr().err
    assert f"generating the synthetic dataset {tmp_path / 'synthetic'}" in err and "generating synthetic" in err
    cfg.DATASETS.GENERATE = False  # a finished folder is read wherever it is
    assert prepare_dataset(cfg).num_train_pids == 60


def test_train_cli_missing_dataset_exits_2(tmp_path, capsys):
    cli = load_tool("train")
    code = cli.main(["--config", str(REPO / "configs" / "demo_synthetic.yml"), "DATASETS.NAMES", "msmt17",
                 "DATASETS.ROOT_DIR", str(tmp_path), "OUTPUT_DIR", str(tmp_path / "out")])
    assert code == 2
    assert "MSMT17" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the demo checkpoint


def test_demo_checkpoint_loads_strictly_into_demo_model():
    weights = REPO / "weights" / "demo_synthetic.pth"
    if not weights.is_file():
        pytest.skip("weights/demo_synthetic.pth not present")
    cfg = load_cfg(REPO / "configs" / "demo_synthetic.yml")
    assert cfg.TEST.WEIGHT == "weights/demo_synthetic.pth"
    # The synthetic default dataset has 60 training identities over 6 cameras.
    model = build_model(cfg, 60, 6, 0)
    load_transreid_checkpoint(model, weights)  # strict, weights_only=True
    assert weights.stat().st_size < 7 * 2**20
    assert model.base.patch_embed.num_patches == 210 and len(model.reducible_blocks) >= 10
    assert model.reducers  # the demo config attaches STM for inference
