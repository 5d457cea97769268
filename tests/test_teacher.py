"""Distillation from a teacher model (MODEL.TEACHER), the validation split and bootstrap intervals."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_train_cfg
from PIL import Image

from reid_lite.data import build_dataset, validation_split
from reid_lite.engine.teacher import Distillation, TeacherModel, similarity_distillation, teacher_targets
from reid_lite.engine.trainer import TEACHER_TARGETS_FILE, check_training_cfg, train
from reid_lite.metrics import bootstrap_draws, evaluate_rank, metric_intervals, paired_difference, per_query_metrics

SHARED_TEACHER = Path(__file__).resolve().parents[2] / "shared" / "data" / "teacher"


class _MeanColour(torch.nn.Module):
    """A 'teacher' whose embedding is the mean colour of the top and bottom half: easy to check by hand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2] // 2
        return torch.cat([x[:, :, :h].mean((2, 3)), x[:, :, h:].mean((2, 3))], dim=1)


@pytest.fixture
def onnx_teacher(tmp_path) -> Path:
    path = tmp_path / "teacher.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices: a small static graph
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(_MeanColour(), (torch.zeros(1, 3, 32, 16),), str(path), input_names=["image"],
                          output_names=["embedding"], dynamic_axes={"image": {0: "n"}}, dynamo=False)
    return path


def _image(path: Path, top: tuple[int, int, int], bottom: tuple[int, int, int]) -> str:
    arr = np.zeros((40, 20, 3), np.uint8)
    arr[:20], arr[20:] = top, bottom
    Image.fromarray(arr).save(path)
    return str(path)


def test_onnx_teacher_reads_its_input_format_and_normalises(tmp_path, onnx_teacher):
    a = _image(tmp_path / "a.png", (255, 0, 0), (0, 0, 255))
    teacher = TeacherModel(onnx_teacher, "bgr255")
    assert teacher.size == (32, 16)  # from the file
    feats = teacher([Image.open(a)])
    # BGR order: the red top half is channel 2, the blue bottom half channel 0.
    expected = torch.nn.functional.normalize(torch.tensor([[0.0, 0, 255, 255, 0, 0]]), dim=1)
    assert torch.allclose(feats, expected, atol=1e-2)  # the resize blends the rows at the colour boundary
    rgb = TeacherModel(onnx_teacher, "rgb01")([Image.open(a)])
    assert torch.allclose(rgb, torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0, 0, 0, 1]]), dim=1), atol=1e-2)


def test_teacher_targets_one_row_per_record_and_bad_files_refused(tmp_path, onnx_teacher):
    paths = [_image(tmp_path / f"{i}.png", (i * 40, 0, 0), (0, i * 40, 0)) for i in range(1, 4)]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    records = [(p, 0, 0, 0) for p in paths] + [(str(broken), 0, 0, 0)]
    targets = teacher_targets(TeacherModel(onnx_teacher), records, batch_size=2)
    assert targets.shape == (4, 6)
    assert torch.allclose(targets[:3].norm(dim=1), torch.ones(3)) and targets[3].abs().sum() == 0
    with pytest.raises(ValueError, match="no such file"):
        TeacherModel(tmp_path / "absent.onnx")
    with pytest.raises(ValueError, match=r"\.xml\) or an ONNX"):
        TeacherModel(broken)
    with pytest.raises(ValueError, match="TEACHER_INPUT"):
        TeacherModel(onnx_teacher, "yuv")


@pytest.mark.skipif(not SHARED_TEACHER.is_dir(), reason="the shared teacher folder is absent")
def test_openvino_teacher_separates_people(tmp_path):
    """The real teacher (OpenVINO IR) embeds two crops of one person closer than crops of two people."""
    teacher = TeacherModel(SHARED_TEACHER / "person-reidentification-retail-0277.xml")
    assert teacher.size == (256, 128)
    root = SHARED_TEACHER.parent / "cuhk03" / "bounding_box_train"
    first = sorted(root.glob("0001_*.jpg"))
    other = sorted(root.glob("0002_*.jpg"))
    feats = teacher([Image.open(p) for p in (first[0], first[-1], other[0])])
    sims = feats @ feats.T
    assert feats.shape == (3, 256) and sims[0, 1] > sims[0, 2]


def test_similarity_distillation_is_zero_when_the_student_copies_the_teacher():
    g = torch.Generator().manual_seed(0)
    targets = torch.nn.functional.normalize(torch.randn(10, 6, generator=g), dim=1)
    loss = similarity_distillation(targets, weight=2.0)
    idx = torch.tensor([3, 1, 7, 0])
    assert loss(targets[idx] * 5.0, idx).item() == pytest.approx(0.0, abs=1e-6)  # scale-free (cosine)
    student = torch.randn(4, 9, generator=g, requires_grad=True)  # another width: no projection needed
    value = loss([student, torch.zeros(4, 9)], idx)  # JPM's list: the global feature is used
    s = torch.nn.functional.normalize(student, dim=1)
    t = targets[idx]
    off = ~torch.eye(4, dtype=torch.bool)
    assert value.item() == pytest.approx(2.0 * ((s @ s.T - t @ t.T)[off] ** 2).mean().item(), rel=1e-5)
    value.backward()
    assert student.grad.abs().sum() > 0


