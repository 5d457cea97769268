"""Training at scale: bit-identical resume, torchrun/DDP equals one process, strict reloads, config key policy."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_tool, tiny_train_cfg

from reid_lite.build import build_model
from reid_lite.config import get_cfg
from reid_lite.data import ImageDataset, TrainBatchSampler, build_dataset, build_transforms
from reid_lite.engine.lr_scheduler import create_scheduler
from reid_lite.engine.train_state import STATE_FILE, load_train_state
from reid_lite.engine.trainer import check_training_cfg, prepare_dataset, sie_counts, train
from reid_lite.models import load_transreid_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _without(rows, *keys):
    """Rows minus wall-clock fields, which legitimately differ between runs."""
    return [{k: v for k, v in r.items() if k not in keys} for r in rows]


# ------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("amp", ["fp32", "fp16"])  # fp16: the GradScaler's state must round-trip too
def test_resume_continues_bit_identically(tiny_data, tmp_path, one_thread, amp):
    # Drop path and random erasing on: the model's and the augmentations' random streams both matter.
    opts = ("MODEL.DROP_PATH", 0.1, "INPUT.RE_PROB", 0.5, "SOLVER.EVAL_PERIOD", 1, "SOLVER.WARMUP_EPOCHS", 1,
            "SOLVER.AMP", amp)
    whole = train(tiny_train_cfg(tiny_data, tmp_path / "whole", 2, *opts))
    cfg = tiny_train_cfg(tiny_data, tmp_path / "parts", 2, *opts)
    first = train(cfg, stop_after_steps=3)  # stops inside epoch 1
    assert first.stopped and first.global_step == 3
    second = train(cfg, resume=True, stop_after_steps=3)  # crosses the epoch boundary, evaluation included
    assert second.stopped and second.global_step == 6 and len(second.history) == 1
    third = train(cfg, resume=True)
    assert not third.stopped and third.global_step == whole.global_step
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, third.model.state_dict()[key]), key
    assert _without(third.history, "seconds") == _without(whole.history, "seconds")
    assert _without(third.evals, "images_per_second") == _without(whole.evals, "images_per_second")
    a = load_train_state(tmp_path / "whole" / STATE_FILE)
    b = load_train_state(tmp_path / "parts" / STATE_FILE)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"]) and a["scaler"] == b["scaler"]
    assert (a["scaler"] != {}) == (amp == "fp16")
    # A different seed really changes the run (so the equality above is not vacuous).
    other = train(tiny_train_cfg(tiny_data, tmp_path / "other", 1, *opts, "SOLVER.SEED", 7), evaluate=False)
    assert not torch.equal(other.model.classifier.weight, whole.model.classifier.weight)


def test_checkpoints_reload_strictly_with_weights_only(tiny_data, tmp_path, one_thread):
    out = tmp_path / "out"
    cfg = tiny_train_cfg(tiny_data, out, 2, "SOLVER.EVAL_PERIOD", 1, "SOLVER.CHECKPOINT_PERIOD", 2)
    result = train(cfg)
    assert [p.name for p in result.checkpoints] == ["transformer_2.pth"]  # CHECKPOINT_PERIOD honoured
    assert [e["epoch"] for e in result.evals] == [1, 2] and result.best is not None
    assert result.best["mAP"] == max(e["mAP"] for e in result.evals)
    dataset = prepare_dataset(cfg)
    for name in ("transformer_2.pth", "transformer_best.pth"):
        fresh = build_model(cfg, dataset.num_train_pids, *sie_counts(dataset))
        load_transreid_checkpoint(fresh, out / name)  # strict, weights_only=True
    state = torch.load(out / STATE_FILE, map_location="cpu", weights_only=True)
    fresh = build_model(cfg, dataset.num_train_pids, *sie_counts(dataset))
    fresh.load_state_dict(state["model"], strict=True)
    for key, value in result.model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    assert state["epoch"] == 3 and state["batch"] == 0  # after the last epoch: nothing left to do
    assert any((out / "tensorboard").iterdir())
    # A finished run resumes to a no-op; a file that is not a training state is refused by name.
    again = train(cfg, resume=True)
    assert again.global_step == result.global_step and len(again.history) == 2
    (out / STATE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot resume from .*last_checkpoint.pth"):
        train(cfg, resume=True)


def test_resume_refuses_another_architecture_and_other_training_settings(tiny_data, tmp_path, one_thread, capsys):
    """Another architecture: one line naming the key, always. Another batch size or learning rate: refused
    unless --resume-force (then logged). A state without a saved config is checked by its parameter shapes."""
    out = tmp_path / "run"
    first = train(tiny_train_cfg(tiny_data, out, 2), stop_after_steps=1, evaluate=False)
    assert first.stopped
    with pytest.raises(ValueError, match=r"another architecture: MODEL.DEPTH 4 \(saved 3\)"):
        train(tiny_train_cfg(tiny_data, out, 2, "MODEL.DEPTH", 4), resume=True, evaluate=False)
    tool = load_tool("train")
    base = ["--no-progress", "--no-eval", "--no-tensorboard", "--resume"]
    cfg_file = tmp_path / "tiny.yml"
    cfg_file.write_text(tiny_train_cfg(tiny_data, out, 2).dump())
    assert tool.main(["--config", str(cfg_file), *base, "MODEL.EMBED_DIM", "64"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and "another architecture: MODEL.EMBED_DIM 64 (saved 32)" in err[0], err
    for key, value, saved in (("SOLVER.IMS_PER_BATCH", "16", "8"), ("SOLVER.BASE_LR", "0.01", "0.001")):
        assert tool.main(["--config", str(cfg_file), *base, key, value]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
        assert len(err) == 1 and f"other training settings: {key} " in err[0] and f"(saved {saved})" in err[0], err
        assert "--resume-force" in err[0]
    # Forced: the run continues with the new learning rate, and says so.
    forced = train(tiny_train_cfg(tiny_data, out, 2, "SOLVER.BASE_LR", 0.002), resume=True, resume_force=True,
                   evaluate=False, stop_after_steps=1)
    assert forced.global_step == 2
    # An older state without its config: the parameter shapes still tell another model apart.
    state = load_train_state(out / STATE_FILE)
    del state["config"]
    torch.save(state, out / STATE_FILE)
    with pytest.raises(ValueError, match=r"its model does not fit this config's .*shape\(s\) differ"):
        train(tiny_train_cfg(tiny_data, out, 2, "MODEL.EMBED_DIM", 64), resume=True, evaluate=False)


def test_train_refuses_an_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert load_tool("train").main(["OUTPUT_DIR", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.strip() == f"error: OUTPUT_DIR {tmp_path / 'file'} is a file, not a folder"


# ------------------------------------------------------------------------------ sampler / augmentation


def test_global_batches_are_split_over_processes_with_per_sample_seeds(tiny_data):
    ds = build_dataset("market1501", root=tiny_data / "synthetic")
    one = TrainBatchSampler(ds.train, 8, 2, seed=5)
    two = [TrainBatchSampler(ds.train, 8, 2, seed=5, rank=r, world_size=2) for r in range(2)]
    for epoch in (1, 2):
        for s in (one, *two):
            s.set_epoch(epoch)
        whole = list(one)
        halves = [list(s) for s in two]
        assert len(whole) == one.batches_in_epoch() >= 3
        assert [a + b for a, b in zip(*halves)] == whole  # same global batches, same seeds
        pids = [[ds.train[i][1] for i, _ in batch] for batch in whole]
        assert all(len(set(p)) == 4 and all(p.count(x) == 2 for x in p) for p in pids)  # P x K
    one.set_epoch(2, start_batch=2)
    assert list(one) == whole[2:] and len(one) == len(whole) - 2
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        TrainBatchSampler(ds.train, 8, 2, seed=5, rank=0, world_size=3)
    # A sample's augmentation depends on its seed only, and leaves the global random streams alone.
    cfg = get_cfg()
    cfg.merge_from_list(["INPUT.SIZE_TRAIN", [64, 32], "INPUT.RE_PROB", 0.5])
    data = ImageDataset(ds.train, build_transforms(cfg, is_train=True))
    torch.manual_seed(0)
    random.seed(0)
    before = (torch.get_rng_state(), random.getstate())
    a, b, c = data[(3, 11)].image, data[(3, 11)].image, data[(3, 12)].image
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]


# ------------------------------------------------------------------------------ multi-process


def test_torchrun_two_gloo_processes_match_one_process(tiny_data, tmp_path, one_thread):
    # SGD: Adam divides each gradient by its own running scale, so the last-bit differences of a two-process
    # reduction become lr-sized steps on parameters whose gradients are ~0 (a one-epoch run now trains at the
    # full lr; it used to run at lr_min, which hid this). SGD keeps them proportional to the gradient.
    cfg = tiny_train_cfg(tiny_data, tmp_path / "one", 1, "SOLVER.EVAL_PERIOD", 1, "MERGE.METHOD", "none",
                         "SOLVER.OPTIMIZER_NAME", "SGD", "SOLVER.BASE_LR", 0.05)
    single = train(cfg, save_features=True, tensorboard=False)
    assert single.global_step >= 3
    # yacs re-reads a dumped '0' as the int 0, which its own type check then refuses: leave DEVICE_ID out.
    (tmp_path / "cfg.yml").write_text("\n".join(x for x in cfg.dump().splitlines() if "DEVICE_ID" not in x))
    overrides = ["--config", str(tmp_path / "cfg.yml"), "OUTPUT_DIR", str(tmp_path / "two")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tools" / "train.py"), "--threads", "1", "--no-progress", "--no-tensorboard", "--save-features",
           *overrides]
    # Own session: on a timeout the whole group (torchrun and its workers) is killed, not only torchrun.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun timed out: {err[-3000:]}")
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    assert "process 0 of 2" in out
    two = torch.load(tmp_path / "two" / "transformer_1.pth", map_location="cpu", weights_only=True)
    for key, value in single.model.state_dict().items():
        assert torch.allclose(value.float(), two[key].float(), atol=1e-4, rtol=1e-4), key
    f1 = torch.load(tmp_path / "one" / "features_1.pt", weights_only=True)
    f2 = torch.load(tmp_path / "two" / "features_1.pt", weights_only=True)
    assert f1["gallery_feats"].shape[0] == 16 and f1["query_feats"].shape[0] == 4
    for key in f1:
        assert torch.allclose(f1[key].float(), f2[key].float(), atol=1e-4), key
    # The features are those of the trained weights, not of the initialisation.
    fresh = build_model(cfg, 8, 3, 0)
    assert not torch.allclose(fresh.classifier.weight, single.model.classifier.weight, atol=1e-3)


# ------------------------------------------------------------------------------ merging, AMP


def test_training_with_merging_on_reduces_tokens_and_learns(tiny_data, tmp_path, one_thread):
    cfg = tiny_train_cfg(tiny_data, tmp_path / "out", 1, "SOLVER.TRAIN_WITH_MERGING", True, "MERGE.METHOD", "tome",
                         "SOLVER.AMP", "bf16")
    result = train(cfg, evaluate=False)
    assert result.model.reducers  # trained with ToMe attached
    assert all(math.isfinite(h["loss"]) for h in result.history) and result.global_step >= 3


# ------------------------------------------------------------------------------ config keys


@pytest.mark.parametrize("opts, match", [
    (["MODEL.IF_WITH_CENTER", "yes"], "center loss"),
    (["SOLVER.CENTER_LOSS_WEIGHT", 0.1], "CENTER_LOSS_WEIGHT"),
    (["MODEL.ID_LOSS_TYPE", "arcface"], "ID_LOSS_TYPE"),
    (["MODEL.COS_LAYER", True], "COS_LAYER"),
    (["SOLVER.COSINE_SCALE", 64], "COSINE_SCALE"),
    (["MODEL.METRIC_LOSS_TYPE", "center"], "METRIC_LOSS_TYPE"),
    (["MODEL.NECK", "no"], "MODEL.NECK"),
    (["MODEL.LAST_STRIDE", 2], "LAST_STRIDE"),
    (["SOLVER.STEPS", (30, 60)], "multistep"),
    (["SOLVER.GAMMA", 0.5], "multistep"),
    (["SOLVER.SCHEDULER", "poly"], "SCHEDULER"),
    (["SOLVER.WARMUP_METHOD", "exp"], "WARMUP_METHOD"),
    (["SOLVER.AMP", "fp8"], "SOLVER.AMP"),
    (["MODEL.DIST_TRAIN", True], "torchrun"),
    (["MODEL.DEVICE_ID", "'0,1'"], "torchrun"),
])
def test_unsupported_official_keys_are_refused_by_name(opts, match, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = get_cfg()
    cfg.merge_from_list(opts)
    with pytest.raises(ValueError, match=match):
        check_training_cfg(cfg)


def test_multistep_and_constant_warmup_schedules():
    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.SCHEDULER", "multistep", "SOLVER.STEPS", (4, 8), "SOLVER.GAMMA", 0.5,
                         "SOLVER.WARMUP_EPOCHS", 2, "SOLVER.WARMUP_FACTOR", 0.1, "SOLVER.WARMUP_METHOD", "linear",
                         "SOLVER.BASE_LR", 1.0, "SOLVER.MAX_EPOCHS", 10])
    check_training_cfg(cfg)  # STEPS/GAMMA are legitimate with multistep
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = create_scheduler(cfg, opt)
    assert [round(sched.lr_at(e)[0], 6) for e in (0, 1, 2, 3, 4, 7, 8, 9)] == [0.1, 0.55, 1, 1, 0.5, 0.5, 0.25, 0.25]
    cfg.SOLVER.WARMUP_METHOD = "constant"
    assert [create_scheduler(cfg, opt).lr_at(e)[0] for e in (0, 1, 2)] == [0.1, 0.1, 1.0]
    cfg.SOLVER.SCHEDULER = "cosine"
    cfg.SOLVER.STEPS, cfg.SOLVER.GAMMA = (40, 70), 0.1
    sched = create_scheduler(cfg, opt)
    assert sched.lr_at(1)[0] == pytest.approx(0.1)  # constant warm-up at WARMUP_FACTOR * BASE_LR
    assert sched.lr_at(5)[0] == pytest.approx(0.002 + 0.5 * 0.998 * (1 + math.cos(math.pi * 5 / 10)))
    sched.step(6)  # epoch 6 starts at t = 5
    assert opt.param_groups[0]["lr"] == sched.lr_at(5)[0] and sched.state_dict() == {"last_epoch": 6}


def test_one_warmup_epoch_ramps_per_step_and_the_last_epoch_is_above_lr_min():
    """WARMUP_EPOCHS 1 warms up (epochs count from 1), linearly over the first epoch's steps, and a short
    cosine schedule does not spend its last epoch at lr_min."""
    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.WARMUP_EPOCHS", 1, "SOLVER.WARMUP_FACTOR", 0.01, "SOLVER.BASE_LR", 1.0,
                         "SOLVER.MAX_EPOCHS", 4])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = create_scheduler(cfg, opt)
    assert sched.in_warmup(1) and not sched.in_warmup(2)
    seen = []
    for i in range(4):
        sched.step_within(1, i / 4)
        seen.append(opt.param_groups[0]["lr"])
    assert seen == pytest.approx([0.01, 0.01 + 0.99 / 4, 0.01 + 0.99 / 2, 0.01 + 0.99 * 3 / 4])
    sched.step(2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.002 + 0.5 * 0.998 * (1 + math.cos(math.pi / 4)))
    sched.step(4)
    assert opt.param_groups[0]["lr"] > 0.1  # cos(3 pi / 4): about 0.15, not lr_min (0.002)


# ------------------------------------------------------------------------------ reference experiment




def test_reference_experiment_tiny_writes_json_and_png(tmp_path, one_thread):
    from reid_lite.data.synthetic import generate_reid_dataset
    from reid_lite.merging import method_names

    # Generated crops in the Market-1501 layout stand in for CUHK03, so that this never skips.
    root = generate_reid_dataset(tmp_path / "data", num_train_ids=12, num_test_ids=6, num_cameras=2,
                                 images_per_id_per_camera=2, size=(128, 64), num_distractors=2, progress=False)
    tool = load_tool("reference_experiment")
    out = tmp_path / "ref"
    code = tool.main(["--tiny", "--data-root", str(root), "--output", str(out), "--bootstrap", "50",
                      "SOLVER.IMS_PER_BATCH", "8"])
    assert code == 0
    text = (out / "results.json").read_text()
    assert str(tmp_path) not in text and "<data-root>" in text  # shareable: no folder of this machine
    results = json.loads(text)
    assert results["seed"] == 1234 and results["commit"] and results["preset"] == "tiny"
    assert results["num_validation_ids"] == 3 and results["num_train_ids"] == 9  # validation held out of training
    assert results["train_seconds"] > 0 and results["dtem_train_seconds"] > 0
    rows = results["rows"]
    assert {r["method"] for r in rows} == set(method_names())  # every registered method
    base = results["unmerged_gflops"]
    none = next(r for r in rows if r["method"] == "none")
    assert none["gflops"] == pytest.approx(base) and none["budget_ratio"] is None
    for row in rows:
        if "error" in row:  # a budget the tiny model cannot meet is reported, never silently dropped
            assert row["budget_ratio"] == 0.76 and "GFLOPs" in row["error"], row
            continue
        assert {"rank1", "mAP", "mINP", "gflops", "images_per_second"} <= set(row)
        for key in ("rank1", "mAP"):  # the interval brackets the point estimate
            lo, hi = row[f"{key}_ci95"]
            assert 0 <= lo <= row[key] <= hi <= 1, (row["method"], key)
        if row["method"] != "none":  # matched budgets: within 3% of 0.76 x the unmerged GFLOPs
            cost = row["effective_gflops"] or row["gflops"]
            assert row["matched"] and cost == pytest.approx(0.76 * base, rel=0.03), row["method"]
            assert row["vs_none"]["mAP"]["ci95"][0] <= row["vs_none"]["mAP"]["diff"] <= row["vs_none"]["mAP"]["ci95"][1]
            assert "vs_tome" in row
    assert sum("error" not in r for r in rows) >= 6
    tome = next(r for r in rows if r["method"] == "tome")
    assert tome["vs_tome"]["rank1"] == {"diff": 0.0, "ci95": [0.0, 0.0], "significant": False}
    ablation = results["stm_ablation"]
    assert len(ablation) == len(tool.STM_ABLATION) and ablation[0]["vs_default"]["mAP"]["diff"] == 0.0
    assert {c["method"] for c in results["calibration"]} == {"none", "stm"}
    # What ToMe and STM-ReID merge, per merging block, on the same test crops at the same budget.
    diagnosed = {d["variant"]: d for d in results["merge_diagnostics"]}
    assert set(diagnosed) == {label for label, _, _ in tool.DIAGNOSED}
    for d in diagnosed.values():
        assert d["blocks"] and -1 <= d["feature_cosine"]["p05"] <= d["feature_cosine"]["mean"] <= 1 + 1e-6
        for stats in d["blocks"].values():
            assert stats["tokens_out"] < stats["tokens_in"] and 0 < stats["merged_fraction"] <= 1
    assert "pr_decades" in next(iter(diagnosed["stm"]["blocks"].values()))
    for name in ("accuracy_vs_gflops.png",):
        png = (out / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "Rank-1 [95% CI]" in (out / "summary.md").read_text()
    assert (out / "train" / "transformer_1.pth").is_file()
    # The training stage is reused by a second run (only MERGE/TEST may differ); the evaluation runs again.
    assert tool.main(["--tiny", "--data-root", str(root), "--output", str(out), "--stage", "evaluate",
                      "--methods", "none,tome", "--no-ablation", "--bootstrap", "20", "SOLVER.IMS_PER_BATCH", "8"]) == 0
    assert json.loads((out / "results.json").read_text())["train_seconds"] == results["train_seconds"]
    # Without the dataset: a clear error, exit code 2, nothing trained.
    assert tool.main(["--tiny", "--data-root", str(tmp_path / "absent"), "--output", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_shipped_configs_pass_the_key_policy_and_the_cli_refuses_by_name(tmp_path, capsys, monkeypatch):
    from reid_lite.config import load_cfg

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for path in sorted((REPO / "configs").glob("*.yml")):
        check_training_cfg(load_cfg(path))
    cli = load_tool("train")
    code = cli.main(["--config", str(REPO / "configs" / "demo_synthetic.yml"), "MODEL.NECK", "no",
                     "OUTPUT_DIR", str(tmp_path / "out")])
    assert code == 2 and "MODEL.NECK" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was prepared or written
