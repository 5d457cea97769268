"""Deployment: exportable merge ops, ONNX export with parity on ONNX Runtime and OpenVINO, backends.

Exports are the slow part (the exporter traces the graph with a symbolic batch, then decomposes and
optimises it: seconds for the tiny model; for the 12-block demo model 8-10 s without merging or with
EViT's three blocks, about 35 s for ToMe's ten and 80 s for STM's ten on two busy cores), so each
(model, method) is exported once per module, at a batch of 2 with the batch dimension dynamic, and
shared by the tests that need it; parity runs on 12 images.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_cfg

from reid_lite import build_model, load_cfg
from reid_lite.compress.flops import effective_gflops
from reid_lite.data.synthetic_batch import synthetic_test_batch
from reid_lite.deploy import (
    DeployError,
    ExportError,
    ExportRefused,
    compare_features,
    export_onnx,
    load_runtime_model,
    open_runtime,
    read_metadata,
)
from reid_lite.merging import MergeMethod, TokenReducer, register_method, unregister_method
from reid_lite.merging.exportable import (
    group_first,
    grouped_max,
    inverse_permutation,
    split_ranked,
    stable_argsort,
    stable_rank,
    stable_ranks,
)
from reid_lite.models import load_transreid_checkpoint

METHODS = ["none", "tome", "stm", "evit"]
# The methods with data-dependent groups, exported on the tiny model only: ATM with thresholds low enough to
# merge on a random model, a size-distinctive split in block 2 and MIN_R forcing some merges out of the
# sequence (every path of its selection); LoTM and DHTM in both blocks.
TINY_ONLY = {
    "atm": {"ATM__ALPHA": 0.5, "ATM__THETA_MIN": 0.5, "ATM__SPLIT_DEPTH": 1, "ATM__MIN_R": 2},
    "lotm": {"LOTM__LAYERS": [1, 2], "LOTM__K": 8},
    "dhtm": {"DHTM__LAYERS": [1, 2], "DHTM__K": 8},
}
DEMO = "configs/demo_synthetic.yml"


# ----------------------------------------------------------------------------- exportable ops


def test_the_exported_rank_sort_is_argsort_stable_including_ties():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (6, 40), generator=g).float()  # many exact ties
    x[0] = torch.randn(40, generator=g)
    for descending in (False, True):
        want = torch.argsort(x, dim=-1, descending=descending, stable=True)
        assert torch.equal(inverse_permutation(stable_rank(x, descending)), want)
        assert torch.equal(stable_argsort(x, descending), want)


@pytest.mark.parametrize("method", ["stm", *TINY_ONLY])
def test_the_exported_formulation_gives_the_eager_features_bit_for_bit(images, cams, monkeypatch, method):
    """What the exporter traces (rank-count sorts, as in STM's grouping and every bipartite match, grouped
    firsts as in DHTM's trees) computes exactly what eager PyTorch does."""
    _, model = _tiny(method)
    for reducer in model.reducers.values():
        # Eager ATM cuts each block to the batch's valid tokens (SHRINK); traced, it keeps the capacity, which
        # agrees to float rounding only (tests/test_backends.py). Bit for bit here: the same (static) shapes.
        if hasattr(reducer, "shrink"):
            reducer.shrink = False
    with torch.no_grad():
        eager = model(images, cam_label=cams)
        monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
        traced_way = model(images, cam_label=cams)
    assert torch.equal(eager, traced_way)


def test_split_ranked_is_topk_then_the_rest_in_index_order():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 7, (4, 25), generator=g).float()
    order = torch.argsort(x, dim=-1, descending=True, stable=True)
    first, rest = split_ranked(stable_rank(x, descending=True), 9)
    assert torch.equal(first, order[:, :9])
    assert torch.equal(rest, order[:, 9:].sort(dim=-1).values)


def test_stable_ranks_and_group_first_trace_to_the_eager_results(monkeypatch):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 4, (3, 30), generator=g).float()  # ties
    groups = torch.randint(0, 30, (3, 30), generator=g)
    eager = stable_ranks(x, descending=True), group_first(groups)
    assert torch.equal(eager[0], inverse_permutation(torch.argsort(x, dim=-1, descending=True, stable=True)))
    rows = groups.tolist()
    want_first = torch.tensor([[min(j for j in range(30) if row[j] == row[i]) for i in range(30)] for row in rows])
    assert torch.equal(eager[1], want_first)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert torch.equal(stable_ranks(x, descending=True), eager[0])
    assert torch.equal(group_first(groups), eager[1])


def test_grouped_max_equals_scatter_amax_then_gather():
    g = torch.Generator().manual_seed(2)
    values = torch.rand(3, 8, generator=g)
    groups = torch.randint(0, 4, (3, 8), generator=g)
    want = torch.zeros(3, 4).scatter_reduce(1, groups, values, reduce="amax", include_self=False).gather(1, groups)
    assert torch.equal(grouped_max(values, groups), want)


