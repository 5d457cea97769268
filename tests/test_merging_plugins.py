"""The method registry and the capacity contract, through a method registered from outside the package.

`PLUGIN` below is a user's own file (written to a temporary directory and listed in MERGE.PLUGINS):
a reducer that keeps a fixed capacity but empties a different number of slots in every image. It is
used to show that empty slots never reach a feature (batch invariance, equality with physically
removed tokens), that the forward stays one compiled graph, and that such a method works in
tools/test.py --compare, the benchmark, a gallery and the torchreid factory like the built-in ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_tool, tiny_cfg

from reid_lite import build_model, load_cfg
from reid_lite.compress.flops import effective_gflops, transreid_gflops
from reid_lite.config import get_cfg
from reid_lite.merging import (
    STM,
    EViT,
    TokenState,
    ToMe,
    get_method,
    load_plugins,
    merge_cfg,
    method_names,
    unregister_method,
)
from reid_lite.merging.registry import forget_plugin
from reid_lite.models.transreid import jpm_positions, shuffle_unit

REPO = Path(__file__).resolve().parent.parent

PLUGIN = '''
"""A user's merging method: keep the (T - 1 - r) most attended patch slots in sequence order and empty
those whose head-averaged class attention is below THRESHOLD x the mean (a different count per image)."""
import torch

from reid_lite.merging import MergeMethod, TokenReducer, register_method
from reid_lite.merging.base import take_tokens


class EmptyLowAttention(TokenReducer):
    needs_cls_attn = True
    may_empty = True

    def __init__(self, r, threshold, fill=0.0):
        self.r, self.threshold, self.fill = r, threshold, fill

    def num_out(self, num_tokens):
        return num_tokens - max(0, min(self.r, num_tokens - 2))

    def reduce(self, x, keys, cls_attn, state):
        T = x.shape[1]
        valid = state.valid()[:, 1:]
        attn = cls_attn[:, :, 1:].mean(dim=1)
        rank = attn.masked_fill(~valid, -1.0)  # empty slots are never kept over a valid one
        kept = rank.argsort(dim=1, descending=True, stable=True)[:, : self.num_out(T) - 1].sort(dim=1).values
        mean = (attn * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True)
        keep = (attn.gather(1, kept) >= self.threshold * mean) & valid.gather(1, kept)
        kept = kept + 1
        keep = torch.cat([keep.new_ones(keep.shape[0], 1), keep], dim=1)[..., None]
        idx = torch.cat([kept.new_zeros(kept.shape[0], 1), kept], dim=1)
        out = take_tokens(x, idx)
        # An empty slot holds `fill` (any value): the contract says it never reaches a feature.
        out = torch.where(keep, out, torch.full_like(out, self.fill))
        state.size = take_tokens(state.size, idx) * keep
        if state.source is not None:
            state.source = take_tokens(state.source, idx) * keep
        if state.pos is not None:
            state.pos = take_tokens(state.pos, idx)
        return out


def build(merge, depth, rs):
    opts = merge.EMPTYLOW
    return {i: EmptyLowAttention(r, opts.THRESHOLD, opts.FILL) for i, r in rs.items() if r > 0}


register_method(MergeMethod(
    "emptylow", build, uses_r=True,
    options={"THRESHOLD": 1.0, "FILL": 0.0},
    identity=("THRESHOLD",),  # FILL never reaches a feature, so galleries may differ in it
    summary="test plugin: empties the less attended slots"))
'''


@pytest.fixture
def plugin(tmp_path) -> Path:
    """The plugin file, not yet imported; afterwards its method and config node are gone again."""
    path = tmp_path / "my_merging.py"
    path.write_text(PLUGIN)
    yield path
    if "emptylow" in method_names():
        unregister_method("emptylow")
    forget_plugin(str(path))


@pytest.fixture
def reducer_cls(plugin):
    load_plugins([str(plugin)])
    return type(get_method("emptylow").build(merge_cfg("emptylow", 8, layers=[1]), 1, {0: 8})[0])


def _model(reducers: dict | None = None, prop_attn: bool = True, **merge):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**merge), 10, 3, 1).eval()
    if reducers is not None:
        model.set_reducers(reducers, prop_attn)
    return model


def _features(model, images, cams):
    with torch.no_grad():
        return model(images, cam_label=cams)


def _empty_counts(model, images, cams) -> torch.Tensor:
    """(B,) empty slots after the trunk: capacity minus the valid tokens."""
    model.count_tokens = True
    try:
        _features(model, images, cams)
    finally:
        model.count_tokens = False
    state = model.last_state
    return state.size.shape[1] - state.counts[-1]


# ----------------------------------------------------------------------------------------- the contract
def test_jpm_positions_with_every_slot_valid_are_the_official_shuffle():
    for length, shift, group in [(210, 5, 2), (161, 5, 2), (37, 3, 3), (9, 5, 2)]:
        seq = torch.arange(1 + length, dtype=torch.float32)[None, :, None]
        expect = shuffle_unit(seq, shift, group)[0, : (length // 4) * 4, 0].long()
        pos, valid = jpm_positions(torch.tensor([length]), length, shift, group, 4)
        assert valid.all() and torch.equal(pos.flatten(), expect)
        pos, _ = jpm_positions(torch.tensor([length]), length, shift, group, 4, rearrange=False)
        assert torch.equal(pos.flatten(), torch.arange(1, 1 + (length // 4) * 4))


def test_empty_slots_vary_per_image_and_features_are_batch_invariant(reducer_cls, images, cams):
    model = _model({i: reducer_cls(8, 1.0) for i in range(3)})
    empties = _empty_counts(model, images, cams)
    assert len(set(empties.tolist())) > 1 and (empties > 24).all()  # more than the 3 x 8 removed slots
    batch = _features(model, images, cams)
    alone = torch.cat([_features(model, images[i:i + 1], cams[i:i + 1]) for i in range(len(images))])
    torch.testing.assert_close(alone, batch, rtol=1e-5, atol=1e-5)
    perm = torch.tensor([3, 0, 5, 1])  # another batch composition
    torch.testing.assert_close(_features(model, images[perm], cams[perm]), batch[perm], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(batch).all()


@pytest.mark.parametrize("prop_attn", [True, False])
def test_empty_slots_equal_physically_removed_tokens(reducer_cls, images, cams, prop_attn):
    """One image at a time, the capacity model (empty slots masked, JPM on the valid tokens in order)
    gives the features of the same model with the emptied tokens really removed."""

    class Removing(reducer_cls):
        may_empty = False  # this one shrinks the sequence itself (possible for a batch of one)

        def reduce(self, x, keys, cls_attn, state):
            out = super().reduce(x, keys, cls_attn, state)
            keep = state.size[0, :, 0] > 0
            state.size = state.size[:, keep]
            return out[:, keep]

    capacity = _model({0: reducer_cls(8, 1.0, fill=3.0)}, prop_attn)
    removed = _model({0: Removing(8, 1.0)}, prop_attn)
    for i in range(3):
        x, c = images[i:i + 1], cams[i:i + 1]
        torch.testing.assert_close(_features(capacity, x, c), _features(removed, x, c), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("later", ["stm", "tome", "evit", "stm_tracked"])
def test_reducers_after_empty_slots_never_pick_them(reducer_cls, later):
    """ToMe, STM and EViT after a block that emptied slots: each merge joins two valid tokens (the valid
    count drops by exactly r), sizes still add up to the patches held, and empty slots stay empty."""
    g = torch.Generator().manual_seed(7)
    B, T, C, H = 4, 211, 32, 4
    x = torch.randn(B, T, C, generator=g)
    state = TokenState(grid=(21, 10), trace_source=True, track_pos=later == "stm_tracked")
    first = reducer_cls(20, 1.0)
    x = first(x, torch.randn(B, H, T, C // H, generator=g), torch.rand(B, H, T, generator=g).softmax(-1), state)
    assert state.may_empty
    reducer = {"stm": STM(8), "tome": ToMe(8), "evit": EViT(0.3), "stm_tracked": STM(8, coords="tracked")}[later]
    before = state.valid().sum(1)
    x = x + 5.0 * (~state.valid())[..., None]  # what a block's MLP leaves in empty slots: garbage, finite
    held = state.size.sum(dim=(1, 2))
    T = x.shape[1]
    keys = torch.randn(B, H, T, C // H, generator=g)
    bias = state.attn_bias()[:, 0]  # what the block's attention would add
    cls_attn = (torch.randn(B, H, T, generator=g) + bias).softmax(-1)
    if later == "evit":  # attention that underflowed to 0 on valid tokens must still rank them over empty ones
        cls_attn[:, :, 1:150] = 0.0
    out = reducer(x, keys, cls_attn, state)
    after = state.valid().sum(1)
    if later == "evit":  # the kept tokens are valid ones (enough of them), plus the fused token
        assert torch.equal(after, torch.full_like(after, 1 + reducer.num_kept(T) + 1))
    else:
        assert torch.equal(after, before - 8)
    torch.testing.assert_close(state.size.sum(dim=(1, 2)), held)
    torch.testing.assert_close(state.size[..., 0], state.source.sum(-1) + (torch.arange(out.shape[1]) == 0))
    assert torch.isfinite(out).all() and out[~state.valid()].abs().sum() == 0


def test_stm_response_floor_ignores_empty_slots(reducer_cls, monkeypatch):
    """STM's inverse response S^ = min S / S uses the least score of the *valid* patches: an empty slot
    (score 0) would otherwise set the floor to 0 and zero the CC-Function for every pair."""
    import reid_lite.merging.stm as stm_module

    g = torch.Generator().manual_seed(3)
    B, T, C, H = 2, 211, 32, 4
    state = TokenState(grid=(21, 10))
    x = reducer_cls(20, 1.0)(torch.randn(B, T, C, generator=g), torch.randn(B, H, T, C // H, generator=g),
                             torch.rand(B, H, T, generator=g).softmax(-1), state)
    valid = state.valid()
    assert not valid.all()
    T = x.shape[1]
    cls_attn = (torch.randn(B, H, T, generator=g) + state.attn_bias()[:, 0]).softmax(-1)
    reducer = STM(8)
    expected = reducer.assess(cls_attn, state).clamp_min(1e-12).masked_fill(~valid[:, 1:], float("inf"))
    seen = []
    real_cc = stm_module.cc_function

    def spy(cos, s_a, s_b, s_min, d1, d2):
        seen.append(s_min)
        return real_cc(cos, s_a, s_b, s_min, d1, d2)

    monkeypatch.setattr(stm_module, "cc_function", spy)
    reducer(x, torch.randn(B, H, T, C // H, generator=g), cls_attn, state)
    (s_min,) = seen
    torch.testing.assert_close(s_min, expected.amin(dim=1, keepdim=True))
    assert (s_min > 0).all()


def test_mixed_chain_is_batch_invariant_and_one_graph(reducer_cls, images, cams):
    """Empty slots from block 1, then STM (tracked) and EViT: batch invariance and one dynamo graph."""
    for reducers, prop_attn in [({0: reducer_cls(8, 1.0), 1: STM(8, coords="tracked"), 2: EViT(0.7)}, True),
                                ({0: reducer_cls(8, 1.0), 1: ToMe(8), 2: STM(8)}, False)]:
        model = _model(reducers, prop_attn)
        batch = _features(model, images, cams)
        alone = torch.cat([_features(model, images[i:i + 1], cams[i:i + 1]) for i in range(len(images))])
        torch.testing.assert_close(alone, batch, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the last chain (mask without proportional attention) as one graph
        explained = torch._dynamo.explain(model)(images[:2], cam_label=cams[:2])
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_plugin_method_compiles_to_one_graph_and_counts_effective_flops(plugin, images, cams):
    cfg = load_cfg(None, ["MERGE.PLUGINS", f"['{plugin}']", "MERGE.METHOD", "emptylow"])
    small = tiny_cfg(METHOD="emptylow", R=8)
    small.MERGE.PLUGINS = list(cfg.MERGE.PLUGINS)
    torch.manual_seed(0)
    model = build_model(small, 10, 3, 1).eval()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(images[:2], cam_label=cams[:2])
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    capacity = transreid_gflops(model)
    effective, per_block = effective_gflops(model, images, cam_label=cams)
    assert effective < capacity and per_block[0] == 211 and per_block[-1] < 211 - 3 * 8
    # Methods that never empty a slot: the effective count is the capacity count.
    stm = _model(METHOD="stm", R=8)
    assert effective_gflops(stm, images, cam_label=cams)[0] == pytest.approx(transreid_gflops(stm), rel=1e-12)


# ----------------------------------------------------------------------------------------- registry + config
def test_plugin_options_in_yaml_and_overrides_and_unknown_keys(plugin, tmp_path):
    assert "emptylow" not in method_names() and "EMPTYLOW" not in get_cfg().MERGE
    yml = tmp_path / "mine.yml"
    yml.write_text(f"MERGE:\n  PLUGINS: ['{plugin}']\n  METHOD: emptylow\n  EMPTYLOW:\n    THRESHOLD: 0.5\n")
    cfg = load_cfg(yml)
    assert cfg.MERGE.EMPTYLOW.THRESHOLD == 0.5 and cfg.MERGE.PLUGINS == [str(plugin.resolve())]
    assert load_cfg(yml, ["MERGE.EMPTYLOW.THRESHOLD", "0.7"]).MERGE.EMPTYLOW.THRESHOLD == 0.7
    assert load_cfg(None, ["MERGE.PLUGINS", str(plugin)]).MERGE.PLUGINS == [str(plugin.resolve())]  # a bare path
    with pytest.raises(KeyError, match="MERGE.EMPTYLOW.NOPE"):
        load_cfg(yml, ["MERGE.EMPTYLOW.NOPE", "1"])
    bad = tmp_path / "bad.yml"
    bad.write_text("MERGE:\n  EMPTYLOW:\n    NOPE: 1\n")
    with pytest.raises(KeyError, match="NOPE"):
        load_cfg(bad)
    with pytest.raises(ValueError, match="no_such_plugin.py"):
        load_cfg(None, ["MERGE.PLUGINS", "['no_such_plugin.py']"])
    with pytest.raises(ValueError, match="unknown MERGE.METHOD 'nothing'.*MERGE.PLUGINS"):
        build_model(tiny_cfg(METHOD="nothing"), 10, 3, 1)
    assert merge_cfg("emptylow", 4, emptylow_threshold=0.25).EMPTYLOW.THRESHOLD == 0.25
    with pytest.raises(KeyError, match="emptylow_nope"):
        merge_cfg("emptylow", 4, emptylow_nope=1)
    # A second registration of the name is refused, as is a name that is one of MERGE's own keys.
    with pytest.raises(ValueError, match="already registered"):
        from reid_lite.merging import register_method

        register_method(get_method("emptylow"))
    with pytest.raises(ValueError, match="MERGE's own keys"):
        register_method(type(get_method("none"))("r", get_method("none").build))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from reid_lite.data.synthetic import generate_reid_dataset

    return generate_reid_dataset(tmp_path_factory.mktemp("plugin_data"), num_train_ids=2, num_test_ids=4,
                                 num_cameras=2, images_per_id_per_camera=2, size=(64, 32), num_distractors=0,
                                 progress=False)


TINY = ["MODEL.EMBED_DIM", "64", "MODEL.DEPTH", "3", "MODEL.NUM_HEADS", "4", "INPUT.SIZE_TEST", "[64, 32]",
        "INPUT.SIZE_TRAIN", "[64, 32]", "MODEL.STRIDE_SIZE", "[16, 16]", "MODEL.JPM", "True",
        "MODEL.PRETRAIN_CHOICE", "none", "MODEL.DEVICE", "cpu", "MODEL.SIE_CAMERA", "True",
        "TEST.IMS_PER_BATCH", "8", "DATALOADER.NUM_WORKERS", "0", "MERGE.R", "2", "MERGE.LAYERS", "[1, 2]"]




def test_plugin_method_in_tools_test_compare(plugin, data_root, tmp_path, capsys):
    out = tmp_path / "out"
    opts = [*TINY, "DATASETS.ROOT_DIR", str(data_root), "OUTPUT_DIR", str(out), "MERGE.PLUGINS", f"['{plugin}']"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = load_tool("test").main(["--no-progress", "--compare", "none,stm,emptylow", *opts])
    assert rc == 0, capsys.readouterr().err
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [r["method"] for r in rows] == ["none", "stm", "emptylow"]
    assert rows[2]["gflops"] < rows[0]["gflops"] and np.isfinite(rows[2]["mAP"])
    # Without the plugin the name is unknown: a one-line error, exit code 2.
    assert load_tool("test").main(["--compare", "none,emptylow2", *opts]) == 2
    assert "emptylow2" in capsys.readouterr().err


def test_plugin_method_in_the_benchmark(plugin, tmp_path):
    """The script in a fresh process; each method runs in its own spawned child, which imports the plugin
    from MERGE.PLUGINS itself."""
    out = tmp_path / "bench.json"
    argv = ["--config", "", "--methods", "none,emptylow", "--device", "cpu", "--batch-size", "2", "--iters", "1",
            "--warmup", "0", "--threads", "1", "--out", str(out), *TINY, "MERGE.PLUGINS", f"['{plugin}']"]
    res = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark.py"), *argv], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    results = json.loads(out.read_text())["results"]
    assert [r["method"] for r in results] == ["none", "emptylow"]
    assert results[1]["effective_gflops"] < results[1]["gflops"] < results[0]["gflops"]


def test_plugin_method_in_a_gallery_and_its_options_in_the_fingerprint(plugin, data_root, tmp_path):
    from reid_lite.index.gallery import FingerprintMismatch, Gallery

    def cfg(*extra):
        return load_cfg(None, [*TINY, "MERGE.PLUGINS", f"['{plugin}']", "MERGE.METHOD", "emptylow", *extra])

    a = Gallery.create(tmp_path / "a", cfg(), camera_num=2)
    a.add([data_root / "bounding_box_test"])
    b = Gallery.create(tmp_path / "b", cfg("MERGE.EMPTYLOW.THRESHOLD", "0.9"), camera_num=2)
    b.add([data_root / "bounding_box_test"])
    q = str(sorted((data_root / "query").glob("*.jpg"))[0])
    assert a.fingerprint["merging"]["emptylow"] == {"THRESHOLD": 1.0}
    assert len(a.search([q], k=3)[0]) == 3
    with pytest.raises(FingerprintMismatch, match="merging.emptylow.THRESHOLD"):
        a.search([q], k=3, cfg=cfg("MERGE.EMPTYLOW.THRESHOLD", "0.9"))
    with pytest.raises(FingerprintMismatch, match="merging.emptylow.THRESHOLD"):
        b.search([q], k=3, cfg=cfg())
    # FILL is not an identifying option (it never reaches a feature): the query is accepted.
    assert len(a.search([q], k=3, cfg=cfg("MERGE.EMPTYLOW.FILL", "5.0"))[0]) == 3
    # Reopened, the gallery's stored config names the plugin and builds its method again.
    assert len(Gallery.open(tmp_path / "a").search([q], k=3)[0]) == 3


def test_plugin_method_in_the_torchreid_factory(plugin):
    from reid_lite.integrations import torchreid as rt

    load_plugins([str(plugin)])
    assert rt.model_names()["transreid_emptylow"] == "emptylow"
    model = rt.build_transreid(4, method="emptylow", opts=TINY, emptylow_threshold=0.8)
    assert {type(r).__name__ for r in model.reducers.values()} == {"EmptyLowAttention"}
    assert all(r.threshold == 0.8 for r in model.reducers.values())
    assert "transreid_emptylow" in rt.register_models()


@pytest.mark.parametrize("source, line, what", [
    ("x = 1\ndef broken(:\n    pass\n", 2, "SyntaxError"),
    ("import math\n\n\nraise RuntimeError('plugin cannot start')\n", 4, "RuntimeError: plugin cannot start"),
])
def test_a_plugin_that_fails_to_import_is_one_line_naming_file_and_line(tmp_path, capsys, source, line, what):
    """A syntax error or an exception at import is a PluginError (a ValueError) naming the file and the line,
    and the tools print it as one `error:` line with exit status 2."""
    from reid_lite.merging.registry import PluginError

    bad = tmp_path / "bad_plugin.py"
    bad.write_text(source)
    try:
        with pytest.raises(PluginError, match=rf"bad_plugin.py.*line {line}\): {what}"):
            load_cfg(None, ["MERGE.PLUGINS", f"['{bad}']"])
        rc = load_tool("benchmark").main(["--device", "cpu", "--out", str(tmp_path / "b.json"),
                                          "MERGE.PLUGINS", f"['{bad}']"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: MERGE.PLUGINS:") and f"line {line}" in err[0]
        assert not (tmp_path / "b.json").exists()
    finally:
        forget_plugin(str(bad))
