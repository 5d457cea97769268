"""GFLOPs budgets: every registered method's knob, the one monotone search, effective GFLOPs, the CLI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import load_tool, tiny_cfg

from reid_lite import build_model
from reid_lite.compress.budget import parse_budget
from reid_lite.compress.flops import effective_gflops, transreid_gflops
from reid_lite.data import ImageReadWarning
from reid_lite.merging import (
    BudgetError,
    get_method,
    load_plugins,
    method_names,
    search_knob,
    unregister_method,
)
from reid_lite.merging.registry import forget_plugin

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only spin on 2 busy cores

PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "merging_plugin.py"
# The tiny model has 3 reducible blocks: the methods' own layers must lie in them.
LAYERS = {"EVIT__LAYERS": [1, 2, 3], "LOTM__LAYERS": [1, 2, 3], "DHTM__LAYERS": [1, 2, 3], "CALIBRATION_IMAGES": 4}


def _model(method: str = "none", **merge) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(tiny_cfg(METHOD=method, **{**LAYERS, **merge}), 10, 3, 1).eval()


@pytest.fixture(scope="module")
def base() -> float:
    return transreid_gflops(_model())


@pytest.fixture
def drop_plugin():
    """examples/merging_plugin.py's 'drop' (an r knob), registered for one test."""
    load_plugins([str(PLUGIN)])
    yield "drop"
    unregister_method("drop")
    forget_plugin(str(PLUGIN))


def _budgeted() -> list[str]:
    return [m for m in method_names() if get_method(m).budget_knob is not None]


def _check_solution(model, target: float) -> None:
    s = model.merge_budget
    assert s.target == pytest.approx(target)
    assert target * 0.99 <= s.achieved <= target, s.to_dict()
    assert -0.01 <= s.error <= 0
    assert transreid_gflops(model) == pytest.approx(s.gflops)  # the model runs the solved setting
    # The recorded setting, pinned in a config without the budget, is the same model.
    pinned = tiny_cfg(METHOD=s.method, **LAYERS)
    for key, value in s.setting.items():
        node = pinned
        for part in key.split(".")[:-1]:
            node = node[part]
        node[key.split(".")[-1]] = value
    torch.manual_seed(0)
    assert transreid_gflops(build_model(pinned, 10, 3, 1)) == pytest.approx(s.gflops)


def test_every_registered_method_meets_the_budget_within_one_percent(base):
    methods = _budgeted()
    assert {"tome", "stm", "evit", "atm", "lotm", "dhtm"} <= set(methods)  # every built-in but none
    for method in methods:
        for share in (0.9, 0.85):
            _check_solution(_model(method, TARGET_GFLOPS=share * base), share * base)


def test_a_plugin_with_an_r_knob_meets_the_budget(drop_plugin, base):
    model = _model(drop_plugin, PLUGINS=[str(PLUGIN)], TARGET_GFLOPS=0.8 * base)
    _check_solution(model, 0.8 * base)
    assert model.merge_budget.knob == "r"


def test_r_knob_prefers_a_constant_r_and_steps_per_layer_otherwise(base):
    # A constant r exactly on the budget is kept as it was before (MERGE.R, model.merge_r).
    exact = transreid_gflops(_model("tome", R=20))
    model = _model("tome", TARGET_GFLOPS=exact)
    assert model.merge_r == 20 and model.merge_budget.setting == {"MERGE.R": 20, "MERGE.R_LIST": []}
    # Just below r=20's cost no constant r is within 1% (r=21 merges 3 more tokens), so one layer merges one more.
    model = _model("tome", TARGET_GFLOPS=exact * 0.999)
    assert model.merge_r is None and model.merge_budget.setting == {"MERGE.R_LIST": [21, 20, 20]}
    assert {i: r.r for i, r in model.reducers.items()} == {0: 21, 1: 20, 2: 20}


def test_search_is_one_monotone_search_whichever_way_the_knob_turns():
    def falling(v):  # cost falls as the value grows (r, K): 100 - 2 v
        return 100.0 - 2 * v

    assert search_knob(falling, 50.0, 0, 40, integer=True) == (25, 50.0)
    assert search_knob(falling, 51.0, 0, 40, integer=True, tol=0.05) == (25, 50.0)  # the mildest under the budget
    # stride 4: a multiple of 4 (a constant schedule) is preferred when it lands within the tolerance ...
    assert search_knob(falling, 86.5, 0, 40, integer=True, stride=4, tol=0.05) == (8, 84.0)
    # ... and the single steps between two multiples are searched when it does not
    assert search_knob(falling, 86.5, 0, 40, integer=True, stride=4, tol=0.01) == (7, 86.0)

    def rising(v):  # cost rises with the value (EViT's keep rate, ATM's offset): 10 + 90 v
        return 10.0 + 90.0 * v

    value, cost = search_knob(rising, 55.0, 1.0, 0.0)
    assert 55.0 * 0.99 <= cost <= 55.0 and value == pytest.approx(0.5, abs=0.01)
    assert search_knob(rising, 100.0, 1.0, 0.0) == (1.0, 100.0)  # no reduction needed