# ----------------------------------------------------------------------------- exports

def _tiny(method: str):
    # STM and the TINY_ONLY methods merge in two blocks (sizes from the first feed the second); the others
    # in one, to keep the exports (the slow part) short.
    depth = 3 if method == "stm" or method in TINY_ONLY else 2
    cfg = tiny_cfg(depth=depth, METHOD=method, R=8, EVIT__LAYERS=list(range(1, depth)), DTEM__FRESH=True,
                   **TINY_ONLY.get(method, {}))
    torch.manual_seed(0)
    return cfg, build_model(cfg, 10, 3, 0).eval()


def _demo(method: str):
    cfg = load_cfg(DEMO, ["MERGE.METHOD", method])
    model = build_model(cfg, 1, 6, 0)
    load_transreid_checkpoint(model, cfg.TEST.WEIGHT, ignore_classifier=True)
    return cfg, model.eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{(model, method): (cfg, model, ExportReport)}, exported lazily, once per module."""
    root = tmp_path_factory.mktemp("onnx")
    done = {}

    def get(kind: str, method: str, backends=("onnxruntime",)):
        key = (kind, method)
        if key not in done:
            cfg, model = (_tiny if kind == "tiny" else _demo)(method)
            cams = 3 if kind == "tiny" else 6
            done[key] = cfg, model, export_onnx(model, cfg, root / f"{kind}_{method}.onnx", cams, backends=backends)
        return done[key]

    return get


@pytest.mark.parametrize("kind", ["tiny", "demo"])
@pytest.mark.parametrize("method", METHODS)
def test_onnxruntime_parity(exports, kind, method):
    backends = ("onnxruntime", "openvino") if method == "stm" and kind == "tiny" else ("onnxruntime",)
    cfg, model, report = exports(kind, method, backends)
    print("\n" + report.summary())
    ort = report.parity[0]
    assert ort.backend == "onnxruntime" and ort.passed and ort.images == 12
    assert ort.min_cosine >= 0.99 and ort.ranking_same == ort.ranked >= 7 and len(ort.flipped) <= 5
    assert ort.max_rel_diff_rounding < 1e-3
    meta = read_metadata(report.path)
    assert meta["fingerprint"]["merging"]["method"] == method
    assert meta["inputs"]["camera"]["num"] == (3 if kind == "tiny" else 6)
    assert meta["inputs"]["images"]["size"] == [256, 128]
    assert meta["feature"]["dim"] == model.feature_dim
    if method != "none":
        assert meta["merging"]["tokens"][-1][1] < 211  # the schedule really merges


def test_dtem_exports_like_tome(exports):
    """DTEM's hard merge is ToMe's matching on its learned embedding: it traces, with parity (tiny model only:
    its export costs what ToMe's does)."""
    _, model, report = exports("tiny", "dtem")
    ort = report.parity[0]
    assert ort.passed and ort.min_cosine >= 0.99 and ort.ranking_same == ort.ranked >= 7
    from reid_lite.index.fingerprint import tensors_digest
    from reid_lite.merging import learned_state_dict

    # the file is bound to the embedding it was exported with
    merging = read_metadata(report.path)["fingerprint"]["merging"]
    assert merging["learned_sha256"] == tensors_digest(learned_state_dict(model))


def test_openvino_parity_for_stm(exports):
    _, _, report = exports("tiny", "stm", ("onnxruntime", "openvino"))
    ov = next(p for p in report.parity if p.backend == "openvino")
    assert ov.passed and ov.min_cosine >= 0.99 and ov.ranking_same == ov.ranked >= 7


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_one_merged_file_runs_at_batch_1_and_7_with_several_cameras(exports, backend):
    cfg, model, report = exports("tiny", "stm", ("onnxruntime", "openvino"))
    runtime = open_runtime(backend, report.path)
    images, _ = synthetic_test_batch(cfg, 7, num_cameras=1, seed=5)
    cams = torch.tensor([0, 1, 2, 0, 1, 2, 1])
    with torch.no_grad():
        ref = model(images, cam_label=cams)
    seven = runtime(images, cam_label=cams)
    ones = torch.cat([runtime(images[i:i + 1], cam_label=cams[i:i + 1]) for i in range(7)])
    for feats, batches in ((seven, [7]), (ones, [1])):
        rep = compare_features(backend, ref, feats, batches)
        print(rep.line())
        assert rep.passed, rep.line()
    assert seven.shape == ones.shape == (7, model.feature_dim)


def test_tracked_coordinates_and_source_tracing_are_refused_with_the_reason(tmp_path):
    cfg = tiny_cfg(depth=3, METHOD="stm", R=8, STM__COORDS="tracked")
    model = build_model(cfg, 10, 3, 0).eval()
    with pytest.raises(ExportRefused, match="tracked coordinates"):
        export_onnx(model, cfg, tmp_path / "x.onnx", 3)
    cfg = tiny_cfg(depth=3, METHOD="tome", R=8, TRACE_SOURCE=True)
    with pytest.raises(ExportRefused, match="MERGE.TRACE_SOURCE"):
        export_onnx(build_model(cfg, 10, 3, 0).eval(), cfg, tmp_path / "x.onnx", 3)
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("method", list(TINY_ONLY))
def test_methods_with_data_dependent_groups_export_with_parity(exports, method):
    """ATM (per-image counts: empty slots), LoTM and DHTM (grid pairs, trees) export and match PyTorch."""
    cfg, model, report = exports("tiny", method, ("onnxruntime", "openvino"))
    assert [p.backend for p in report.parity] == ["onnxruntime", "openvino"]
    for parity in report.parity:
        assert parity.passed and parity.images == 12 and parity.min_cosine >= 0.99, report.summary()
    images, cams = synthetic_test_batch(cfg, 4, num_cameras=3)
    _, tokens = effective_gflops(model, images, cams)
    assert tokens[-1] < 211  # the schedule really merges on these images


class _EmptyLow(TokenReducer):
    """A method from outside the package that may leave slots empty: it keeps the first T - r slots and
    empties those whose head-averaged class attention is below the mean (a different count per image)."""

    needs_cls_attn = True
    may_empty = True

    def __init__(self, r: int) -> None:
        self.r = r

    def num_out(self, num_tokens: int) -> int:
        return num_tokens - min(self.r, num_tokens - 2)

    def reduce(self, x, keys, cls_attn, state):
        n = self.num_out(x.shape[1])
        valid = state.valid()[:, 1:n]
        attn = cls_attn[:, :, 1:n].mean(dim=1)
        mean = (attn * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp_min(1)
        keep = torch.cat([valid.new_ones(valid.shape[0], 1), (attn >= mean) & valid], dim=1)[..., None]
        state.size = state.size[:, :n] * keep
        return x[:, :n] * keep


@pytest.fixture
def emptylow():
    """The method `emptylow`, registered for one test (as a MERGE.PLUGINS file would register it)."""
    register_method(MergeMethod("emptylow", lambda merge, depth, rs: {i: _EmptyLow(r) for i, r in rs.items() if r},
                                uses_r=True))
    yield
    unregister_method("emptylow")


def test_a_plugin_method_with_empty_slots_exports_and_one_that_declares_a_refusal_is_refused(emptylow, tmp_path):
    """Empty slots (masked attention, JPM's stable reordering of the valid tokens) trace to ONNX with parity;
    exportability is the method's own declaration (`TokenReducer.export_refusal`), named in the refusal."""
    from reid_lite.compress.flops import effective_gflops, transreid_gflops

    cfg = tiny_cfg(depth=3, METHOD="emptylow", R=30)
    torch.manual_seed(0)
    model = build_model(cfg, 10, 3, 0).eval()
    images, cams = synthetic_test_batch(cfg, 4, num_cameras=3)
    assert effective_gflops(model, images, cam_label=cams)[0] < transreid_gflops(model)  # slots really empty
    report = export_onnx(model, cfg, tmp_path / "emptylow.onnx", 3, backends=("onnxruntime",))
    ort = report.parity[0]
    assert ort.passed and ort.min_cosine >= 0.99 and ort.ranking_same == ort.ranked >= 7, ort.line()
    assert read_metadata(report.path)["fingerprint"]["merging"]["method"] == "emptylow"
    for reducer in model.reducers.values():
        reducer.export_refusal = "emptylow's selection has no exportable form"
    with pytest.raises(ExportRefused, match=r"blocks \[1, 2\]: emptylow's selection has no exportable form"):
        export_onnx(model, cfg, tmp_path / "refused.onnx", 3)
    assert not (tmp_path / "refused.onnx").exists()


def test_failed_parity_fails_the_export_and_moves_the_file_aside(exports, tmp_path, monkeypatch):
    """A file whose features are not the model's (here: the tiny ToMe file for the STM model) is caught."""
    _, _, tome = exports("tiny", "tome")
    cfg, model = _tiny("stm")

    def fake_export(graph, example, path):
        shutil.copy(tome.path, path)

    monkeypatch.setattr("reid_lite.deploy.export.trace_to_onnx", fake_export)
    with pytest.raises(ExportError, match="parity with PyTorch not met"):
        export_onnx(model, cfg, tmp_path / "stm.onnx", 3, backends=("onnxruntime",))
    assert not (tmp_path / "stm.onnx").exists() and (tmp_path / "stm.failed.onnx").exists()


# ----------------------------------------------------------------------------- backends


def test_feature_extractor_and_gallery_fingerprint_use_the_backend(exports, tmp_path):
    from reid_lite.engine.extractor import FeatureExtractor
    from reid_lite.index.fingerprint import check_fingerprint, model_fingerprint

    cfg, model, report = exports("tiny", "stm", ("onnxruntime", "openvino"))
    images, cams = synthetic_test_batch(cfg, 6, num_cameras=3, seed=9)
    torch_ext = FeatureExtractor(cfg, model=model, device="cpu")
    ref = torch_ext(images, camids=cams.numpy())
    fps = {}
    for backend in ("onnxruntime", "openvino"):
        bcfg = cfg.clone()
        bcfg.merge_from_list(["MODEL.BACKEND", backend, "MODEL.ONNX_PATH", str(report.path), "MODEL.DEVICE", "cpu"])
        ext = FeatureExtractor(bcfg)
        assert ext.model.backend == backend
        feats = ext(images, camids=cams.numpy())
        assert compare_features(backend, ref, feats, [6]).passed  # L2-normalised like the torch path
        fps[backend] = model_fingerprint(bcfg, ext.model, "full", 3)
        assert fps[backend]["backend"]["model"].startswith("sha256:")
    torch_fp = model_fingerprint(cfg, model, "full", 3)
    assert fps["onnxruntime"]["merging"] == torch_fp["merging"]
    with pytest.raises(Exception, match="backend"):
        check_fingerprint(fps["onnxruntime"], fps["openvino"])
    with pytest.raises(Exception, match="backend"):
        check_fingerprint(torch_fp, fps["onnxruntime"])


def test_backend_config_mismatches_are_clear_errors(exports, tmp_path):
    cfg, _, report = exports("tiny", "stm", ("onnxruntime", "openvino"))
    bad = cfg.clone()
    bad.merge_from_list(["MODEL.BACKEND", "onnxruntime", "MODEL.ONNX_PATH", str(report.path), "MERGE.METHOD", "tome"])
    with pytest.raises(DeployError, match="MERGE.METHOD 'tome' != the file's 'stm'"):
        load_runtime_model(bad)
    bad = cfg.clone()
    bad.merge_from_list(["MODEL.BACKEND", "onnxruntime", "MODEL.ONNX_PATH", str(tmp_path / "missing.onnx")])
    with pytest.raises(DeployError, match="not found"):
        load_runtime_model(bad)
    bad = cfg.clone()
    bad.merge_from_list(["MODEL.BACKEND", "tensorrt"])
    with pytest.raises(ValueError, match="unknown MODEL.BACKEND"):
        load_runtime_model(bad)


def test_parity_report_flags_a_moved_feature():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(8, 32, generator=g)
    assert compare_features("x", ref, ref.clone(), [8]).passed
    moved = ref.clone()
    moved[3] = torch.randn(32, generator=g)
    rep = compare_features("x", ref, moved, [8])
    assert not rep.passed and "image 3" in rep.failures[0]
    assert np.isclose(rep.max_rel_diff, (moved - ref).abs().max(1).values.div(ref.abs().max(1).values).max().item())


# ----------------------------------------------------------------------------- latency budget


def test_choose_r_takes_the_mildest_setting_that_fits_and_none_when_it_fits():
    from reid_lite.compress.latency import choose_r

    def falling(r):  # batch-32-like: every merged token saves time
        return 100.0 - 2 * r

    assert choose_r(falling, 120.0, 40).r == 0  # the unmerged model fits: merging off
    choice = choose_r(falling, 80.0, 40)
    assert choice.r == 10 and falling(choice.r) <= 80.0 < falling(choice.r - 1)
    assert 0 in choice.measured and len(choice.measured) <= 8  # binary search, not a sweep

    def batch_one(r):  # merging costs more than it saves: it never pays
        return 10.0 + (0.5 if r else 0.0) - 0.001 * r

    assert choose_r(batch_one, 10.0, 40).r == 0
    with pytest.raises(ValueError, match="fastest measured is r=0"):
        choose_r(batch_one, 9.0, 40)


def test_target_latency_is_measured_when_the_model_is_built():
    cfg = tiny_cfg(depth=3, METHOD="stm", R=8)
    cfg.merge_from_list(["MERGE.TARGET_LATENCY_MS", 1e9, "TEST.IMS_PER_BATCH", 2, "MODEL.DEVICE", "cpu"])
    model = build_model(cfg, 10, 3, 0)
    assert model.merge_r == 0 and model.reducers == {} and model.latency_choice.measured[0] > 0
    cfg.MERGE.TARGET_LATENCY_MS = 1e-6
    with pytest.raises(ValueError, match="no merging setting meets MERGE.TARGET_LATENCY_MS"):
        build_model(cfg, 10, 3, 0)