def test_feature_distillation_trains_its_projection_towards_the_teacher():
    g = torch.Generator().manual_seed(1)
    targets = torch.nn.functional.normalize(torch.randn(16, 6, generator=g), dim=1)
    student = torch.randn(8, 10, generator=g)  # fixed student features; only the projection learns
    distill = Distillation(targets, 10, weight=1.0, kind="feature")
    idx = torch.arange(8)
    first = distill(student, idx).item()
    opt = torch.optim.Adam(distill.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        distill(student, idx).backward()
        opt.step()
    assert first > 0.5 and distill(student, idx).item() < 0.05  # 8 features of width 10 map onto their targets exactly
    both = Distillation(targets, 10, weight=2.0, kind="both")
    both.projection.load_state_dict(distill.projection.state_dict())
    expected = 2.0 * (similarity_distillation(targets)(student, idx) + distill(student, idx))
    assert both(student, idx).item() == pytest.approx(expected.item(), rel=1e-5)
    assert "targets" not in both.state_dict()  # the teacher's table is rebuilt, never saved
    with pytest.raises(ValueError, match="TEACHER_LOSS"):
        Distillation(targets, 10, kind="l2")


def test_training_with_a_teacher_adds_its_loss_and_caches_its_targets(tiny_data, tmp_path, onnx_teacher, one_thread):
    cfg = tiny_train_cfg(tiny_data, tmp_path / "out", 2, "MODEL.TEACHER", str(onnx_teacher),
                         "MODEL.TEACHER_INPUT", "rgb01", "MODEL.TEACHER_WEIGHT", 5.0, "MODEL.TEACHER_LOSS", "both",
                         "MERGE.METHOD", "none")
    check_training_cfg(cfg)
    result = train(cfg, evaluate=False, tensorboard=False)
    cache = torch.load(tmp_path / "out" / TEACHER_TARGETS_FILE, weights_only=True)
    assert cache["targets"].shape[1] == 6 and len(cache["paths"]) == cache["targets"].shape[0]
    assert len(result.history) == 2 and all(np.isfinite(h["loss"]) for h in result.history)
    state = torch.load(tmp_path / "out" / "last_checkpoint.pth", weights_only=True)
    assert state["distill"]["projection.weight"].shape == (6, 32)  # the projection resumes with the run
    assert not any("projection" in k for k in result.model.state_dict())  # and never enters the model
    # Same seed without the teacher: the first step is identical but for the (non-negative) distillation term.
    plain = train(tiny_train_cfg(tiny_data, tmp_path / "plain", 1, "MERGE.METHOD", "none"), evaluate=False,
                  tensorboard=False)
    assert result.history[0]["loss"] > plain.history[0]["loss"]
    bad = tiny_train_cfg(tiny_data, tmp_path / "bad", 1, "MODEL.TEACHER", str(tmp_path / "nope.onnx"))
    with pytest.raises(ValueError, match="MODEL.TEACHER: no such file"):
        check_training_cfg(bad)


def test_validation_split_holds_out_identities_seen_by_two_cameras(tiny_data):
    data = build_dataset("market1501", root=tiny_data / "synthetic")
    split = validation_split(data, 3, seed=0)
    held = {r[1] for r in split.query}
    assert len(held) == 3 and held == {r[1] for r in split.gallery}
    assert split.num_train_pids == data.num_train_pids - 3
    assert sorted({r[1] for r in split.train}) == list(range(split.num_train_pids))  # relabelled 0..P-1
    train_paths = {r[0] for r in split.train}
    assert not train_paths & {r[0] for r in split.query + split.gallery}
    for q in split.query:  # queries come from each identity's lowest camera; its gallery from the others
        assert all(g[2] != q[2] for g in split.gallery if g[1] == q[1])
    assert split.test_query == data.query and split.test_gallery == data.gallery
    assert {r[1] for r in validation_split(data, 3, seed=0).query} == held  # seeded
    with pytest.raises(ValueError, match="two"):
        validation_split(data, data.num_train_pids, seed=0)


def test_bootstrap_intervals_and_paired_differences():
    rng = np.random.default_rng(1)
    q, g = rng.normal(size=(60, 16)).astype(np.float32), rng.normal(size=(90, 16)).astype(np.float32)
    qp, gp = rng.integers(0, 12, 60), rng.integers(0, 12, 90)
    qc, gc = np.zeros(60, int), rng.integers(0, 3, 90)
    per_q = per_query_metrics(q, g, qp, gp, qc, gc)
    dist = ((q[:, None] - g[None]) ** 2).sum(-1)
    cmc, mAP, mINP = evaluate_rank(dist, qp, gp, qc, gc)
    assert per_q["rank1"].mean() == pytest.approx(cmc[0]) and per_q["mAP"].mean() == pytest.approx(mAP)
    assert per_q["mINP"].mean() == pytest.approx(mINP)
    draws = bootstrap_draws(len(per_q["rank1"]), 500, seed=0)
    ci = metric_intervals(per_q, draws)
    assert ci["mAP_ci95"][0] < ci["mAP"] < ci["mAP_ci95"][1]
    # A method better on every query by 0.1 AP: the paired interval is exactly 0.1 wide of nothing.
    better = {k: v + 0.1 for k, v in per_q.items()}
    diff = paired_difference(better, per_q, draws)
    assert diff["mAP"]["diff"] == pytest.approx(0.1) and diff["mAP"]["ci95"] == pytest.approx([0.1, 0.1])
    assert diff["mAP"]["significant"]
    # Pairing removes what two methods share: unpaired intervals of the two overlap, the paired one does not.
    noisy = {k: v + rng.normal(0, 0.01, len(v)) + 0.02 for k, v in per_q.items()}
    other = metric_intervals(noisy, draws)
    assert other["mAP_ci95"][0] < ci["mAP_ci95"][1]
    assert paired_difference(noisy, per_q, draws)["mAP"]["significant"]
    with pytest.raises(ValueError, match="share their queries"):
        paired_difference({k: v[:-1] for k, v in per_q.items()}, per_q, draws)
