"""tools/test.py end to end on a tiny model and a generated dataset."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import cv2
import pytest

from reid_lite.data import ImageReadWarning
from reid_lite.data.synthetic import generate_reid_dataset
from reid_lite.utils.visualize import canvas_size

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "test.py"

TINY_YAML = """
MODEL:
  PRETRAIN_CHOICE: 'none'
  EMBED_DIM: 64
  DEPTH: 3
  NUM_HEADS: 4
  STRIDE_SIZE: [16, 16]
  SIE_CAMERA: True
  JPM: True
  DEVICE: 'cpu'
INPUT:
  SIZE_TRAIN: [64, 32]
  SIZE_TEST: [64, 32]
DATASETS:
  NAMES: 'market1501'
  ROOT_DIR: '{root}'
DATALOADER:
  NUM_WORKERS: 0
TEST:
  IMS_PER_BATCH: 8
MERGE:
  METHOD: 'stm'
  R: 2
  LAYERS: [1, 2]
OUTPUT_DIR: '{out}'
"""


@pytest.fixture(scope="module")
def tool():
    # Loaded under its own name: "test" would shadow the standard library module.
    spec = importlib.util.spec_from_file_location("reid_lite_tools_test", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = generate_reid_dataset(tmp_path_factory.mktemp("tool_data"), num_train_ids=4, num_test_ids=4,
                                 num_cameras=2, images_per_id_per_camera=2, size=(64, 32), num_distractors=0,
                                 progress=False)
    victim = sorted((root / "bounding_box_test").glob("*.jpg"))[0]
    victim.write_bytes(b"\xff\xd8 truncated")  # one unreadable gallery image in every run below
    return root


def write_config(tmp_path: Path, root: Path) -> tuple[Path, Path]:
    out = tmp_path / "out"
    cfg = tmp_path / "tiny.yml"
    cfg.write_text(TINY_YAML.format(root=root, out=out))
    return cfg, out


def run_tool(tool, argv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageReadWarning)
        return tool.main([str(a) for a in argv])


def test_compare_writes_results_and_warns_about_random_weights(tool, data_root, tmp_path, capsys):
    cfg, out = write_config(tmp_path, data_root)
    # --compare after the KEY VALUE overrides, as users type it.
    rc = run_tool(tool, ["--config", cfg, "--no-progress", "TEST.IMS_PER_BATCH", 5, "--compare", "none,tome"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "RANDOMLY INITIALISED" in captured.err and "#####" in captured.err
    assert "| method" in captured.out and "skipped images: 1" in captured.out
    record = json.loads((out / "results.json").read_text())
    for key in ("timestamp", "config", "device", "torch", "results", "skipped", "random_weights", "table"):
        assert key in record
    assert record["random_weights"] is True and record["skipped"] == 1 and record["device"] == "cpu"
    assert record["config"]["TEST"]["IMS_PER_BATCH"] == 5
    rows = record["results"]
    assert [r["method"] for r in rows] == ["none", "tome"]
    assert rows[1]["gflops"] < rows[0]["gflops"]
    for r in rows:
        for key in ("gflops", "images_per_second", "rank1", "rank5", "rank10", "mAP", "mINP", "feature_dim"):
            assert key in r


def test_vis_queries_png(tool, data_root, tmp_path, capsys):
    cfg, out = write_config(tmp_path, data_root)
    assert run_tool(tool, ["--config", cfg, "--no-progress", "--vis-queries", "0,2"]) == 0
    png = out / "ranked_results_stm.png"  # the config's own method
    img = cv2.imread(str(png))
    assert img is not None and img.shape[:2] == canvas_size(2, 10)
    assert str(png) in json.loads((out / "results.json").read_text())["figures"]
    assert run_tool(tool, ["--config", cfg, "--vis-queries", "99"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_bad_override_exits_2(tool, data_root, tmp_path, capsys):
    cfg, _ = write_config(tmp_path, data_root)
    assert run_tool(tool, ["--config", cfg, "MODEL.NO_SUCH_KEY", 1]) == 2
    assert "NO_SUCH_KEY" in capsys.readouterr().err
    # EViT's default layers 4, 7, 10 do not exist in the 3-block model: refused before any extraction.
    assert run_tool(tool, ["--config", cfg, "--compare", "none,evit"]) == 2
    assert "MERGE.EVIT.LAYERS" in capsys.readouterr().err


def test_missing_dataset_exits_2_without_traceback(tool, tmp_path, capsys):
    # In-process (a subprocess would spend most of the test budget importing torch): main() returning
    # 2 is the exit code, as the script ends with sys.exit(main()); an exception would fail the test.
    cfg, _ = write_config(tmp_path, tmp_path / "nowhere")
    assert run_tool(tool, ["--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("error: Market1501 not found") and "bounding_box_train" in err