def test_an_unreachable_budget_names_the_reachable_range():
    with pytest.raises(BudgetError, match=r"cannot meet 5 GFLOPs within 1%: its settings reach 10 GFLOPs "
                                          r"\(0\) to 100 \(1\)"):
        search_knob(lambda v: 10.0 + 90.0 * v, 5.0, 1.0, 0.0)
    with pytest.raises(BudgetError, match=r"reach 20 GFLOPs .* to 100"):  # above the unreduced model
        search_knob(lambda v: 100.0 - 2 * v, 120.0, 0, 40, integer=True)
    with pytest.raises(BudgetError, match=r"settings jump from 60 GFLOPs \(1\) to 40 \(2\)"):
        search_knob(lambda v: 80.0 - 20 * v, 50.0, 0, 3, integer=True)


def test_dhtm_out_of_reach_on_the_tiny_model_is_a_clear_error(base):
    # DHTM's dense similarity rounds cost as much as they save on a width-48 model: it cannot reach 60%.
    with pytest.raises(BudgetError, match=r"^dhtm \(k knob\) cannot meet .* its settings reach .* GFLOPs "
                                          r"\(MERGE.DHTM.K_LIST \[\d+, \d+, \d+\]\) to .* \(MERGE.DHTM.K 0\)$"):
        _model("dhtm", TARGET_GFLOPS=0.6 * base)
    with pytest.raises(ValueError, match="needs a method that declares a budget knob .*; .none. does not"):
        _model("none", TARGET_GFLOPS=0.6 * base)


def test_atm_is_matched_on_effective_gflops_over_its_calibration_images(base):
    target = 0.85 * base
    model = _model("atm", TARGET_GFLOPS=target)
    s = model.merge_budget
    assert s.knob == "offset" and s.matched == "effective"
    # Per-image counts keep ATM's capacity (what runs) at the unmerged model's plus its matching, far above
    # the budget; the effective count (valid tokens only) is what meets it.
    assert s.gflops > base > target >= s.effective_gflops >= 0.99 * target
    assert s.calibration == {"source": "4 synthetic pedestrians (seed 0)", "images": 4, "paths": []}
    from reid_lite.data.synthetic_batch import synthetic_test_batch

    images, cams = synthetic_test_batch(tiny_cfg(), 4, num_cameras=3)
    assert effective_gflops(model, images, cam_label=cams)[0] == pytest.approx(s.effective_gflops)


def test_relative_and_absolute_budgets():
    assert parse_budget("75%", 20.0) == pytest.approx(15.0)
    assert parse_budget("15.53", 20.41) == pytest.approx(15.53)
    for bad in ("0%", "150%", "-3", "fast"):
        with pytest.raises(ValueError, match=r"--budget expects GFLOPs"):
            parse_budget(bad, 20.0)


def test_compare_all_with_a_budget_prints_one_table_and_records_each_setting(tmp_path, capsys, tiny_data):
    tool = load_tool("test")
    out = tmp_path / "out"
    cfg = tmp_path / "tiny.yml"
    cfg.write_text(f"""
MODEL: {{PRETRAIN_CHOICE: 'none', EMBED_DIM: 48, DEPTH: 4, NUM_HEADS: 4, STRIDE_SIZE: [12, 12], SIE_CAMERA: True,
        JPM: True, DEVICE: 'cpu'}}
INPUT: {{SIZE_TRAIN: [256, 128], SIZE_TEST: [256, 128]}}
DATASETS: {{NAMES: 'market1501', ROOT_DIR: '{tiny_data / "synthetic"}'}}
DATALOADER: {{NUM_WORKERS: 0}}
TEST: {{IMS_PER_BATCH: 16}}
MERGE: {{METHOD: 'stm', LAYERS: [1, 2, 3], CALIBRATION_IMAGES: 4, EVIT: {{LAYERS: [1, 2, 3]}},
        LOTM: {{LAYERS: [1, 2, 3]}}, DHTM: {{LAYERS: [1, 2, 3]}}}}
OUTPUT_DIR: '{out}'
""")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageReadWarning)
        rc = tool.main(["--config", str(cfg), "--no-progress", "--compare", "all", "--budget", "85%"])
    printed = capsys.readouterr().out
    assert rc == 0
    record = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in record["results"]}
    assert list(rows) == method_names()
    target = record["budget"]["target_gflops"]
    assert record["budget"]["spec"] == "85%" and target == pytest.approx(0.85 * rows["none"]["gflops"])
    assert rows["none"]["budget"] is None
    for method in _budgeted():
        b = rows[method]["budget"]
        assert 0.99 * target <= b["achieved_gflops"] <= target and b["setting"]
        assert f"| {method} " in printed
    atm = rows["atm"]
    assert atm["budget"]["matched"] == "effective" and atm["effective_gflops"] < target < atm["gflops"]
    calib = record["budget"]["calibration"]
    assert calib["source"] == "first 4 gallery images" and len(calib["paths"]) == 4
    assert "eff. GFLOPs" in printed and "setting (error)" in printed and "EVIT.KEEP_RATE=" in printed
    # an unreachable budget is one error line and exit status 2, before any extraction
    rc = tool.main(["--config", str(cfg), "--no-progress", "--compare", "none,dhtm", "--budget", "40%"])
    err = capsys.readouterr().err
    assert rc == 2 and "dhtm (k knob) cannot meet" in err and "its settings reach" in err


