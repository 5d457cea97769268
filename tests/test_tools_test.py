"""tools/test.py end to end on a tiny model and a generated dataset."""

from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path

import cv2
import pytest
from conftest import load_tool, small_tool_yaml

from reid_lite.data import ImageReadWarning
from reid_lite.data.synthetic import generate_reid_dataset
from reid_lite.index.visualize import canvas_size

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "test.py"


@pytest.fixture(scope="module")
def tool():
    return load_tool("test")


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
    cfg.write_text(small_tool_yaml(root, depth=3, layers=[1, 2], out=out))
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
    # the schedule each method ran: 4x2 patches + cls = 9 tokens, r = 2 in blocks 1 and 2
    assert rows[0]["schedule"] == []
    assert rows[1]["schedule"] == [{"block": 1, "tokens_in": 9, "tokens_out": 7},
                                   {"block": 2, "tokens_in": 7, "tokens_out": 5}]
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


# ------------------------------------------------------------------------------ ordinary mistakes: one line, exit 2


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("kind", ["yaml", "empty", "directory", "forbidden object"])
def test_weights_that_are_no_checkpoint_exit_2_with_one_line(tool, data_root, tmp_path, capsys, kind):
    import torch

    cfg, out = write_config(tmp_path, data_root)
    weights = {"yaml": cfg, "empty": tmp_path / "empty.pth", "directory": tmp_path,
               "forbidden object": tmp_path / "pickled.pth"}[kind]
    if kind == "empty":
        weights.touch()
    if kind == "forbidden object":
        torch.save({"model": {}, "args": argparse_namespace()}, weights)
    assert run_tool(tool, ["--config", cfg, "TEST.WEIGHT", weights]) == 2
    line = one_error_line(capsys)
    expect = {"yaml": f"error: {cfg} is not a PyTorch checkpoint (a text file, ",
              "empty": f"error: {weights} is empty (0 bytes): not a checkpoint",
              "directory": f"error: {weights} is a directory, not a checkpoint file",
              "forbidden object": f"error: {weights} was refused as unsafe: it contains objects that weights-only "
                                  "loading refuses "
                                  "(Unsupported global: GLOBAL argparse.Namespace"}[kind]
    assert line.startswith(expect), line
    # trusting the file is suggested only where unpickling is what stands in the way
    assert ("MODEL.TRUST_CHECKPOINT True" in line) == (kind == "forbidden object")
    assert not out.exists()  # refused before anything ran


def argparse_namespace():
    import argparse

    return argparse.Namespace(lr=0.1)  # what training scripts often save beside the weights


def test_checkpoint_trained_on_more_cameras_evaluates_data_of_two(tool, data_root, tmp_path, capsys):
    import torch

    from reid_lite.build import build_model
    from reid_lite.config import load_cfg

    cfg, out = write_config(tmp_path, data_root)
    weights = tmp_path / "six_cameras.pth"
    torch.save(build_model(load_cfg(cfg), 5, camera_num=6).state_dict(), weights)
    assert run_tool(tool, ["--config", cfg, "--no-progress", "TEST.WEIGHT", weights]) == 0, capsys.readouterr().err
    record = json.loads((out / "results.json").read_text())
    assert record["weights"] == str(weights) and record["random_weights"] is False


def test_test_size_other_than_the_train_size_exits_2_before_reading_data(tool, tmp_path, capsys):
    cfg, _ = write_config(tmp_path, tmp_path / "nowhere")  # no dataset: the size is checked first
    assert run_tool(tool, ["--config", cfg, "INPUT.SIZE_TEST", "[128, 64]"]) == 2
    assert one_error_line(capsys).startswith("error: INPUT.SIZE_TEST [128, 64] differs from INPUT.SIZE_TRAIN "
                                             "[64, 32], the size the model (its position embedding) is built for")


def test_merge_r_too_large_exits_2_naming_the_largest_r(tool, data_root, tmp_path, capsys):
    cfg, out = write_config(tmp_path, data_root)
    assert run_tool(tool, ["--config", cfg, "MERGE.R", 3]) == 2
    assert one_error_line(capsys) == ("error: MERGE.R 3 is too large: block 2 receives 6 tokens (the class token and "
                                      "5 patches) and can merge at most 2; the largest r for MERGE.LAYERS [1, 2] is 2")
    assert run_tool(tool, ["--config", cfg, "--compare", "none,tome", "MERGE.METHOD", "none", "MERGE.R", 3]) == 2
    assert "the largest r for MERGE.LAYERS [1, 2] is 2" in one_error_line(capsys)  # each compared method too
    assert not (out / "results.json").exists()


def test_missing_query_folder_is_named(tool, tmp_path, capsys):
    root = tmp_path / "data"
    for sub in ("bounding_box_train", "bounding_box_test"):
        (root / "market1501" / sub).mkdir(parents=True)
    cfg, _ = write_config(tmp_path, root)
    assert run_tool(tool, ["--config", cfg]) == 2
    assert one_error_line(capsys).startswith(f"error: Market1501 at {root / 'market1501'} is incomplete: "
                                             "missing folder(s) query")


