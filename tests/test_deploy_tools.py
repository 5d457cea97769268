"""tools/export.py and tools/test.py with MODEL.BACKEND onnxruntime, end to end on a small model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_tool, small_tool_yaml

from reid_lite import build_model, load_cfg
from reid_lite.data.synthetic import generate_reid_dataset

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A generated dataset (2 cameras), a config for it and a checkpoint of a small random model."""
    tmp = tmp_path_factory.mktemp("deploy_tools")
    root = generate_reid_dataset(tmp / "data", num_train_ids=4, num_test_ids=4, num_cameras=2,
                                 images_per_id_per_camera=2, size=(64, 32), num_distractors=0, progress=False)
    config = tmp / "small.yml"
    config.write_text(small_tool_yaml(root, depth=2, layers=[1]))
    cfg = load_cfg(str(config), ["DATASETS.ROOT_DIR", str(root)])
    torch.manual_seed(0)
    weights = tmp / "small.pth"
    torch.save(build_model(cfg, 4, 2, 0).state_dict(), weights)
    return tmp, config, root, weights


def test_export_then_evaluate_with_onnxruntime(setup, capsys):
    tmp, config, root, weights = setup
    onnx_path = tmp / "small_stm.onnx"
    export, test = load_tool("export"), load_tool("test")
    common = ["--config", str(config), "TEST.WEIGHT", str(weights), "DATASETS.ROOT_DIR", str(root)]
    assert export.main([*common, "--out", str(onnx_path), "--backends", "onnxruntime"]) == 0
    out = capsys.readouterr().out
    assert "parity onnxruntime" in out and "cosine min" in out and "decision flips" in out
    meta = json.loads(onnx_path.with_suffix(".json").read_text())
    assert meta["inputs"]["camera"]["num"] == 2 and meta["merging"]["blocks"] == [1]

    results = {}
    for backend in ("torch", "onnxruntime"):
        out_dir = tmp / f"out_{backend}"
        args = [*common, "MODEL.BACKEND", backend, "MODEL.ONNX_PATH", str(onnx_path), "OUTPUT_DIR", str(out_dir),
                "--no-progress"]
        assert test.main(args) == 0
        results[backend] = json.loads((out_dir / "results.json").read_text())
    ort, ref = results["onnxruntime"], results["torch"]
    assert ort["backend"] == "onnxruntime" and ort["random_weights"] is False
    assert ort["results"][0]["method"] == "stm"
    assert ort["results"][0]["gflops"] == pytest.approx(ref["results"][0]["gflops"])
    for key in ("rank1", "mAP"):  # same model, same images: retrieval metrics agree
        assert ort["results"][0][key] == pytest.approx(ref["results"][0][key], abs=0.02)

    # --compare needs the PyTorch model; a config that contradicts the file is refused by name.
    assert test.main([*common, "MODEL.BACKEND", "onnxruntime", "MODEL.ONNX_PATH", str(onnx_path),
                      "--compare", "none,stm"]) == 2
    assert test.main([*common, "MODEL.BACKEND", "onnxruntime", "MODEL.ONNX_PATH", str(onnx_path),
                      "MERGE.R", "3"]) == 2
    assert "MERGE.R 3 != the file's 2" in capsys.readouterr().err

    # A gallery built on the exported file: its crops find themselves, and a PyTorch query is refused.
    from reid_lite.index.gallery import FingerprintMismatch, Gallery

    ort_cfg = load_cfg(str(config), [*common[2:], "MODEL.BACKEND", "onnxruntime", "MODEL.ONNX_PATH", str(onnx_path)])
    gallery = Gallery.create(tmp / "gallery", ort_cfg, camera_num=2)
    assert gallery.fingerprint["backend"]["name"] == "onnxruntime"
    gallery.add([root / "bounding_box_test"])
    crop = str(sorted((root / "bounding_box_test").glob("*.jpg"))[0])
    hit = gallery.search([crop], k=1)[0][0]
    assert hit.path == str(Path(crop).resolve()) and hit.score == pytest.approx(1.0, abs=1e-4)
    torch_cfg = load_cfg(str(config), common[2:])
    with pytest.raises(FingerprintMismatch, match="backend"):
        gallery.search([crop], k=1, cfg=torch_cfg)
    gallery.close()

    # The exported file moved away: reid-gallery search says where the gallery expects it, in one line.
    from reid_lite.index.cli import main as gallery_cli

    moved = onnx_path.with_name("moved.onnx")
    onnx_path.rename(moved)
    try:
        capsys.readouterr()
        assert gallery_cli(["search", str(tmp / "gallery"), crop, "-k", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"exported model {onnx_path} (its MODEL.ONNX_PATH)" in err[0], err
    finally:
        moved.rename(onnx_path)


def test_a_bad_onnx_path_is_one_line_naming_the_file(setup, tmp_path, capsys):
    """Missing, a folder, truncated, not ONNX at all: tools/test.py and reid-gallery build say which file and
    what is wrong with it, in one line, exit status 2."""
    tmp, config, root, weights = setup
    from reid_lite.index.cli import main as gallery_cli

    (tmp_path / "text.onnx").write_text("hello")
    (tmp_path / "trunc.onnx").write_bytes(b"\x08\x07\x12\x0bpytorch\x1a\xff\xff")  # a ModelProto cut short
    cases = [(tmp_path / "missing.onnx", "ONNX file not found: {path}"),
             (tmp_path, "ONNX file {path} is a folder"),
             (tmp_path / "text.onnx", "{path} is not a readable ONNX file (5 bytes; truncated or not ONNX"),
             (tmp_path / "trunc.onnx", "{path} is not a readable ONNX file (14 bytes; truncated or not ONNX")]
    test = load_tool("test")
    for path, words in cases:
        opts = ["MODEL.BACKEND", "onnxruntime", "MODEL.ONNX_PATH", str(path)]
        assert test.main(["--config", str(config), "DATASETS.ROOT_DIR", str(root), *opts]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and words.format(path=path) in err[0], err
        assert gallery_cli(["build", str(tmp_path / "g"), str(root / "query"), "--config", str(config),
                            "--opts", *opts]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words.format(path=path) in err[0], err
        assert not (tmp_path / "g").exists()


def test_export_refuses_to_replace_a_file_or_write_into_one(setup, tmp_path, capsys):
    """--out that exists (without --overwrite), is a folder, or lies under a file: refused before any work."""
    tmp, config, root, weights = setup
    export = load_tool("export")
    existing = tmp_path / "existing.onnx"
    existing.write_bytes(b"a gallery's model")
    (tmp_path / "file").write_text("x")
    base = ["--config", str(config), "TEST.WEIGHT", str(weights), "--backends", "onnxruntime"]
    for out, words in [(existing, "exists: pass --overwrite"), (tmp_path, "is a folder"),
                       (tmp_path / "file" / "m.onnx", "is a file, not a folder")]:
        assert export.main([*base, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --out {out}") and words in err[0], err
    assert existing.read_bytes() == b"a gallery's model"


def test_export_refuses_tracked_coordinates_and_bad_arguments(setup, capsys):
    tmp, config, root, weights = setup
    export = load_tool("export")
    base = ["--config", str(config), "TEST.WEIGHT", str(weights), "--out", str(tmp / "x.onnx")]
    assert export.main([*base, "MERGE.STM.COORDS", "tracked"]) == 2
    assert "tracked coordinates" in capsys.readouterr().err
    assert export.main([*base, "--backends", "tensorrt"]) == 2
    assert "choose from onnxruntime, openvino" in capsys.readouterr().err
    assert export.main(["--config", str(config), "--out", str(tmp / "x.onnx")]) == 2  # SIE without a camera count
    assert "--cameras" in capsys.readouterr().err
    assert not (tmp / "x.onnx").exists()


def test_benchmark_exports_once_times_every_batch_and_reports_a_refused_export(setup, tmp_path):
    """tools/benchmark.py --backend onnxruntime in a fresh process: one exported file per method serves every
    batch size (p50/p90 per batch); a method whose export is refused is reported so, and the run succeeds."""
    _, config, _, _ = setup
    out = tmp_path / "bench.json"
    argv = ["--config", str(config), "--methods", "stm,stm_tracked", "--backend", "onnxruntime", "--batch-size", "1",
            "3", "--iters", "2", "--warmup", "1", "--threads", "1", "--onnx-dir", str(tmp_path / "onnx"),
            "--out", str(out)]
    res = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark.py"), *argv], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    rows = {(r["method"], r["batch_size"]): r for r in report["results"]}
    assert set(rows) == {("stm", 1), ("stm", 3), ("stm_tracked", 1), ("stm_tracked", 3)}
    for batch in (1, 3):
        stm = rows["stm", batch]
        assert stm["backend"] == "onnxruntime" and 0 < stm["p50_ms"] <= stm["p90_ms"]
        assert stm["images_per_s"] == pytest.approx(1e3 * batch / stm["p50_ms"])
        assert "tracked coordinates" in rows["stm_tracked", batch]["refused"]
    assert report["exports"]["stm"]["parity"][0]["passed"]
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["small_stm.onnx"]
    assert "| stm_tracked | onnxruntime | 1 | export refused |" in res.stdout