def test_latency_budget_turns_the_same_knob():
    from reid_lite.compress.latency import choose_setting

    def rising(keep):  # a real knob whose latency rises with the value (EViT's keep rate)
        return 10.0 + 90.0 * keep

    choice = choose_setting(rising, 55.0, 1.0, 0.001, integer=False, label="keep={:.3f}".format,
                            setting=lambda v: {"MERGE.EVIT.KEEP_RATE": v})
    assert 0.95 * 55.0 <= rising(choice.value) <= 55.0 and len(choice.measured) <= 14
    assert choice.r is None and choice.setting == {"MERGE.EVIT.KEEP_RATE": choice.value}
    # On a model: EViT's keep rate through MERGE.TARGET_LATENCY_MS; merging off when the unmerged model fits.
    cfg = tiny_cfg(depth=3, METHOD="evit", EVIT__LAYERS=[1, 2])
    cfg.merge_from_list(["MERGE.TARGET_LATENCY_MS", 1e9, "TEST.IMS_PER_BATCH", 2, "MODEL.DEVICE", "cpu"])
    model = build_model(cfg, 10, 3, 0)
    assert model.merge_setting == {"MERGE.EVIT.KEEP_RATE": 1.0} and model.merge_r is None
    assert transreid_gflops(model) == pytest.approx(transreid_gflops(model, {}))
    cfg.MERGE.TARGET_LATENCY_MS = 1e-6
    with pytest.raises(ValueError, match=r"no merging setting meets MERGE.TARGET_LATENCY_MS 1e-06: the fastest "
                                         r"measured is EVIT.KEEP_RATE"):
        build_model(cfg, 10, 3, 0)


def test_the_gallery_fingerprint_records_a_solved_setting(base):
    from reid_lite.index.fingerprint import model_fingerprint

    # Same config but for the number of calibration images: ATM's solved offset differs, and so must the
    # fingerprint (a gallery must refuse queries embedded with the other setting).
    models = [_model("atm", TARGET_GFLOPS=0.85 * base, CALIBRATION_IMAGES=n) for n in (4, 2)]
    offsets = [m.merge_budget.value for m in models]
    assert offsets[0] != offsets[1]
    prints = [model_fingerprint(tiny_cfg(METHOD="atm", TARGET_GFLOPS=0.85 * base, **LAYERS), m, "global", 3)
              for m in models]
    assert [p["merging"]["solved"] for p in prints] == [{"MERGE.ATM.OFFSET": v} for v in offsets]
    # A constant r stays where galleries always had it (r_solved), with no 'solved' entry.
    tome = _model("tome", TARGET_GFLOPS=transreid_gflops(_model("tome", R=20)))
    fp = model_fingerprint(tiny_cfg(METHOD="tome", **LAYERS), tome, "global", 3)["merging"]
    assert fp["r_solved"] == 20 and "solved" not in fp


def test_an_effective_budget_is_solved_again_when_a_checkpoint_replaces_the_weights(base, tmp_path):
    from reid_lite.build import load_checkpoint
    from reid_lite.models import load_transreid_state

    model = _model("atm", TARGET_GFLOPS=0.85 * base)
    torch.manual_seed(1)
    other = build_model(tiny_cfg(METHOD="atm", TARGET_GFLOPS=0.85 * base, **LAYERS), 10, 3, 1).eval()
    assert other.merge_budget.value != model.merge_budget.value  # the offset depends on the weights
    solved = model.merge_budget.value
    load_transreid_state(model, other.state_dict())  # the models layer loads weights only: no budget side effect
    assert model.merge_budget.value == solved
    torch.save(other.state_dict(), tmp_path / "other.pth")
    load_checkpoint(model, tmp_path / "other.pth")  # reid_lite.build: weights, then the budget solved again
    assert model.merge_budget.value == other.merge_budget.value
    assert model.merge_budget.effective_gflops == pytest.approx(other.merge_budget.effective_gflops)