def test_mistyped_root_dir_with_the_demo_config_generates_nothing(tool, tmp_path, capsys):
    typo = tmp_path / "datsets"
    assert run_tool(tool, ["--config", REPO / "configs" / "demo_synthetic.yml", "DATASETS.ROOT_DIR", typo]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: no synthetic dataset at {typo / 'synthetic'}") and "DATASETS.GENERATE True" in line
    assert not typo.exists()


def test_an_unfinished_synthetic_folder_is_explained_without_options_test_py_lacks(tool, tmp_path, capsys):
    (tmp_path / "synthetic" / "query").mkdir(parents=True)  # an interrupted generation: no _COMPLETE marker
    assert run_tool(tool, ["--config", REPO / "configs" / "demo_synthetic.yml", "DATASETS.ROOT_DIR", tmp_path,
                           "DATASETS.GENERATE", True]) == 2
    line = one_error_line(capsys)
    assert "--overwrite" not in line and "has no _COMPLETE marker" in line and "remove that folder" in line


def test_cli_errors_are_one_shared_helper(capsys):
    from reid_lite.cli import EXIT_USAGE, cli_error, error_text

    assert error_text(KeyError("unknown dataset 'x'")) == "unknown dataset 'x'"  # no repr quotes
    assert error_text(EOFError()) == "EOFError"  # never an empty reason
    assert cli_error(ValueError("bad")) == EXIT_USAGE == 2 and capsys.readouterr().err == "error: bad\n"
    train = (REPO / "tools" / "train.py").read_text()
    for source in (TOOL.read_text(), train):
        from_cli = {a.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)
                    and n.module == "reid_lite.cli" for a in n.names}
        assert {"USER_ERRORS", "cli_error"} <= from_cli and "def _error" not in source


# ------------------------------------------------------------------------------ asymmetric use and calibration


def test_asymmetric_prints_the_pairing_table(tool, data_root, tmp_path, capsys):
    cfg, out = write_config(tmp_path, data_root)
    assert run_tool(tool, ["--config", cfg, "--no-progress", "--asymmetric", "--compare", "tome"]) == 0
    stdout = capsys.readouterr().out
    assert "asymmetric retrieval" in stdout and "| gallery | query |" in stdout
    assert [line.split("|")[1:3] for line in stdout.splitlines() if line.startswith("| none ") or
            line.startswith("| tome ")][-3:] == [[" none    ", " none  "], [" none    ", " tome  "],
                                                 [" tome    ", " tome  "]]
    record = json.loads((out / "results.json").read_text())
    rows = {(r["gallery"], r["query"]): r for r in record["asymmetric"]}
    assert list(rows) == [("none", "none"), ("none", "tome"), ("tome", "tome")]
    by_method = {r["method"]: r for r in record["results"]}  # 'none' was added to --compare
    for m in ("none", "tome"):  # the symmetric pairings are the main table's rows
        assert rows[(m, m)]["rank1"] == by_method[m]["rank1"] and rows[(m, m)]["mAP"] == by_method[m]["mAP"]
    assert all(0 <= r["rank1"] <= 1 and r["num_query"] == by_method["none"]["num_query"] for r in rows.values())
    assert run_tool(tool, ["--config", cfg, "--asymmetric", "MERGE.METHOD", "none"]) == 2
    assert "--asymmetric pairs an unmerged gallery with merged queries" in one_error_line(capsys)


@pytest.fixture
def copied_queries(tmp_path) -> Path:
    """A dataset whose queries include copies of two gallery crops under another camera: with the camera SIE
    off their features equal the originals', so their top hit is right whatever the (random) weights."""
    root = generate_reid_dataset(tmp_path / "data", num_train_ids=4, num_test_ids=4, num_cameras=2,
                                 images_per_id_per_camera=2, size=(64, 32), num_distractors=0, progress=False)
    for src in sorted((root / "bounding_box_test").glob("*_c1s*.jpg"))[:2]:
        (root / "query" / src.name.replace("_c1s", "_c2s").replace("_00.jpg", "_09.jpg")).write_bytes(src.read_bytes())
    return root


def test_calibrate_writes_the_threshold_into_the_gallery(tool, copied_queries, tmp_path, capsys, monkeypatch):
    from reid_lite.config import load_cfg
    from reid_lite.index import Gallery

    cfg, out = write_config(tmp_path, copied_queries)
    no_sie = ["MODEL.SIE_CAMERA", "False"]
    Gallery.build(tmp_path / "gal", load_cfg(str(cfg), no_sie), [copied_queries / "bounding_box_test"])[0].close()
    assert run_tool(tool, ["--config", cfg, "--no-progress", "--calibrate", tmp_path / "gal", *no_sie]) == 0
    assert "calibrated " in capsys.readouterr().out
    entry = json.loads((out / "results.json").read_text())["calibration"]
    g = Gallery.open(tmp_path / "gal")
    assert g.generation == 1 and g.calibration_for(None)["threshold"] == entry["threshold"]
    assert entry["num_true_top1"] >= 2 and entry["query_model"] == entry["gallery_model"]
    assert entry["rule"] == "f1" and entry["num_queries"] == len(list((copied_queries / "query").glob("*.jpg")))

    # an unmerged gallery that accepts merged queries: STM queries against its unmerged features
    Gallery.build(tmp_path / "asym", load_cfg(str(cfg), [*no_sie, "MERGE.METHOD", "none"]),
                  [copied_queries / "bounding_box_test"], accept_merged_queries=True)[0].close()
    assert run_tool(tool, ["--config", cfg, "--no-progress", "--calibrate", tmp_path / "asym", *no_sie]) == 0
    record = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in record["results"]] == ["none", "stm"]  # both sides were extracted
    entry = record["calibration"]
    assert entry["query_merging"]["method"] == "stm" and entry["query_model"] != entry["gallery_model"]
    g = Gallery.open(tmp_path / "asym")
    assert g.calibration_for(g.query_model(load_cfg(str(cfg), no_sie))[1])["threshold"] == entry["threshold"]

    # a calibration that fails (here: refused by the rule) writes nothing to the gallery; the evaluation is kept
    capsys.readouterr()

    def refuse(*args, **kwargs):
        raise ValueError("no query's top hit is a true match")

    monkeypatch.setattr(tool, "calibrate_gallery", refuse)
    (out / "results.json").unlink()
    assert run_tool(tool, ["--config", cfg, "--no-progress", "--calibrate", tmp_path / "gal", *no_sie]) == 2
    assert one_error_line(capsys) == "error: the gallery was not calibrated: no query's top hit is a true match"
    record = json.loads((out / "results.json").read_text())
    assert record["calibration"]["error"] == "no query's top hit is a true match" and record["results"]
    assert Gallery.open(tmp_path / "gal").generation == 1
    monkeypatch.undo()

    # a gallery of another model is refused before anything is extracted
    capsys.readouterr()
    assert run_tool(tool, ["--config", cfg, "--calibrate", tmp_path / "gal", *no_sie, "MERGE.R", 1]) == 2
    line = one_error_line(capsys)
    assert "refused" in line and "merging.r: gallery 2 != query 1" in line
    assert Gallery.open(tmp_path / "gal").generation == 1  # nothing written


def test_output_dir_that_is_a_file_or_unwritable_is_refused_before_any_work(tool, data_root, tmp_path, capsys):
    cfg, out = write_config(tmp_path, data_root)
    (tmp_path / "file").write_text("x")
    for bad, words in [(tmp_path / "file", "OUTPUT_DIR {p} is a file, not a folder"),
                       (tmp_path / "file" / "sub", "OUTPUT_DIR {p}: {f} is a file, not a folder")]:
        assert run_tool(tool, ["--config", cfg, "OUTPUT_DIR", bad]) == 2
        line = one_error_line(capsys)
        assert line == "error: " + words.format(p=bad, f=tmp_path / "file"), line
        assert "Loaded" not in capsys.readouterr().out  # refused before the dataset was read


def test_budget_with_no_merging_method_is_refused(tool, data_root, tmp_path, capsys):
    """results.json must never claim a budget that was not applied: MERGE.METHOD none has no knob."""
    cfg, out = write_config(tmp_path, data_root)
    assert run_tool(tool, ["--config", cfg, "--budget", "75%", "MERGE.METHOD", "none"]) == 2
    assert "--budget 75%: no evaluated method has a GFLOPs knob (none; MERGE.METHOD none merges nothing)" in \
        one_error_line(capsys)
    assert not (out / "results.json").exists()


def test_no_query_identity_in_the_gallery_is_one_line(tool, tmp_path, capsys):
    root = generate_reid_dataset(tmp_path / "data", num_train_ids=2, num_test_ids=2, num_cameras=2,
                                 images_per_id_per_camera=1, size=(64, 32), num_distractors=0, progress=False)
    for q in (root / "query").glob("*.jpg"):  # queries of a person the gallery never saw
        q.rename(q.with_name("0099" + q.name[4:]))
    cfg, out = write_config(tmp_path, root)
    assert run_tool(tool, ["--config", cfg, "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert "no query identity appears in the gallery from another camera" in line and "gallery image" in line
    assert not (out / "results.json").exists()


def test_market_layout_with_upper_case_jpg_is_read(tool, tmp_path, capsys):
    """Files named .JPG (a camera's or Windows' habit) are read, as reid-gallery reads them."""
    root = generate_reid_dataset(tmp_path / "data", num_train_ids=2, num_test_ids=2, num_cameras=2,
                                 images_per_id_per_camera=1, size=(64, 32), num_distractors=0, progress=False)
    for f in list((root / "bounding_box_test").glob("*.jpg")) + list((root / "query").glob("*.jpg")):
        f.rename(f.with_suffix(".JPG"))
    cfg, out = write_config(tmp_path, root)
    assert run_tool(tool, ["--config", cfg, "--no-progress"]) == 0, capsys.readouterr().err
    record = json.loads((out / "results.json").read_text())
    assert record["num_query"] == 2 and record["num_gallery"] == 2 and record["skipped"] == 0
